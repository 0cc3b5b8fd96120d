"""M1: supervised fine-tuning of M0 on prompt-masked demonstrations (optax).

The math lives in ``stages.lm`` (shared with pretraining).
"""

from __future__ import annotations

import jax

from codex_jax.core import keys
from codex_jax.stages import lm
from codex_jax.stages.context import Setup, StageContext, evaluate_many, floats, lm_datasets

init, select_batch, step, evaluate = lm.init, lm.select_batch, lm.step, lm.evaluate
SHOW = ("loss",)


def setup(ctx: StageContext, key: jax.Array) -> Setup:
    cfg, data = ctx.cfg.sft, lm_datasets(ctx)
    k_init, k_train = keys.split(key)
    return Setup(init(k_init, cfg, ctx.family, params=ctx.params["M0"]), data["demos"], k_train,
                 cfg.steps, cfg.log_every)


def report(ctx: StageContext, setup_: Setup, state) -> dict:
    data, m0 = lm_datasets(ctx), ctx.params["M0"]
    held = data["heldout_demos"]
    sets = [data["demos"]] + ([held] if held is not None else [])
    nll = [floats(s)["nll"] for s in evaluate_many(evaluate, ctx.family,
                                                   tuple((p, d) for d in sets for p in (m0, state.params)))]
    out = {"demo_nll_before": nll[0], "demo_nll_after": nll[1], "skipped_updates": int(state.skipped)}
    if held is not None:
        out.update(heldout_demos=int(held["tokens"].shape[0]), heldout_demo_nll_before=nll[2],
                   heldout_demo_nll_after=nll[3])
    return out


def export(state):
    return state.params


def seed_independence(ctx: StageContext) -> str | None:
    # SFT starts from M0 (its own init key is unused); minibatches are the only draw
    if ctx.cfg.sft.batch_size >= ctx.enc.sft_tokens.shape[0]:
        return "full batch"
    return None
