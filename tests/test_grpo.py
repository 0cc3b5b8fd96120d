"""GRPO and Dr. GRPO against closed forms on the unigram family, naive reference loops,
and a planted reward on a tiny transformer.  Fixed points: experiments/FIXED_POINTS.md."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kl import (
    LOSS_PLACEMENT_RUN,
    TRANSFORMER_V,
    kl_optimum,
    planted_transformer_problem,
    probs,
    repetition_family,
    repetition_optimum,
    reverse_kl_optimum,
    rl_problem,
    train,
    tv,
)

from codex_jax.config import OptimConfig
from codex_jax.config.algorithms import GRPOConfig
from codex_jax.errors import ConfigError
from codex_jax.models import symbolic
from codex_jax.stages import group_rl, grpo, ppo

V = 8
G = 8


def _advantages_loop(rewards, group_size, baseline, scale):
    out = []
    for g in range(len(rewards) // group_size):
        rows = [float(x) for x in rewards[g * group_size:(g + 1) * group_size]]
        mean = sum(rows) / group_size
        std = (sum((x - mean) ** 2 for x in rows) / (group_size - 1)) ** 0.5
        for x in rows:
            a = x - mean if baseline == "mean" else x - (sum(rows) - x) / (group_size - 1)
            out.append(a / (std + group_rl.GROUP_STD_EPS) if scale else a)
    return np.array(out)


@pytest.mark.parametrize("baseline,scale", [("mean", True), ("mean", False), ("leave_one_out", False)])
def test_group_advantages_match_a_python_loop(baseline, scale):
    rewards = jax.random.normal(jax.random.PRNGKey(0), (24,))
    rewards = rewards.at[8:12].set(0.7)  # a group with no spread gets 0, not 0/0
    for group_size in (2, 4, 6):
        want = _advantages_loop(np.asarray(rewards), group_size, baseline, scale)
        got = group_rl.group_advantages(rewards, group_size, baseline, scale)
        jitted = jax.jit(group_rl.group_advantages, static_argnums=(1, 2, 3))(rewards, group_size, baseline, scale)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(got, jitted, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(group_rl.group_advantages(rewards, 4, baseline, scale))[8:12] == 0)


@pytest.mark.parametrize("length_normalise", [True, False])
def test_grpo_loss_matches_a_naive_loop(length_normalise):
    """Clipped surrogate with 1/|o_i| (GRPO) or 1/T (Dr. GRPO) token weights, plus the k3
    loss term, on ragged responses, against a loop over responses and tokens."""
    ref, rm, s, data, _ = rl_problem(V)
    cfg = GRPOConfig(rollouts=4, group_size=2, epochs=1, minibatches=1, response_len=5, clip=0.2, kl_coef=0.3,
                     kl_estimator="k3", kl_placement="loss", scale_rewards=length_normalise,
                     length_normalise=length_normalise)
    fam = symbolic.unigram_family(V)
    state = grpo.init(cfg, fam, ref, ref, rm, s)
    key = jax.random.PRNGKey(1)
    policy = {"logits": jax.random.normal(key, (V,))}
    old = {"logits": policy["logits"] + 0.4 * jax.random.normal(jax.random.fold_in(key, 1), (V,))}
    response = jax.random.randint(jax.random.fold_in(key, 2), (4, 5), 0, V)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], jnp.float32)
    adv = jnp.array([1.0, -0.5, 2.0, -1.5])
    mb = {"prompt": data["prompt"], "prompt_mask": data["prompt_mask"], "response": response, "mask": mask,
          "old_logp": fam.response_logprobs(old, None, None, response) * mask,
          "ref_logp": fam.response_logprobs(ref, None, None, response) * mask, "advantages": adv}
    loss, metrics = group_rl.loss_fn({"policy": policy}, state, mb)

    lp, lo, lr = (np.log(probs(x["logits"])) for x in (policy, old, ref))
    pg = kl_term = 0.0
    clipped = 0
    for i in range(4):
        n_i = int(mask[i].sum())
        weight = 1.0 / n_i if length_normalise else 1.0 / 5
        for t in range(n_i):
            y = int(response[i, t])
            rho = np.exp(lp[y] - lo[y])
            a = float(adv[i])
            pg -= weight * min(rho * a, np.clip(rho, 0.8, 1.2) * a) / 4
            log_r = lr[y] - lp[y]
            kl_term += weight * (np.exp(log_r) - 1 - log_r) / 4
            clipped += abs(rho - 1) > 0.2
    np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_loss"], kl_term, rtol=1e-5)
    np.testing.assert_allclose(loss, pg + 0.3 * kl_term, rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_fraction"], clipped / float(mask.sum()), rtol=1e-6)
    assert 0 < clipped < mask.sum()  # both branches of the clip are exercised


def _cfg(**kw):
    base = dict(iterations=300, rollouts=512, group_size=G, response_len=8, kl_coef=1.0,
                optim=OptimConfig(lr=0.05, schedule="cosine"))
    return base | kw


def test_k1_in_the_reward_reaches_the_kl_regularised_optimum():
    """At pi* every response has the same KL-regularised reward sum_t (r - beta log pi*/ref)
    = T beta log Z, so every advantage is 0 whatever the std scaling: pi* is GRPO's (and
    Dr. GRPO's) fixed point (FIXED_POINTS.md, section 4).  Clipped, 4 epochs x 4 minibatches."""
    ref, rm, s, data, r = rl_problem(V)
    state = grpo.init(GRPOConfig(**_cfg()), symbolic.unigram_family(V), ref, ref, rm, s)
    for beta in (0.25, 1.0):  # the coefficient is a state leaf: one compiled program
        target = kl_optimum(ref["logits"], r, beta)
        start = tv(probs(ref["logits"]), target)
        out, metrics = train(grpo, state, data, 300, kl_coef=beta)
        dist = tv(probs(out.params["policy"]["logits"]), target)
        print(f"grpo k1/reward beta={beta}: TV(pi, pi*) = {dist:.2e} (start {start:.3f})")
        assert start > 0.2 and dist <= 0.01, (start, dist)
        assert metrics["skipped"].sum() == 0


