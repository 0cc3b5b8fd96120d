"""What the driver hands a stage, and what a stage hands back before training.

Every stage module exports, besides its pure ``init`` / ``select_batch`` / ``step`` /
``evaluate``, three host-side functions the driver (``run.driver``) and the sweep
(``run.sweep``) call alike:

    setup(ctx, key)              -> Setup    initial state, data, train key, step count
    report(ctx, setup, state)    -> dict     the stage's metrics for summary.json
    export(state)                -> params   the parameters saved as params/<stage>.npz
    seed_independence(ctx)       -> str|None why the stage ignores its key (None: it uses it)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from codex_jax.config.pipeline import PipelineConfig
from codex_jax.core.compile import jit_for
from codex_jax.data.encode import EncodedData
from codex_jax.models.family import Family
from codex_jax.stages import lm


@dataclasses.dataclass(frozen=True)
class StageContext:
    """The inputs of one stage: config, encoded data, family and earlier results."""

    cfg: PipelineConfig
    enc: EncodedData
    family: Family
    unsafe_ids: tuple[int, ...]  # token ids of the rule-based safety penalty
    params: Mapping[str, Any]  # exported params of the stages already run ("M0", ...)
    place: Callable[[Any], Any] = lambda tree: tree  # data onto the device mesh (identity: one device)
    # RL reward computed on the host: (prompt ids int32 [B], responses int32 [B, T]) -> f32 [B]
    # (the execution reward of run.execution); None: the reward model alone
    host_reward: Callable[[Any, Any], Any] | None = None
    reward_mix: tuple[float, float] = (1.0, 0.0)  # (RM weight, host-reward weight)
    cache: dict = dataclasses.field(default_factory=dict)  # data built once and shared by later stages


@dataclasses.dataclass
class Setup:
    """A stage ready to train: ``total`` steps of ``step`` from ``state`` on ``data``.

    ``total = 0`` marks a closed-form stage: ``state`` is already the result."""

    state: Any
    data: Any
    key: jax.Array  # the train key (run_steps folds in the step)
    total: int
    log_every: int
    extra: dict = dataclasses.field(default_factory=dict)  # what report needs (eval keys, start state)


def floats(tree: Mapping[str, Any]) -> dict[str, float]:
    """Host floats of a dict of scalars (one device_get)."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(tree)).items()}


def evaluate_many(evaluate: Callable, family: Family, jobs: tuple) -> list[dict]:
    """``[evaluate(params, family, data) for params, data in jobs]`` as one compiled
    program (with the family's compiler options): a report's evaluations (before / after,
    training / held-out data) cost one trace, lowering and compilation instead of one per
    data set."""
    return jit_for(evaluate_all, family, jobs, static_argnames=("evaluate", "family"))(evaluate, family, jobs)


def evaluate_all(evaluate: Callable, family: Family, jobs: tuple) -> list[dict]:
    return [evaluate(params, family, data) for params, data in jobs]


def prefixed(prefix: str, tree: Mapping[str, Any]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in floats(tree).items()}


def lm_datasets(ctx: StageContext) -> dict:
    """Corpus, demonstrations and held-out sets as ``lm`` data, built once per context."""
    if "lm" not in ctx.cache:
        cfg, enc = ctx.cfg, ctx.enc
        eps = lm.smoothing_to_label_smoothing(cfg.pretrain.smoothing, enc.num_corpus_tokens, enc.vocab_size)
        held_corpus, held_demos = lm.heldout_data(enc)
        ctx.cache["lm"] = {
            "corpus": ctx.place(lm.make_data(enc.corpus_tokens, enc.corpus_mask, cfg.pretrain.batch_size, eps)),
            "demos": ctx.place(lm.make_data(enc.sft_tokens, enc.sft_mask, cfg.sft.batch_size)),
            "heldout_corpus": None if held_corpus is None else ctx.place(held_corpus),
            "heldout_demos": None if held_demos is None else ctx.place(held_demos),
        }
    return ctx.cache["lm"]
