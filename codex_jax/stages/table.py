"""The stage table: the pipeline's stages, declared once.

``run`` / ``--resume`` / ``--stop-after`` (``run.driver``), ``sweep``, the manifest,
the summary and (through the manifest) ``audit`` all iterate ``pipeline_stages(cfg)``.
Each entry names the stage, its config section, the stages whose parameters it
starts from, the data it trains on (manifest data hashes), the settings a sweep may
vary in it, and its module, which exports init / select_batch / step / evaluate and
the host-side setup / report / export / seed_independence (``stages.context``).

Adding an algorithm = one module in ``stages/``, one entry in ``RL_STAGES`` (or
``BASE_STAGES``), one config section, its tests.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Mapping

from codex_jax.errors import ConfigError
from codex_jax.stages import dpo, grpo, ppo, pretrain, reward, rloo, sft


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # "M0": the model it produces (params/<name>.npz, manifest, summary)
    label: str  # "pretrain": key purpose, checkpoint directory, metrics.jsonl "stage"
    module: ModuleType
    section: str  # its config section (PipelineConfig attribute)
    starts_from: tuple[str, ...] = ()  # stages whose exported params it reads
    data: tuple[str, ...] = ()  # data hashes it depends on (``run.pipeline.data_hashes``)
    settings: tuple[str, ...] = ()  # sweepable settings ("lr" and the module's SWEEP_SETTERS)
    seeded_data: bool = False  # its data depend on its key (a sweep stacks them per member)

    @property
    def show(self) -> tuple[str, ...]:
        return self.module.SHOW

    def config(self, cfg: Any) -> Any:
        return getattr(cfg, self.section)


BASE_STAGES = (
    Stage("M0", "pretrain", pretrain, "pretrain", (), ("corpus", "heldout"), ("lr",)),
    Stage("M1", "sft", sft, "sft", ("M0",), ("demos", "heldout"), ("lr",)),
    Stage("RM", "reward", reward, "reward", (), ("prefs",), ("lr",), seeded_data=True),
)
RL_STAGES: Mapping[str, Stage] = {
    "ppo": Stage("M2", "ppo", ppo, "ppo", ("M0", "M1", "RM"), ("demos", "prefs"),
                 ("lr", "kl_coef", "safety_penalty")),
    "grpo": Stage("M2", "grpo", grpo, "grpo", ("M0", "M1", "RM"), ("demos", "prefs"),
                  ("lr", "kl_coef", "safety_penalty")),
    "rloo": Stage("M2", "rloo", rloo, "rloo", ("M0", "M1", "RM"), ("demos", "prefs"),
                  ("lr", "kl_coef", "safety_penalty")),
    # DPO trains on the pairs (split by its key); it reads RM only for the objective report
    "dpo": Stage("M2", "dpo", dpo, "dpo", ("M0", "M1", "RM"), ("prefs",), ("lr",), seeded_data=True),
}
STAGE_NAMES = ("M0", "M1", "RM", "M2")
LABELS = ("pretrain", "sft", "reward") + tuple(RL_STAGES)


def pipeline_stages(cfg: Any) -> tuple[Stage, ...]:
    """The stages a config runs, in order: M0, M1, RM, then M2 by ``cfg.algorithm``."""
    algorithm = cfg.algorithm
    if algorithm not in RL_STAGES:
        raise ConfigError(f"algorithm must be one of {tuple(RL_STAGES)}, got {algorithm!r}")
    return BASE_STAGES + (RL_STAGES[algorithm],)


def stage_by_label(cfg: Any, label: str) -> Stage:
    for stage in pipeline_stages(cfg):
        if stage.label == label:
            return stage
    raise ConfigError(f"no stage {label!r} in this run (stages: "
                      f"{', '.join(s.label for s in pipeline_stages(cfg))})")


def objective(cfg: Any, metrics: Mapping[str, Any], exact: bool) -> dict:
    """U = alpha L_SFT + beta L_RLHF + gamma Omega from the final stage's "exact_after"
    terms (exact for the unigram, sampled otherwise); one function for run and sweep."""
    a, o = metrics["M2"]["exact_after"], cfg.objective
    omega = a["KL"] + a["safety"]
    return {"L_SFT": a["L_SFT"], "L_RLHF": a["L_RLHF"], "Omega": omega,
            "U": o.alpha * a["L_SFT"] + o.beta * a["L_RLHF"] + o.gamma * omega,
            "alpha": o.alpha, "beta": o.beta, "gamma": o.gamma, "exact": exact}
