"""M0: pretraining on the packed corpus (closed-form smoothed MLE, or optax).

The math lives in ``stages.lm`` (shared with SFT); this module is the stage's
entry in the table: how it starts, what it reports, whether it uses its key.
"""

from __future__ import annotations

import jax

from codex_jax.core import keys
from codex_jax.stages import lm
from codex_jax.stages.context import Setup, StageContext, evaluate_many, floats, lm_datasets, prefixed

init, select_batch, step, evaluate = lm.init, lm.select_batch, lm.step, lm.evaluate
SHOW = ("loss",)


def setup(ctx: StageContext, key: jax.Array) -> Setup:
    cfg, data = ctx.cfg.pretrain, lm_datasets(ctx)
    k_init, k_train = keys.split(key)
    if cfg.mode == "exact":  # the answer itself: nothing to train
        return Setup(lm.fit_exact(k_init, cfg, ctx.family, data["corpus"]), data["corpus"], k_train, 0, cfg.log_every)
    return Setup(init(k_init, cfg, ctx.family), data["corpus"], k_train, cfg.steps, cfg.log_every)


def report(ctx: StageContext, setup_: Setup, state) -> dict:
    data, enc = lm_datasets(ctx), ctx.enc
    sets = [data[name] for name in ("corpus", "heldout_corpus") if data[name] is not None]
    scores = evaluate_many(evaluate, ctx.family, tuple((state.params, d) for d in sets))
    out = {"mode": ctx.cfg.pretrain.mode, "corpus_tokens": enc.num_corpus_tokens,
           **floats(scores[0]), "skipped_updates": int(state.skipped)}
    if data["heldout_corpus"] is not None:
        out.update(prefixed("heldout_", scores[1]), heldout_tokens=int(enc.heldout_corpus_mask.sum()))
    return out


def export(state):
    return state.params


def seed_independence(ctx: StageContext) -> str | None:
    cfg = ctx.cfg.pretrain
    if cfg.mode == "exact":
        return "closed form"
    if not ctx.family.random_init and cfg.batch_size >= ctx.enc.corpus_tokens.shape[0]:
        return "full batch"
    return None
