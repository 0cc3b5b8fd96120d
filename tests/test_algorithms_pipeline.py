"""Every M2 algorithm of the stage table runs through the same pipeline: run, manifest,
summary, bitwise repeatability and exact resume (unigram family, tiny data)."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import TINY_CONFIG

from codex_jax.config import PipelineConfig, from_dict
from codex_jax.data.records import load_dataset
from codex_jax.run.pipeline import run_pipeline
from codex_jax.run.train import StopRequested
from codex_jax.stages.table import RL_STAGES, pipeline_stages

ALGORITHMS = {
    "grpo": {"iterations": 4, "rollouts": 8, "group_size": 4, "response_len": 4, "minibatches": 2, "log_every": 2},
    "rloo": {"iterations": 4, "rollouts": 8, "group_size": 4, "response_len": 4, "log_every": 2,
             "kl_estimator": "k2", "kl_placement": "loss"},
    "dpo": {"steps": 4, "batch_size": 4, "log_every": 2},
}


def config(algorithm: str, **top) -> PipelineConfig:
    data = {**copy.deepcopy(TINY_CONFIG), "algorithm": algorithm, "checkpoint_every": 2, **top}
    data[algorithm] = {**data.get(algorithm, {}), **ALGORITHMS.get(algorithm, {})}
    return from_dict(PipelineConfig, data)


def test_the_table_has_every_algorithm_of_the_config():
    assert set(RL_STAGES) == {"ppo", "grpo", "rloo", "dpo"}
    for name in RL_STAGES:
        stages = pipeline_stages(config(name))
        assert [s.name for s in stages] == ["M0", "M1", "RM", "M2"] and stages[-1].label == name


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_each_algorithm_runs_is_repeatable_and_resumes_exactly(tmp_path, tiny_data_dir, algorithm):
    cfg, dataset = config(algorithm), load_dataset(tiny_data_dir)
    first = run_pipeline(dataset, cfg, tmp_path / "a", progress=False)
    again = run_pipeline(dataset, cfg, tmp_path / "b", progress=False)
    assert first["fingerprints"] == again["fingerprints"]
    assert first["algorithm"] == algorithm and first["stages"]["M2"]["algorithm"] == algorithm
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["stages"]["M2"]["label"] == algorithm
    assert manifest["stages"]["M2"]["seed_independent"] is None
    objective = first["objective"]
    assert objective["exact"] and objective["U"] == pytest.approx(
        objective["alpha"] * objective["L_SFT"] + objective["beta"] * objective["L_RLHF"]
        + objective["gamma"] * objective["Omega"])
    with pytest.raises(StopRequested):
        run_pipeline(dataset, cfg, tmp_path / "c", progress=False, stop_after=(algorithm, 2))
    resumed = run_pipeline(dataset, cfg, tmp_path / "c", progress=False, resume=True)
    assert resumed["fingerprints"] == first["fingerprints"]
    other = run_pipeline(dataset, config(algorithm, seed=1), tmp_path / "d", progress=False)
    assert other["fingerprints"]["M2"] != first["fingerprints"]["M2"]


def test_grpo_reaches_the_analytic_optimum_on_the_pipeline_as_ppo_does(tmp_path, tiny_data_dir):
    """KL (k1) in the reward: the M2 of GRPO is pi* of the pipeline's own RM and reference."""
    grpo = {"iterations": 150, "rollouts": 256, "group_size": 8, "response_len": 4, "minibatches": 2,
            "log_every": 50, "kl_coef": 0.3, "optim": {"lr": 0.1, "schedule": "cosine"}}
    cfg = from_dict(PipelineConfig, {**copy.deepcopy(TINY_CONFIG), "algorithm": "grpo", "checkpoint_every": 0,
                                     "grpo": grpo})
    summary = run_pipeline(load_dataset(tiny_data_dir), cfg, tmp_path / "g", progress=False)
    m2 = summary["stages"]["M2"]
    assert m2["exact_before"]["tv_to_optimum"] > 0.05
    assert m2["exact_after"]["tv_to_optimum"] < 0.01
