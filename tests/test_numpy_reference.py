"""The NumPy reference in benchmarks/ is a faithful reference of the JAX pipeline.

On a tiny synthetic data set (built here from the data-layer dataclasses), both
implementations run the whole lineage once (module fixture) and must agree on what
does not depend on random draws: the exact M0, the RM's held-out accuracy on the same
held-out pairs, and PPO's convergence to the analytic KL-regularised optimum.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

from codex_jax.config import LMConfig, OptimConfig, PipelineConfig, PPOConfig, RewardConfig
from codex_jax.core.optim import learning_rate
from codex_jax.data.records import Corpus, Dataset, Demos, Prefs
from codex_jax.data.tokenizer import TokenizerConfig
from codex_jax.run import pipeline
from codex_jax.stages import reward

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import numpy_reference as nr  # noqa: E402

NEUTRAL = [f"n{i}" for i in range(24)]
GOOD = ["sorted", "return", "len", "strip", "join"]
BAD = ["eval", "system", "rmtree", "exec", "popen"]


def synthetic_dataset(seed: int = 0, n_pairs: int = 300, flip: float = 0.1) -> Dataset:
    """Skewed neutral words everywhere; a chosen response carries good words, a rejected
    one bad words, and a fraction ``flip`` of the pairs has the labels swapped."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(NEUTRAL) + 1)
    p /= p.sum()

    def words(n, extra=(), k=0):
        out = list(rng.choice(NEUTRAL, size=n, p=p))
        out += list(rng.choice(extra, size=k)) if k else []
        rng.shuffle(out)
        return " ".join(out)

    corpus = tuple(words(30, GOOD + BAD, 3) for _ in range(60))
    prompts = tuple(f"def f{i} ( x ) :" for i in range(40))
    demos = Demos(prompts=prompts, completions=tuple(words(10, GOOD, 3) for _ in prompts))
    pp, ch, rj = [], [], []
    for i in range(n_pairs):
        good, bad = words(8, GOOD, int(rng.integers(1, 4))), words(8, BAD, int(rng.integers(1, 4)))
        if rng.random() < flip:
            good, bad = bad, good
        pp.append(f"def h{i} ( y ) :")
        ch.append(good)
        rj.append(bad)
    return Dataset(corpus=Corpus(texts=corpus), demos=demos,
                   prefs=Prefs(prompts=tuple(pp), chosen=tuple(ch), rejected=tuple(rj)), source="synthetic")


CFG = PipelineConfig(
    tokenizer=TokenizerConfig(max_size=128),
    pretrain=LMConfig(mode="exact", smoothing=0.1),
    sft=LMConfig(steps=40, batch_size=16, log_every=20, optim=OptimConfig(lr=0.02)),
    reward=RewardConfig(steps=300, batch_size=64, heldout_fraction=0.3, log_every=100),
    ppo=PPOConfig(iterations=80, rollouts=128, response_len=8, log_every=40),
)


@pytest.fixture(scope="module")
def runs():
    tokenizer, enc = pipeline.prepare(synthetic_dataset(), CFG)
    captured = {}
    original = reward.split_pairs

    def spy(*args, **kwargs):  # the JAX run's held-out pairs, for the NumPy RM
        captured["split"] = original(*args, **kwargs)
        return captured["split"]

    reward.split_pairs = spy
    try:
        jax_res = pipeline.run_stages(enc, tokenizer, CFG)
    finally:
        reward.split_pairs = original
    np_res = nr.run_numpy_pipeline(enc, tokenizer, CFG, pair_split=captured["split"])
    return enc, jax_res, np_res


def test_exact_pretraining_matches_jax_m0(runs):
    enc, jax_res, np_res = runs
    p_jax = np.asarray(jax.nn.softmax(jax_res["params"]["M0"]["logits"]))
    p_np = np.exp(np_res["params"]["M0"]["logits"].astype(np.float64))
    assert p_np.shape == (enc.vocab_size,)
    np.testing.assert_allclose(p_np, p_jax, rtol=0, atol=1e-6)
    # and it is the smoothed MLE of the corpus counts
    counts = np.bincount(enc.corpus_tokens.ravel(), weights=enc.corpus_mask.ravel(), minlength=enc.vocab_size)
    a = CFG.pretrain.smoothing
    np.testing.assert_allclose(p_np, (counts + a) / (counts.sum() + a * enc.vocab_size), rtol=1e-6)


def test_reward_models_reach_the_same_heldout_accuracy(runs):
    _, jax_res, np_res = runs
    jax_rm, np_rm = jax_res["metrics"]["RM"], np_res["metrics"]["RM"]
    assert jax_rm["heldout_pairs"] == np_rm["heldout_pairs"] == 90
    # 10% flipped labels: a good model is right on ~90%, far from chance
    assert np_rm["heldout_accuracy"] >= 0.75, np_rm
    assert abs(jax_rm["heldout_accuracy"] - np_rm["heldout_accuracy"]) <= 0.05, (jax_rm, np_rm)
    assert abs(jax_rm["train_bt_loss"] - np_rm["train_bt_loss"]) <= 0.05, (jax_rm, np_rm)


def test_ppo_both_reach_the_kl_regularised_optimum(runs):
    _, jax_res, np_res = runs
    jax_end, np_end = jax_res["metrics"]["M2"]["exact_after"], np_res["metrics"]["M2"]["exact_after"]
    np_start = np_res["metrics"]["M2"]["exact_before"]
    assert np_start["tv_to_optimum"] > 0.1, np_start  # there was a way to go
    assert jax_end["tv_to_optimum"] <= 0.05, jax_end
    assert np_end["tv_to_optimum"] <= 0.05, np_end
    # the exact terms agree up to the RMs' and the samples' differences
    for k in ("L_SFT", "KL"):
        assert abs(jax_end[k] - np_end[k]) <= 0.15 * max(1.0, abs(jax_end[k])), (k, jax_end, np_end)


@pytest.mark.parametrize("schedule,warmup,name", [("cosine", 0, "adam"), ("constant", 3, "adamw"),
                                                  ("cosine", 2, "sgd")])
def test_numpy_optimizer_matches_optax(schedule, warmup, name):
    from codex_jax.core.optim import make_optimizer

    ocfg = OptimConfig(name=name, lr=0.1, schedule=schedule, warmup_steps=warmup, weight_decay=0.01,
                       final_lr_fraction=0.1, grad_clip=0.5)
    total = 12
    schedule_fn = jax.jit(learning_rate(ocfg, total))
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=7).astype(np.float32), "b": np.float32(0.3) * np.ones((), np.float32)}
    tx = make_optimizer(ocfg, total)
    update = jax.jit(lambda g, st, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, st, p)))
    state, p_jax = tx.init(params), dict(params)
    opt, p_np = nr.Optimizer(ocfg, total, params), dict(params)
    for step in range(total):
        g = {k: rng.normal(size=np.shape(v)).astype(np.float32) for k, v in params.items()}
        assert abs(nr.learning_rate(ocfg, total, step) - float(schedule_fn(step))) < 1e-7
        p_jax, state = update(g, state, p_jax)
        p_np = opt.apply(p_np, g)
    for k in params:
        np.testing.assert_allclose(p_np[k], np.asarray(p_jax[k]), rtol=1e-6, atol=1e-6)
    # a non-finite gradient changes nothing
    bad = {k: np.full(np.shape(v), np.nan, np.float32) for k, v in params.items()}
    after = opt.apply(p_np, bad)
    assert all(np.array_equal(after[k], p_np[k]) for k in params) and opt.skipped == 1