class BagOfWordsHostReward:
    """A host-side reward as the execution reward is called (``rl.task_reward`` through
    ``jax.pure_callback``): (prompt ids [B], responses [B, T]) -> f32 [B].  Here the planted
    sum_t w[y_t], computed in NumPy, and it records that every group shares one prompt id."""

    rm_weight, weight = 0.0, 1.0  # the host reward alone

    def __init__(self, w, group_size):
        self.w, self.group_size, self.calls = np.asarray(w, np.float32), group_size, 0

    def __call__(self, prompt_id, response):
        ids = np.asarray(prompt_id).reshape(-1, self.group_size)
        assert (ids == ids[:, :1]).all()  # rows g*G .. g*G + G - 1 answer the same prompt
        self.calls += 1
        return self.w[np.asarray(response)].sum(-1).astype(np.float32)


def test_a_host_reward_in_the_loop_reaches_the_same_optimum():
    """The execution-reward path (``state.host_reward``, prompt ids per group) with a host
    reward equal to the planted RM: GRPO lands on the same pi*."""
    ref, rm, s, data, r = rl_problem(V)
    data = {**data, "prompt": jnp.arange(4, dtype=jnp.int32)[:, None]}
    host = BagOfWordsHostReward(rm["w"], G)
    cfg = GRPOConfig(**_cfg(iterations=200))
    state = grpo.init(cfg, symbolic.unigram_family(V), ref, ref, {**rm, "w": jnp.zeros(V)}, s)  # RM unused
    out, metrics = train(grpo, state.replace(host_reward=host), data, cfg.iterations)
    dist = tv(probs(out.params["policy"]["logits"]), kl_optimum(ref["logits"], r, 1.0))
    print(f"grpo with a host reward: TV(pi, pi*) = {dist:.2e}")
    assert dist <= 0.01 and host.calls == cfg.iterations


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_loss_lands_on_each_estimators_fixed_point(estimator):
    """Dr. GRPO with the KL in the loss.  Its mean baseline includes the response itself,
    so the expected policy gradient is (G-1)/G grad E[R] and the fixed point is that of
    beta_eff = beta G / (G-1):  k2 -> pi*(beta_eff);  k3 -> argmax E[R] - beta_eff KL(ref||pi);
    k1 -> no pull at all: the unregularised optimum, made interior by a repetition
    penalty in the reward (water-filling, independent of beta)."""
    beta = 1.0
    beta_eff = beta * G / (G - 1)
    if estimator == "k1":
        ref, rm, s, data, r = rl_problem(V, w_scale=0.5, penalty=0.5)
        fam = repetition_family(V)
        target = repetition_optimum(r, 8)
    else:
        ref, rm, s, data, r = rl_problem(V)
        fam = symbolic.unigram_family(V)
        solve = kl_optimum if estimator == "k2" else reverse_kl_optimum
        target = solve(ref["logits"], r, beta_eff)
    cfg = GRPOConfig.dr_grpo(**_cfg(kl_estimator=estimator, kl_placement="loss", **LOSS_PLACEMENT_RUN))
    state = grpo.init(cfg, fam, ref, ref, rm, s)
    out, metrics = train(grpo, state, data, cfg.iterations)
    p = probs(out.params["policy"]["logits"])
    pi_star = kl_optimum(ref["logits"], r, beta)
    dist, start = tv(p, target), tv(probs(ref["logits"]), target)
    print(f"dr_grpo {estimator}/loss beta={beta}: TV to own fixed point {dist:.2e} (start {start:.3f}), "
          f"TV to pi*(beta) {tv(p, pi_star):.3f}")
    assert start > 0.2 and dist <= 0.01, (start, dist)
    assert tv(target, pi_star) > (0.02 if estimator == "k2" else 0.1)  # the test tells the fixed points apart
    assert np.isfinite(metrics["kl_loss"]).all() and metrics["skipped"].sum() == 0


