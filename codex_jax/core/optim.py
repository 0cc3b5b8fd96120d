"""Optimisers: one function builds every optax optimiser from its config, and
``apply_gradients`` is the one place where gradients become parameter updates.

The learning rate lives in the optimiser *state* (``optax.inject_hyperparams``), not in
the compiled function: ``opt_state.hyperparams["learning_rate"]`` is the base rate and
the schedule's shape (warm-up, cosine decay) is a static multiplier of it,

    rate(step) = opt_state.hyperparams["learning_rate"] * multiplier(step)

so a state built for one rate and given another by ``set_learning_rate`` trains
exactly as an optimiser built for that rate, and a ``jax.vmap`` over states trains
members with different rates in one compiled call (``codex_jax.run.sweep``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from codex_jax.config.stages import OptimConfig

LR = "learning_rate"  # the hyperparameter's key in the optimiser state


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Constant or cosine-decayed rate, with optional linear warm-up."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_fraction)
    else:
        main = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The schedule's shape: ``learning_rate`` of the same config with a base rate of 1."""
    return learning_rate(dataclasses.replace(cfg, lr=1.0), total_steps)


def _transformation(learning_rate: Any, *, multiplier: Callable, name: str, weight_decay: float,
                    grad_clip: float) -> optax.GradientTransformation:
    """The optimiser for a (traced) base rate; called by ``inject_hyperparams``."""
    rate = lambda count: learning_rate * multiplier(count)
    if name == "adamw":
        opt = optax.adamw(rate, weight_decay=weight_decay)
    elif name == "sgd":
        opt = optax.sgd(rate)
    else:
        opt = optax.adam(rate)
    if grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip), opt)
    return opt


@functools.lru_cache(maxsize=None)
def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """optax chain: optional global-norm clipping, then adam / adamw / sgd, with the
    base learning rate injected into the optimiser state (``set_learning_rate``)."""
    factory = optax.inject_hyperparams(
        _transformation, static_args=("multiplier", "name", "weight_decay", "grad_clip"))
    return factory(learning_rate=cfg.lr, multiplier=lr_multiplier(cfg, total_steps), name=cfg.name,
                   weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)


def get_learning_rate(opt_state: Any) -> jax.Array:
    """The base learning rate held in a ``make_optimizer`` state."""
    return opt_state.hyperparams[LR]


def set_learning_rate(opt_state: Any, lr: Any) -> Any:
    """A copy of a ``make_optimizer`` state with base rate ``lr`` (a scalar, or one rate
    per member of a stacked state: shape [K]); dtype follows the stored rate."""
    old = opt_state.hyperparams[LR]
    new = jnp.broadcast_to(jnp.asarray(lr, old.dtype), jnp.shape(old)) if np.ndim(lr) == 0 \
        else jnp.asarray(lr, old.dtype).reshape(jnp.shape(old))
    return opt_state._replace(hyperparams={**opt_state.hyperparams, LR: new})


# --------------------------------------------------------------------------- updates
# A non-finite gradient (NaN/inf anywhere) skips the update: parameters and optimiser
# state are returned unchanged and the caller counts the skip, so one bad batch never
# poisons the run.  Selecting with ``jnp.where`` keeps it jit-able with no host sync.
def all_finite(tree: Any) -> jax.Array:
    """True iff every element of every leaf is finite.  -> bool []."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_gradients(
    tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any
) -> tuple[Any, Any, jax.Array]:
    """optax update + apply, skipped when ``grads`` are not finite.

    Returns (params, opt_state, ok) with ok a bool [] that is False on a skip.
    """
    ok = all_finite(grads)
    safe_grads = jax.tree_util.tree_map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = tx.update(safe_grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return (
        jax.tree_util.tree_map(keep, new_params, params),
        jax.tree_util.tree_map(keep, new_opt_state, opt_state),
        ok,
    )
