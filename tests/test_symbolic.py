"""The symbolic family against its closed forms: every optimum is known exactly."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.config import LMConfig, OptimConfig, PPOConfig, RewardConfig
from codex_jax.models import symbolic
from codex_jax.run import train as loop
from codex_jax.stages import lm, ppo, reward

V = 12


def _rows(key, n_rows=32, length=16, vocab=V, skew=2.0):
    """Token rows from a skewed unigram with a ragged padding mask."""
    logits = skew * jax.random.normal(jax.random.fold_in(key, 0), (vocab,))
    ids = jax.random.categorical(jax.random.fold_in(key, 1), logits, shape=(n_rows, length))
    lengths = jax.random.randint(jax.random.fold_in(key, 2), (n_rows, 1), 1, length + 1)
    mask = (jnp.arange(length)[None] < lengths).astype(jnp.float32)
    return np.asarray(ids, np.int32), np.asarray(mask)


def test_exact_pretraining_equals_normalised_smoothed_counts():
    ids, mask = _rows(jax.random.PRNGKey(0))
    a = 0.5
    counts = collections.Counter(int(i) for i, m in zip(ids.ravel(), mask.ravel()) if m)
    n = sum(counts.values())
    expect = np.array([(counts[v] + a) / (n + a * V) for v in range(V)])
    fam = symbolic.unigram_family(V)
    state = lm.fit_exact(jax.random.PRNGKey(1), LMConfig(mode="exact", smoothing=a), fam,
                         lm.make_data(ids, mask, 8))
    np.testing.assert_allclose(jax.nn.softmax(state.params["logits"]), expect, rtol=1e-5)


def test_gradient_pretraining_reaches_the_exact_solution():
    ids, mask = _rows(jax.random.PRNGKey(3))
    a = 0.5
    fam = symbolic.unigram_family(V)
    eps = lm.smoothing_to_label_smoothing(a, float(mask.sum()), V)
    cfg = LMConfig(mode="gradient", steps=600, batch_size=ids.shape[0], smoothing=a, log_every=600,
                   optim=OptimConfig(lr=0.1, schedule="cosine"))
    data = lm.make_data(ids, mask, cfg.batch_size, eps)
    exact = lm.fit_exact(jax.random.PRNGKey(0), cfg, fam, data)
    state = lm.init(jax.random.PRNGKey(0), cfg, fam)
    state, _ = loop.train(state, data, jax.random.PRNGKey(4), total_steps=cfg.steps, log_every=cfg.log_every,
                          step_fn=lm.step, select_fn=lm.select_batch, label="pretrain", progress=False)
    err = np.max(np.abs(jax.nn.softmax(state.params["logits"]) - jax.nn.softmax(exact.params["logits"])))
    assert err <= 1e-3, err
    # and the closed form is a stationary point of the smoothed full-data loss
    grad = jax.grad(lambda p: lm.loss_fn(p, fam, data)[0])(exact.params)
    assert float(jnp.max(jnp.abs(grad["logits"]))) < 1e-5


def test_minibatch_gradients_sum_to_the_full_data_gradient_over_an_epoch():
    """With the data-set constant ``denom``, the batches of one epoch add up to exactly
    (batches per epoch) x the full-data gradient: minibatch training has the same optimum."""
    ids, mask = _rows(jax.random.PRNGKey(19))
    fam = symbolic.unigram_family(V)
    params = {"logits": jax.random.normal(jax.random.PRNGKey(20), (V,))}
    full = lm.make_data(ids, mask, ids.shape[0], 0.1)
    g_full = jax.grad(lambda p: lm.loss_fn(p, fam, full)[0])(params)["logits"]
    data = lm.make_data(ids, mask, 8, 0.1)
    state = lm.init(jax.random.PRNGKey(0), LMConfig(batch_size=8), fam, params=params)
    total = jnp.zeros(V)
    for i in range(4):  # 32 rows / 8 = 4 batches per epoch
        batch = lm.select_batch(state.replace(step=jnp.int32(i)), data, jax.random.PRNGKey(21))
        total = total + jax.grad(lambda p: lm.loss_fn(p, fam, batch)[0])(params)["logits"]
    np.testing.assert_allclose(total, 4 * g_full, rtol=1e-4, atol=1e-6)


def _planted_pairs(key, n, vocab=40, length=10):
    """Random bags of tokens labelled by a planted reward direction w_true."""
    w_true = jax.random.normal(jax.random.fold_in(key, 0), (vocab,))
    a = jax.random.randint(jax.random.fold_in(key, 1), (n, length), 0, vocab)
    b = jax.random.randint(jax.random.fold_in(key, 2), (n, length), 0, vocab)
    a_wins = (w_true[a].sum(-1) > w_true[b].sum(-1))[:, None]
    chosen, rejected = jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)
    ones = jnp.ones((n, length), jnp.float32)
    pairs = {"prompt": jnp.zeros((n, 1), jnp.int32), "prompt_mask": jnp.ones((n, 1)),
             "chosen": chosen, "chosen_mask": ones, "rejected": rejected, "rejected_mask": ones}
    return w_true, pairs


def test_reward_model_recovers_a_planted_direction():
    vocab = 40
    w_true, pairs = _planted_pairs(jax.random.PRNGKey(5), 3000, vocab)
    train = jax.tree_util.tree_map(lambda x: x[:2500], pairs)
    held = jax.tree_util.tree_map(lambda x: x[2500:], pairs)
    fam = symbolic.unigram_family(vocab)
    cfg = RewardConfig(steps=400, batch_size=128, l2=1e-4, log_every=100)
    state = reward.init(jax.random.PRNGKey(6), cfg, fam)
    state, _ = loop.train(state, train, jax.random.PRNGKey(7), total_steps=cfg.steps, log_every=cfg.log_every,
                          step_fn=reward.step, select_fn=reward.select_batch, label="reward", progress=False)
    acc = float(reward.evaluate(state.params, fam, held)["accuracy"])
    assert acc >= 0.95, acc
    w = np.asarray(state.params["w"])
    cos = np.dot(w, w_true) / np.linalg.norm(w) / np.linalg.norm(w_true)
    assert cos > 0.9, cos


def test_reward_scores_match_a_loop_and_never_build_a_dense_bag_of_words():
    key = jax.random.PRNGKey(8)
    params = {"w": jax.random.normal(key, (V,)), "b": jnp.asarray(0.7)}
    ids, mask = _rows(jax.random.PRNGKey(9), n_rows=5, length=7)
    got = np.asarray(symbolic.reward_token_scores(params, None, None, ids, mask).sum(-1))
    w = np.asarray(params["w"])
    for row, m, g in zip(ids, mask, got):
        assert abs(g - (0.7 + sum(w[i] for i, mm in zip(row, m) if mm))) < 1e-5
    # the gradient of the BT loss must not materialise a [pairs, V] array
    n_pairs, vocab = 64, 1000
    _, pairs = _planted_pairs(jax.random.PRNGKey(10), n_pairs, vocab)
    big = symbolic.unigram_family(vocab)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: reward.loss_fn(p, big, pairs, 1e-4)[0]))(
        big.init_reward(key))
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert not any(len(s) >= 2 and s[0] == n_pairs and s[-1] == vocab for s in shapes)


def _ppo_problem(kl_coef, seed=0, vocab=8):
    k = jax.random.PRNGKey(seed)
    ref = {"logits": jax.random.normal(jax.random.fold_in(k, 1), (vocab,))}
    rm = {"w": jax.random.normal(jax.random.fold_in(k, 2), (vocab,)), "b": jnp.zeros(())}
    penalty = ppo.penalty_vector(vocab, [3], 1.0)
    data = {"prompt": jnp.zeros((4, 1), jnp.int32), "prompt_mask": jnp.ones((4, 1)),
            "ptx_tokens": jnp.zeros((4, 2), jnp.int32), "ptx_mask": jnp.ones((4, 2))}
    return ref, rm, penalty, data


@pytest.mark.parametrize("kl_coef", [0.25, 1.0])
def test_ppo_converges_to_the_analytic_kl_regularised_optimum(kl_coef):
    vocab = 8
    ref, rm, penalty, data = _ppo_problem(kl_coef, vocab=vocab)
    cfg = PPOConfig(iterations=200, rollouts=256, response_len=8, kl_coef=kl_coef, log_every=100,
                    optim=OptimConfig(lr=0.05, schedule="cosine"))
    fam = symbolic.unigram_family(vocab)
    state = ppo.init(cfg, fam, ref, ref, rm, penalty)
    optimum = symbolic.kl_regularised_optimum(ref["logits"], rm["w"], penalty, kl_coef)
    start_tv = float(symbolic.total_variation(state.params["policy"]["logits"], optimum))
    state, records = loop.train(state, data, jax.random.PRNGKey(11), total_steps=cfg.iterations,
                                log_every=cfg.log_every, step_fn=ppo.step, select_fn=ppo.select_batch,
                                label="ppo", progress=False)
    tv = float(symbolic.total_variation(state.params["policy"]["logits"], optimum))
    assert start_tv > 0.2 and tv <= 0.02, (start_tv, tv)
    assert all(r["skipped"] == 0 for r in records)


def test_exact_objective_matches_monte_carlo_estimates():
    vocab, T = 8, 6
    ref, rm, penalty, _ = _ppo_problem(1.0, vocab=vocab)
    fam = symbolic.unigram_family(vocab)
    policy = {"logits": jax.random.normal(jax.random.PRNGKey(12), (vocab,))}
    demo_counts = jnp.arange(vocab, dtype=jnp.float32)
    exact = symbolic.exact_objective(policy, ref, rm, penalty, demo_counts, T, 1.0)
    y = fam.sample(policy, jax.random.PRNGKey(13), jnp.zeros((200_000, 1), jnp.int32), None, T)
    ones = jnp.ones(y.shape)
    r = fam.reward_token_scores(rm, None, None, y, ones).sum(-1)
    kl = (fam.response_logprobs(policy, None, None, y) - fam.response_logprobs(ref, None, None, y)).sum(-1)
    np.testing.assert_allclose(-r.mean(), exact["L_RLHF"], rtol=0.02, atol=0.02)
    np.testing.assert_allclose(kl.mean(), exact["KL"], rtol=0.03, atol=0.02)
    np.testing.assert_allclose(penalty[y].sum(-1).mean(), exact["safety"], rtol=0.03, atol=0.01)
    logp = np.log(np.asarray(jax.nn.softmax(policy["logits"])))
    np.testing.assert_allclose(exact["L_SFT"], -(np.arange(vocab) * logp).sum() / np.arange(vocab).sum(),
                               rtol=1e-5)


def test_inverse_cdf_sampling_matches_the_distribution_and_skips_zero_mass():
    logits = jnp.array([0.0, -jnp.inf, 1.0, 2.0, -jnp.inf])
    y = symbolic.sample({"logits": logits}, jax.random.PRNGKey(14), jnp.zeros((100_000, 1), jnp.int32), None, 4)
    freq = np.bincount(np.asarray(y).ravel(), minlength=5) / y.size
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits)), atol=5e-3)
    assert freq[1] == 0 and freq[4] == 0


def test_adaptive_kl_controller_follows_ziegler():
    cfg = PPOConfig(kl_target=6.0, kl_horizon=1000, rollouts=512)
    beta = jnp.asarray(0.5)
    for kl, err in [(12.0, 0.2), (6.6, 0.1), (3.0, -0.2), (6.0, 0.0)]:
        np.testing.assert_allclose(ppo.update_kl_coef(cfg, beta, kl), 0.5 * (1 + err * 512 / 1000), rtol=1e-6)
    assert float(ppo.update_kl_coef(PPOConfig(), beta, 100.0)) == 0.5  # fixed without a target


def test_ppo_step_jit_and_no_jit_agree_and_seeds_matter():
    vocab = 8
    ref, rm, penalty, data = _ppo_problem(0.5, vocab=vocab)
    cfg = PPOConfig(iterations=2, rollouts=32, response_len=4, minibatches=2, ptx_coef=0.1, ptx_batch_size=2)
    state = ppo.init(cfg, symbolic.unigram_family(vocab), ref, ref, rm, penalty)
    key = jax.random.PRNGKey(15)
    batch = ppo.select_batch(state, data, key)
    s_eager, m_eager = ppo.step(state, batch, key)
    s_jit, m_jit = jax.jit(ppo.step)(state, batch, key)
    chex.assert_trees_all_close(s_eager.params["policy"], s_jit.params["policy"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m_eager, m_jit, rtol=1e-4, atol=1e-6)
    s_other, _ = jax.jit(ppo.step)(state, batch, jax.random.PRNGKey(16))
    assert not np.array_equal(s_other.params["policy"]["logits"], s_jit.params["policy"]["logits"])


def test_ptx_demonstrations_move_the_policy_only_when_ptx_coef_is_positive():
    """At ptx_coef = 0 the demonstration term is out of the gradient (not 0 * L_SFT):
    other demonstrations leave the update bit for bit unchanged, and their loss is
    still reported; at ptx_coef > 0 they change it."""
    vocab = 8
    ref, rm, penalty, data = _ppo_problem(0.5, vocab=vocab)
    key = jax.random.PRNGKey(17)
    for coef in (0.0, 0.5):
        cfg = PPOConfig(iterations=2, rollouts=32, response_len=4, minibatches=2, ptx_coef=coef, ptx_batch_size=2)
        state = ppo.init(cfg, symbolic.unigram_family(vocab), ref, ref, rm, penalty)
        batch = ppo.select_batch(state, data, key)
        other = {**batch, "ptx_tokens": (batch["ptx_tokens"] + 3) % vocab}
        (a, ma), (b, mb) = jax.jit(ppo.step)(state, batch, key), jax.jit(ppo.step)(state, other, key)
        assert np.isfinite(ma["ptx_loss"]) and ma["ptx_loss"] != mb["ptx_loss"]
        same = np.array_equal(a.params["policy"]["logits"], b.params["policy"]["logits"])
        assert same == (coef == 0.0), coef


def test_chunked_training_is_bitwise_equal_to_one_chunk():
    """Keys and batches depend on the absolute step only, so chunking changes nothing."""
    ids, mask = _rows(jax.random.PRNGKey(17))
    fam = symbolic.unigram_family(V)
    cfg = LMConfig(steps=12, batch_size=8, log_every=12)
    data = lm.make_data(ids, mask, cfg.batch_size)
    run = lambda every: loop.train(lm.init(jax.random.PRNGKey(0), cfg, fam), data, jax.random.PRNGKey(18),  # noqa: E731
                                   total_steps=12, log_every=every, step_fn=lm.step, select_fn=lm.select_batch,
                                   label="sft", progress=False)[0]
    one, chunked = run(12), run(5)
    chex.assert_trees_all_equal(one.params, chunked.params)
    chex.assert_trees_all_equal(one.opt_state, chunked.opt_state)


@pytest.mark.parametrize("estimator,target", [("k2", "pi*"), ("k3", "pi_k3")])
def test_ppo_with_the_kl_in_the_loss_lands_on_its_estimators_fixed_point(estimator, target):
    """PPO, KL as a loss term with the gradient through log pi (un-whitened per-token
    advantages, SGD): k2 optimises KL(pi||ref) -> pi*; k3 optimises KL(ref||pi) -> pi_k3."""
    from test_kl import reverse_kl_optimum

    vocab, beta = 8, 1.0
    ref, rm, penalty, data = _ppo_problem(beta, vocab=vocab)
    cfg = PPOConfig(iterations=300, rollouts=1024, response_len=8, kl_coef=beta, log_every=100, epochs=1,
                    minibatches=1, whiten_advantages=False, kl_estimator=estimator, kl_placement="loss",
                    optim=OptimConfig(name="sgd", lr=2.0, schedule="cosine"))
    fam = symbolic.unigram_family(vocab)
    state = ppo.init(cfg, fam, ref, ref, rm, penalty)
    pi_star = symbolic.kl_regularised_optimum(ref["logits"], rm["w"], penalty, beta)
    want = pi_star if target == "pi*" else jnp.log(jnp.asarray(
        reverse_kl_optimum(np.asarray(ref["logits"]), np.asarray(rm["w"] - penalty), beta), jnp.float32))
    state, records = loop.train(state, data, jax.random.PRNGKey(21), total_steps=cfg.iterations,
                                log_every=cfg.log_every, step_fn=ppo.step, select_fn=ppo.select_batch,
                                label="ppo", progress=False)
    tv = float(symbolic.total_variation(state.params["policy"]["logits"], want))
    print(f"PPO {estimator} in the loss: TV to its fixed point {tv:.4f}, to pi* "
          f"{float(symbolic.total_variation(state.params['policy']['logits'], pi_star)):.4f}")
    assert tv <= 0.01, tv
    assert "exact_kl" in records[-1] and "kl_estimate" in records[-1]