def test_grpo_step_jit_agrees_with_eager_and_states_work_with_ppo_evaluation_and_controller():
    """One step eager vs jitted; a GRPO state through ``ppo.evaluate`` / ``ppo.sampled_objective``;
    the adaptive coefficient follows ``ppo.update_kl_coef`` on the sampled k1 KL; metrics."""
    ref, rm, s, data, _ = rl_problem(V)
    fam = symbolic.unigram_family(V)
    cfg = GRPOConfig(rollouts=16, group_size=4, response_len=6, epochs=2, minibatches=2, kl_coef=0.5,
                     kl_target=0.05, kl_horizon=100, kl_estimator="k3", kl_placement="loss")
    policy = {"logits": ref["logits"] + jax.random.normal(jax.random.PRNGKey(2), (V,))}
    state = grpo.init(cfg, fam, policy, ref, rm, s)
    key = jax.random.PRNGKey(15)
    batch = grpo.select_batch(state, data, key)
    assert batch["prompt"].shape == (16, 1)
    s_eager, m_eager = grpo.step(state, batch, key)
    step = jax.jit(grpo.step)
    s_jit, m_jit = step(state, batch, key)
    chex.assert_trees_all_close(s_eager.params, s_jit.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m_eager, m_jit, rtol=1e-4, atol=1e-6)
    s_other, _ = step(state, batch, jax.random.PRNGKey(16))
    assert not np.array_equal(s_other.params["policy"]["logits"], s_jit.params["policy"]["logits"])

    assert set(m_jit) >= {"kl_estimate", "kl", "rm_score", "safety_penalty", "kl_coef", "skipped", "exact_kl",
                          "kl_loss", "pg_loss", "clip_fraction", "approx_kl"}
    counts = jnp.arange(V, dtype=jnp.float32)
    exact = ppo.evaluate(state, counts)
    chex.assert_trees_all_close(exact, symbolic.exact_objective(policy, ref, rm, s, counts, 6, 0.5))
    np.testing.assert_allclose(m_jit["exact_kl"], exact["KL"], rtol=1e-6)  # of the rollout policy
    big = {"prompt": jnp.zeros((20_000, 1), jnp.int32), "prompt_mask": jnp.ones((20_000, 1))}
    sampled = ppo.sampled_objective(state, big, jax.random.PRNGKey(3))
    for name in ("L_RLHF", "KL", "safety"):
        np.testing.assert_allclose(sampled[name], exact[name], rtol=0.05, atol=0.03)
    # the controller (Ziegler et al.) on the sampled k1 KL, as PPO's, and "kl_coef" is the one used
    np.testing.assert_allclose(m_jit["kl_coef"], 0.5)
    np.testing.assert_allclose(s_jit.extras["kl_coef"], ppo.update_kl_coef(cfg, jnp.float32(0.5), m_jit["kl"]),
                               rtol=1e-6)
    assert float(m_jit["kl"]) > cfg.kl_target and float(s_jit.extras["kl_coef"]) > 0.5


