"""The one place where gradients become parameter updates.

A non-finite gradient (NaN/inf anywhere) skips the update: parameters and optimiser
state are returned unchanged and the caller counts the skip, so one bad batch never
poisons the run.  Selecting with ``jnp.where`` keeps it jit-able with no host sync.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


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
