"""Reward-model stage (RM): Bradley-Terry on preference pairs.

loss = mean(-log sigmoid(r(chosen) - r(rejected))) + l2 * family.reward_l2(params)

data = {"prompt": int32 [N, P], "prompt_mask": [N, P],
        "chosen": int32 [N, T], "chosen_mask": [N, T],
        "rejected": int32 [N, T], "rejected_mask": [N, T]}
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from codex_jax import kernels
from codex_jax.config import RewardConfig
from codex_jax.family import Family, reward_score
from codex_jax.optim import make_optimizer
from codex_jax.updates import apply_gradients

PAIR_FIELDS = ("prompt", "prompt_mask", "chosen", "chosen_mask", "rejected", "rejected_mask")


@struct.dataclass
class RewardState:
    params: Any
    opt_state: Any
    step: jax.Array  # int32 []
    skipped: jax.Array  # int32 []
    family: Family = struct.field(pytree_node=False)
    cfg: RewardConfig = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def init(key: jax.Array, cfg: RewardConfig, family: Family) -> RewardState:
    params = family.init_reward(key)
    tx = make_optimizer(cfg.optim, cfg.steps)
    return RewardState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        family=family,
        cfg=cfg,
        tx=tx,
    )


def margins(params: Any, family: Family, batch: dict) -> jax.Array:
    """r(chosen) - r(rejected).  -> [B]."""
    chosen = reward_score(family, params, batch["prompt"], batch["prompt_mask"],
                          batch["chosen"], batch["chosen_mask"])
    rejected = reward_score(family, params, batch["prompt"], batch["prompt_mask"],
                            batch["rejected"], batch["rejected_mask"])
    return chosen - rejected


def pair_metrics(margin: jax.Array) -> dict:
    """Bradley-Terry NLL, pairwise accuracy (ties count half) and mean margin."""
    correct = (margin > 0).astype(jnp.float32) + 0.5 * (margin == 0).astype(jnp.float32)
    return {
        "bt_loss": jnp.mean(jax.nn.softplus(-margin)),  # = -log sigmoid(margin)
        "accuracy": jnp.mean(correct),
        "margin": jnp.mean(margin),
    }


def loss_fn(params: Any, family: Family, batch: dict, l2: float) -> tuple[jax.Array, dict]:
    metrics = pair_metrics(margins(params, family, batch))
    loss = metrics["bt_loss"] + l2 * family.reward_l2(params)
    return loss, {**metrics, "loss": loss}


def select_batch(state: RewardState, data: dict, key: jax.Array) -> dict:
    n = data["chosen"].shape[0]
    idx = kernels.epoch_batch_indices(key, state.step, n, min(state.cfg.batch_size, n))
    return {name: data[name][idx] for name in PAIR_FIELDS}


def step(state: RewardState, batch: dict, key: jax.Array) -> tuple[RewardState, dict]:
    del key  # the bag-of-words model is deterministic; batches are drawn by select_batch
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        state.params, state.family, batch, state.cfg.l2
    )
    params, opt_state, ok = apply_gradients(state.tx, state.params, state.opt_state, grads)
    skipped = 1 - ok.astype(jnp.int32)
    new = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                        skipped=state.skipped + skipped)
    return new, {**metrics, "skipped": skipped}


@functools.partial(jax.jit, static_argnames=("family", "chunk"))
def evaluate(params: Any, family: Family, data: dict, chunk: int = 256) -> dict:
    """Pairwise metrics of ``params`` on every pair of ``data`` (in chunks)."""
    pairs = {name: data[name] for name in PAIR_FIELDS}
    return pair_metrics(kernels.chunked_map(lambda b: margins(params, family, b), pairs, chunk))