def test_configs_name_the_field_and_value():
    with pytest.raises(ConfigError, match=r"GRPOConfig.group_size must divide rollouts \(10\), got 4"):
        GRPOConfig(rollouts=10, group_size=4, minibatches=1)
    with pytest.raises(ConfigError, match=r"GRPOConfig.kl_estimator .* got 'k4'"):
        GRPOConfig(kl_estimator="k4")
    with pytest.raises(ConfigError, match=r"GRPOConfig.kl_placement .* got 'advantage'"):
        GRPOConfig(kl_placement="advantage")
    with pytest.raises(ConfigError, match=r"GRPOConfig.group_size must be an integer >= 2, got 1"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match=r"GRPOConfig.clip .* got 0.0"):
        GRPOConfig(clip=0.0)
    assert GRPOConfig().variant == "grpo" and GRPOConfig.dr_grpo().variant == "dr_grpo"
    assert GRPOConfig(scale_rewards=False).variant == "custom"
    with pytest.raises(ConfigError, match="needs a GRPOConfig"):
        from codex_jax.config.algorithms import RLOOConfig
        ref, rm, s, _, _ = rl_problem(V)
        grpo.init(RLOOConfig(), symbolic.unigram_family(V), ref, ref, rm, s)


@pytest.mark.slow
def test_grpo_raises_a_planted_reward_on_a_transformer_repeatably_and_resumably():
    fam, planted, policy, data = planted_transformer_problem()
    cfg = GRPOConfig(iterations=24, rollouts=32, group_size=8, response_len=8, epochs=2, minibatches=2,
                     kl_coef=0.25, log_every=8, optim=OptimConfig(lr=1e-3))
    state = grpo.init(cfg, fam, policy, policy, planted, jnp.zeros(TRANSFORMER_V))
    out, m = train(grpo, state, data, 24)
    first, last = m["rm_score"][:3].mean(), m["rm_score"][-3:].mean()
    print(f"transformer grpo: rm_score {first:.2f} -> {last:.2f}, max kl {m['kl'].max():.2f}")
    assert last > first + 1.0, (first, last)
    assert m["kl"].max() < 12.0  # the context-free optimum's KL is 10 nats
    assert m["skipped"].sum() == 0 and "exact_kl" not in m
    again, _ = train(grpo, state, data, 24)
    chex.assert_trees_all_equal(out.params, again.params)
    half, _ = train(grpo, state, data, 12)
    resumed, _ = train(grpo, half, data, 12)
    chex.assert_trees_all_equal((out.params, out.opt_state, out.extras, out.step),
                                (resumed.params, resumed.opt_state, resumed.extras, resumed.step))
    other, _ = train(grpo, state, data, 24, seed=12)
    assert not np.array_equal(jax.tree_util.tree_leaves(other.params)[0], jax.tree_util.tree_leaves(out.params)[0])
