"""Vmapped sweeps: member i of one compiled sweep equals a single run with its seed and
settings; the summary's mean/std are numpy's; the learning rate held in the optimiser
state trains exactly like a rate built into the optimiser."""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_CONFIG, write_dataset

from codex_jax.cli import sweep as cli_sweep
from codex_jax.config import OptimConfig, PipelineConfig, from_dict
from codex_jax.core import optim
from codex_jax.data.records import load_dataset
from codex_jax.errors import ConfigError
from codex_jax.run import artifacts, pipeline, sweep, sweep_report

SEEDS = [0, 1, 2]
# two KL coefficients, and learning rates away from the config's (PPO 0.1, RM 0.05)
SETTINGS = {"ppo.kl_coef": [0.1, 1.0], "ppo.lr": [0.05], "reward.lr": [0.2]}
EVAL_EVERY = 1


@pytest.fixture(scope="module")
def swept(tmp_path_factory, jax_cache_dir):
    # the persistent compilation cache, as `codex-jax run/sweep` use it: the single runs
    # below then reuse the compiled stages (settings are state leaves, not constants)
    jax.config.update("jax_compilation_cache_dir", str(jax_cache_dir / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    data = write_dataset(tmp_path_factory.mktemp("sweep-data"))
    cfg = from_dict(PipelineConfig, TINY_CONFIG)
    dataset = load_dataset(data)
    tokenizer, enc = pipeline.prepare(dataset, cfg)
    members = sweep.grid(SEEDS, SETTINGS)
    result = sweep.run_sweep(enc, tokenizer, cfg, members, eval_every=EVAL_EVERY)
    return {"cfg": cfg, "enc": enc, "tokenizer": tokenizer, "members": members, "result": result,
            "data": data}


def test_the_grid_is_settings_times_seeds_with_seeds_fastest():
    members = sweep.grid([3, 4], {"ppo.kl_coef": [0.5, 1.0], "ppo.lr": [0.1]})
    assert [(m.seed, m.settings_dict["ppo.kl_coef"]) for m in members] == [(3, 0.5), (4, 0.5), (3, 1.0), (4, 1.0)]
    cfg = sweep.member_config(PipelineConfig(), members[2])
    assert cfg.seed == 3 and cfg.ppo.kl_coef == 1.0 and cfg.ppo.optim.lr == 0.1
    with pytest.raises(ConfigError, match="unknown setting"):
        sweep.grid([0], {"ppo.clip": [0.1]})
    with pytest.raises(ConfigError, match="kl_coef"):
        sweep.member_config(PipelineConfig(), sweep.grid([0], {"ppo.kl_coef": [-1.0]})[0])


def test_each_stage_trains_only_its_distinct_inputs(swept):
    index = swept["result"]["index"]
    assert index["M0"].tolist() == [0] * 6  # exact pretraining: a closed form, once
    assert index["M1"].tolist() == [0, 1, 2] * 2  # SFT and RM depend on the seed only here
    assert index["RM"].tolist() == [0, 1, 2] * 2
    assert index["M2"].tolist() == list(range(6))


def test_member_i_of_the_sweep_equals_a_single_run_with_its_seed_and_settings(swept):
    result, cfg = swept["result"], swept["cfg"]
    assert len(swept["members"]) == 6
    for i, member in enumerate(swept["members"]):
        single = pipeline.run_stages(swept["enc"], swept["tokenizer"], sweep.member_config(cfg, member))
        for stage in sweep.STAGE_NAMES:
            got, want = sweep.member_params(result, stage, i), single["params"][stage]
            jax.tree_util.tree_map(
                lambda a, b, s=stage, i=i: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{i} {s}"),
                got, want)
        # the closed-form stage runs the same unbatched code: bit for bit
        assert result["fingerprints"][i]["M0"] == artifacts.fingerprint(single["params"]["M0"])
        for stage in sweep.STAGE_NAMES:
            flat_got = sweep_report.flatten_metrics(result["metrics"][i][stage])
            flat_want = sweep_report.flatten_metrics(single["metrics"][stage])
            assert flat_got.keys() == flat_want.keys()
            for k in flat_want:
                np.testing.assert_allclose(flat_got[k], flat_want[k], rtol=1e-4, atol=1e-5, err_msg=f"{stage}.{k}")
        np.testing.assert_allclose(result["objective"][i]["U"], single["objective"]["U"], rtol=1e-4)


def test_settings_reach_the_members(swept):
    result = swept["result"]
    for i, member in enumerate(swept["members"]):
        s = member.settings_dict
        assert result["metrics"][i]["M2"]["final_kl_coef"] == pytest.approx(s["ppo.kl_coef"])
        assert np.allclose(result["curves"]["ppo"]["kl_coef"][i], s["ppo.kl_coef"])
    # same seed, different KL coefficient: different policies
    assert result["fingerprints"][0]["M2"] != result["fingerprints"][3]["M2"]
    assert result["fingerprints"][0]["RM"] == result["fingerprints"][3]["RM"]
    ev = result["curves"]["ppo_eval"]
    assert ev["step"].tolist() == [0, 1, 2] and ev["tv_to_optimum"].shape == (6, 3)
    np.testing.assert_allclose(ev["tv_to_optimum"][:, -1],
                               [m["M2"]["exact_after"]["tv_to_optimum"] for m in result["metrics"]], rtol=1e-6)


def test_the_summary_mean_and_std_are_numpys_over_the_seeds(swept):
    result = swept["result"]
    rows = sweep_report.summarise(result)
    assert [r["settings"]["ppo.kl_coef"] for r in rows] == [0.1, 1.0]
    for row in rows:
        assert row["seeds"] == SEEDS
        for name in ("stages.M2.exact_after.tv_to_optimum", "objective.U", "stages.RM.train_accuracy",
                     "stages.M2.final_kl_coef"):
            path = name.split(".")
            values = []
            for i in row["members"]:
                node = {"stages": result["metrics"][i], "objective": result["objective"][i]}
                for p in path:
                    node = node[p]
                values.append(node)
            assert row["mean"][name] == pytest.approx(float(np.mean(values)), rel=1e-12)
            assert row["std"][name] == pytest.approx(float(np.std(values)), rel=1e-12, abs=1e-15)


def test_the_sweep_command_writes_members_and_summary(swept, tmp_path, tiny_config_path):
    parser = argparse.ArgumentParser()
    cli_sweep.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "sw"
    args = parser.parse_args(["sweep", "--seeds", "3", "--kl-coef", "0.1,1", "--lr", "0.05", "--rm-lr", "0.2",
                              "--eval-every", str(EVAL_EVERY), "--data", str(swept["data"]),
                              "--config", str(tiny_config_path), "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["num_members"] == 6 and record["seeds"] == SEEDS
    assert record["settings"] == {"ppo.kl_coef": [0.1, 1.0], "ppo.lr": [0.05], "reward.lr": [0.2]}
    assert record["distinct_states"] == {"M0": 1, "M1": 3, "RM": 3, "M2": 6}
    for i in range(6):
        member = json.loads((out / "members" / str(i) / "summary.json").read_text())
        assert member["seed"] == SEEDS[i % 3] and member["guard"] is None
        # the CLI sweep and the library sweep agree
        assert member["fingerprints"] == swept["result"]["fingerprints"][i]
    with np.load(out / "curves.npz") as npz:
        assert npz["ppo/kl"].shape == (6, 2) and npz["ppo_eval/tv_to_optimum"].shape == (6, 3)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_a_learning_rate_set_in_the_state_equals_one_built_with_it(name):
    ocfg = OptimConfig(name=name, lr=0.3, schedule="cosine", warmup_steps=2, weight_decay=0.01,
                       final_lr_fraction=0.1, grad_clip=0.5)
    params = {"w": jnp.linspace(-1.0, 1.0, 7), "b": jnp.ones(())}
    grads = {"w": jnp.sin(jnp.arange(7.0)), "b": jnp.asarray(0.7)}
    built = optim.make_optimizer(dataclasses.replace(ocfg, lr=0.02), 10)
    other = optim.make_optimizer(ocfg, 10)
    state_built = built.init(params)
    state_set = optim.set_learning_rate(other.init(params), 0.02)
    assert float(optim.get_learning_rate(state_set)) == np.float32(0.02)
    for _ in range(3):  # into the warm-up and past it
        u_built, state_built = jax.jit(built.update)(grads, state_built, params)
        u_set, state_set = jax.jit(other.update)(grads, state_set, params)
        jax.tree_util.tree_map(np.testing.assert_array_equal, u_built, u_set)
        params = optax.apply_updates(params, u_built)
    # a stacked state takes one rate per member
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), other.init(params))
    assert optim.set_learning_rate(stacked, [0.1, 0.2]).hyperparams["learning_rate"].tolist() == \
        pytest.approx([0.1, 0.2])
