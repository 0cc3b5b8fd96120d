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
import numpy as np

from codex_jax.config.stages import RewardConfig
from codex_jax.core import kernels, keys
from codex_jax.core.optim import apply_gradients, make_optimizer
from codex_jax.core.state import TrainState, init_state
from codex_jax.errors import DataError
from codex_jax.models.family import Family, reward_score
from codex_jax.stages.context import Setup, StageContext, evaluate_many, prefixed

PAIR_FIELDS = ("prompt", "prompt_mask", "chosen", "chosen_mask", "rejected", "rejected_mask")


def init(key: jax.Array, cfg: RewardConfig, family: Family) -> TrainState:
    return init_state(family.init_reward(key), family, cfg, make_optimizer(cfg.optim, cfg.steps))


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


def select_batch(state: TrainState, data: dict, key: jax.Array) -> dict:
    n = data["chosen"].shape[0]
    idx = kernels.epoch_batch_indices(key, state.step, n, min(state.cfg.batch_size, n))
    return {name: data[name][idx] for name in PAIR_FIELDS}


def step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
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


# --------------------------------------------------------------------------- the stage in the table
SHOW = ("loss", "accuracy")


def split_pairs(pairs: dict, key: jax.Array, heldout_fraction: float) -> tuple[dict, dict]:
    """Random train / held-out split of the preference pairs, drawn by key."""
    n = pairs["chosen"].shape[0]
    n_held = int(n * heldout_fraction)
    if n - n_held < 1:
        raise DataError(f"prefs: {n} preference pair(s) leave none for training")
    perm = np.asarray(keys.permutation(key, n))
    held, train = perm[:n_held], perm[n_held:]
    return ({k: v[train] for k, v in pairs.items()}, {k: v[held] for k, v in pairs.items()})


def setup(ctx: StageContext, key: jax.Array) -> Setup:
    cfg = ctx.cfg.reward
    k_split, k_init, k_train = keys.split(key, 3)
    train_pairs, held_pairs = split_pairs(ctx.enc.pairs, k_split, cfg.heldout_fraction)
    train_pairs = ctx.place(keys.to_device(train_pairs))
    return Setup(init(k_init, cfg, ctx.family), train_pairs, k_train, cfg.steps, cfg.log_every,
                 extra={"heldout": held_pairs})


def report(ctx: StageContext, setup_: Setup, state) -> dict:
    train, held = setup_.data, setup_.extra["heldout"]
    sets = [train] + ([ctx.place(keys.to_device(held))] if held["chosen"].shape[0] else [])
    scores = evaluate_many(evaluate, ctx.family, tuple((state.params, d) for d in sets))
    out = {"train_pairs": int(train["chosen"].shape[0]), "heldout_pairs": int(held["chosen"].shape[0]),
           "skipped_updates": int(state.skipped), **prefixed("train_", scores[0])}
    if len(scores) > 1:
        out.update(prefixed("heldout_", scores[1]))
    return out


def export(state):
    return state.params


def seed_independence(ctx: StageContext) -> str | None:
    cfg, n = ctx.cfg.reward, ctx.enc.pairs["chosen"].shape[0]
    if ctx.family.random_init or int(n * cfg.heldout_fraction) > 0 or cfg.batch_size < n:
        return None
    return "full batch"
