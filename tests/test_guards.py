"""Numerical guards and the key-reuse audit."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIG, write_dataset

from codex_jax.config import LMConfig, PipelineConfig, PPOConfig, from_dict
from codex_jax.data.records import load_dataset
from codex_jax.models import symbolic
from codex_jax.run import train as loop
from codex_jax.run.guards import GuardError
from codex_jax.run.pipeline import Runner, prepare, run_stages
from codex_jax.stages import lm, ppo
from codex_jax.stages.table import stage_by_label

V = 10


def _lm_data(label_smoothing=0.0):
    ids = jnp.arange(16, dtype=jnp.int32).reshape(4, 4) % V
    return lm.make_data(ids, jnp.ones((4, 4)), 2, label_smoothing)


def test_a_nan_gradient_skips_the_update_and_counts_it():
    fam = symbolic.unigram_family(V)
    state = lm.init(jax.random.key(0), LMConfig(batch_size=2), fam,
                    params={"logits": jnp.linspace(-1.0, 1.0, V)})
    bad = lm.select_batch(state, _lm_data(float("nan")), jax.random.key(1))
    new, metrics = jax.jit(lm.step)(state, bad, jax.random.key(2))
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)
    assert int(new.skipped) == 1 and int(metrics["skipped"]) == 1 and int(new.step) == 1
    good = lm.select_batch(new, _lm_data(), jax.random.key(1))
    newer, _ = jax.jit(lm.step)(new, good, jax.random.key(3))
    assert int(newer.skipped) == 1 and not np.array_equal(newer.params["logits"], state.params["logits"])


def test_consecutive_non_finite_updates_stop_the_run_with_a_clear_error():
    fam = symbolic.unigram_family(V)
    cfg = LMConfig(steps=20, batch_size=2, log_every=4)
    runner = Runner(cfg=PipelineConfig(max_consecutive_skips=3), progress=False)
    with pytest.raises(GuardError, match=r"sft step 3: 3 consecutive updates .*max_consecutive_skips=3"):
        runner.train(stage_by_label(runner.cfg, "sft"), lm.init(jax.random.key(0), cfg, fam),
                     _lm_data(float("inf")), jax.random.key(1), total=cfg.steps, log_every=cfg.log_every)


def _ppo_state(**overrides):
    k = jax.random.key(4)
    ref = {"logits": jax.random.normal(jax.random.fold_in(k, 1), (V,))}
    rm = {"w": 5.0 * jax.random.normal(jax.random.fold_in(k, 2), (V,)), "b": jnp.zeros(())}
    cfg = PPOConfig(**{"iterations": 30, "rollouts": 64, "response_len": 8, "kl_coef": 0.01,
                       "log_every": 5, **overrides})
    data = {"prompt": jnp.zeros((4, 1), jnp.int32), "prompt_mask": jnp.ones((4, 1)),
            "ptx_tokens": jnp.zeros((4, 2), jnp.int32), "ptx_mask": jnp.ones((4, 2))}
    return ppo.init(cfg, symbolic.unigram_family(V), ref, ref, rm, jnp.zeros(V)), data


def test_kl_guard_stops_or_skips():
    state, data = _ppo_state(max_kl=0.5, kl_guard="stop")
    runner = Runner(cfg=PipelineConfig(ppo=state.cfg), progress=False)
    with pytest.raises(GuardError, match=r"ppo iteration \d+: KL to the reference .* exceeds ppo.max_kl=0.5"):
        runner.train(stage_by_label(runner.cfg, "ppo"), state, data, jax.random.key(5), total=30, log_every=5)
    state, data = _ppo_state(max_kl=0.5, kl_guard="skip")
    final, records = loop.train(state, data, jax.random.key(5), total_steps=30, log_every=5,
                                step_fn=ppo.step, select_fn=ppo.select_batch, label="ppo", progress=False)
    skipped = [r for r in records if r["kl_skipped"]]
    assert skipped, "the policy never moved past the KL bound"
    assert all(r["kl"] > 0.5 for r in skipped) and all(r["kl"] <= 0.5 for r in records if not r["kl_skipped"])
    # once updates are skipped the policy stays put, so every later rollout is over the bound too
    first = skipped[0]["step"]
    assert all(r["kl_skipped"] for r in records if r["step"] >= first)


@pytest.fixture
def key_reuse_checker():
    jax.config.update("jax_debug_key_reuse", True)
    try:
        yield
    finally:
        jax.config.update("jax_debug_key_reuse", False)


def test_the_whole_pipeline_runs_clean_under_the_key_reuse_checker(tmp_path, key_reuse_checker):
    cfg = from_dict(PipelineConfig, {**TINY_CONFIG, "pretrain": {"mode": "gradient", "steps": 2,
                                                                  "batch_size": 2, "log_every": 1}})
    tokenizer, enc = prepare(load_dataset(write_dataset(tmp_path)), cfg)
    results = run_stages(enc, tokenizer, cfg)
    assert set(results["params"]) == {"M0", "M1", "RM", "M2"}


def test_a_planted_key_reuse_is_caught(key_reuse_checker):
    from jax.errors import KeyReuseError

    fam = symbolic.unigram_family(V)
    state = lm.init(jax.random.key(0), LMConfig(batch_size=2), fam)

    def reusing_step(state, batch, key):
        noise = jax.random.normal(key, (V,)) + jax.random.normal(key, (V,))  # the planted reuse
        return lm.step(state.replace(params={"logits": state.params["logits"] + noise}), batch, key)

    with pytest.raises(KeyReuseError):
        loop.run_steps(state, _lm_data(), jax.random.key(1), step_fn=reusing_step,
                       select_fn=lm.select_batch, num_steps=2)
