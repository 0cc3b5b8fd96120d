"""RLOO against closed forms on the unigram family, a naive REINFORCE loop, and a planted
reward on a tiny transformer.  Fixed points: experiments/FIXED_POINTS.md."""

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
from codex_jax.config.algorithms import GRPOConfig, RLOOConfig
from codex_jax.core import optim
from codex_jax.core.scan import run_steps
from codex_jax.errors import ConfigError
from codex_jax.models import symbolic
from codex_jax.stages import group_rl, grpo, rloo

V = 8
G = 8


def test_rloo_gradient_is_the_naive_reinforce_estimate_with_a_leave_one_out_baseline():
    """epochs = minibatches = 1, clip None: the update's gradient is, exactly,
    -(1/(B T)) sum_i A_i sum_t grad log pi(y_it), A_i = R_i - mean_{j != i} R_j,
    R_i = sum_t (w - s - beta log(pi/ref))(y_it), computed here in a Python loop."""
    ref, rm, s, data, r = rl_problem(V)
    beta, k, t = 0.7, 4, 6
    cfg = RLOOConfig(rollouts=16, group_size=k, response_len=t, kl_coef=beta)
    policy = {"logits": ref["logits"] + jax.random.normal(jax.random.PRNGKey(1), (V,))}
    state = rloo.init(cfg, symbolic.unigram_family(V), policy, ref, rm, s)
    key = jax.random.PRNGKey(2)
    roll = rloo.rollout(state, rloo.select_batch(state, data, key), key)
    mb = {name: roll[name] for name in group_rl.MINIBATCH_FIELDS}
    grads, _ = jax.grad(rloo.loss_fn, has_aux=True)({"policy": policy}, state, mb)

    pi, q = probs(policy["logits"]), probs(ref["logits"])
    y = np.asarray(roll["response"])
    rewards = [sum(r[v] - beta * np.log(pi[v] / q[v]) for v in row) for row in y]
    want = np.zeros(V)
    for i, row in enumerate(y):
        group = rewards[(i // k) * k:(i // k + 1) * k]
        adv = rewards[i] - (sum(group) - rewards[i]) / (k - 1)
        for v in row:
            want -= adv * (np.eye(V)[v] - pi) / (len(y) * t)
    np.testing.assert_allclose(grads["policy"]["logits"], want, rtol=1e-4, atol=1e-6)


def test_rloo_is_dr_grpo_scaled_by_g_over_g_minus_1():
    """On the same rollout, RLOO's first update direction is G/(G-1) times Dr. GRPO's
    (leave-one-out = G/(G-1) x mean-centred; both weight tokens 1/T)."""
    ref, rm, s, data, _ = rl_problem(V)
    fam = symbolic.unigram_family(V)
    common = dict(rollouts=16, group_size=4, response_len=6, kl_coef=0.7, epochs=1, minibatches=1)  # shapes as above
    a = rloo.init(RLOOConfig(**common), fam, ref, ref, rm, s)
    b = grpo.init(GRPOConfig.dr_grpo(**common), fam, ref, ref, rm, s)
    key = jax.random.PRNGKey(3)
    batch = rloo.select_batch(a, data, key)
    ra, rb = rloo.rollout(a, batch, key), grpo.rollout(b, batch, key)
    np.testing.assert_array_equal(ra["response"], rb["response"])
    np.testing.assert_allclose(ra["advantages"], rb["advantages"] * 4 / 3, rtol=1e-5, atol=1e-6)
    grad = lambda st, ro: jax.grad(group_rl.loss_fn, has_aux=True)(  # noqa: E731
        st.params, st, {n: ro[n] for n in group_rl.MINIBATCH_FIELDS})[0]["policy"]["logits"]
    np.testing.assert_allclose(grad(a, ra), grad(b, rb) * 4 / 3, rtol=1e-5, atol=1e-7)


def test_k1_in_the_reward_reaches_the_kl_regularised_optimum():
    """Plain REINFORCE (RLOO's defaults: one update per rollout, no clip) with k1 in the
    reward: an unbiased estimate of grad (E[R] - beta KL(pi || ref)), fixed point pi*."""
    ref, rm, s, data, r = rl_problem(V)
    cfg = RLOOConfig(iterations=500, rollouts=512, group_size=G, response_len=8,
                     optim=OptimConfig(lr=0.1, schedule="cosine"))
    state = rloo.init(cfg, symbolic.unigram_family(V), ref, ref, rm, s)
    for beta in (0.25, 1.0):
        target = kl_optimum(ref["logits"], r, beta)
        start = tv(probs(ref["logits"]), target)
        out, metrics = train(rloo, state, data, cfg.iterations, kl_coef=beta)
        dist = tv(probs(out.params["policy"]["logits"]), target)
        print(f"rloo k1/reward beta={beta}: TV(pi, pi*) = {dist:.2e} (start {start:.3f})")
        assert start > 0.2 and dist <= 0.01, (start, dist)
        assert metrics["skipped"].sum() == 0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_loss_lands_on_each_estimators_fixed_point(estimator):
    """The leave-one-out baseline is unbiased, so with the KL in the loss the expected
    update is grad E[R] - beta E[grad k]: k2 -> pi*(beta) exactly; k3 -> argmax E[R] -
    beta KL(ref || pi); k1 -> the unregularised optimum (repetition-penalty reward)."""
    beta = 1.0
    if estimator == "k1":
        ref, rm, s, data, r = rl_problem(V, w_scale=0.5, penalty=0.5)
        fam = repetition_family(V)
        target = repetition_optimum(r, 8)
    else:
        ref, rm, s, data, r = rl_problem(V)
        fam = symbolic.unigram_family(V)
        target = (kl_optimum if estimator == "k2" else reverse_kl_optimum)(ref["logits"], r, beta)
    cfg = RLOOConfig(group_size=G, response_len=8, kl_coef=beta, kl_estimator=estimator, kl_placement="loss",
                     **LOSS_PLACEMENT_RUN)
    out, metrics = train(rloo, rloo.init(cfg, fam, ref, ref, rm, s), data, cfg.iterations)
    p = probs(out.params["policy"]["logits"])
    pi_star = kl_optimum(ref["logits"], r, beta)
    dist, start = tv(p, target), tv(probs(ref["logits"]), target)
    print(f"rloo {estimator}/loss beta={beta}: TV to own fixed point {dist:.2e} (start {start:.3f}), "
          f"TV to pi*(beta) {tv(p, pi_star):.3f}")
    assert start > 0.2 and dist <= 0.01, (start, dist)
    if estimator != "k2":
        assert tv(target, pi_star) > 0.1
    assert metrics["skipped"].sum() == 0


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_k2_and_k3_in_the_reward_are_not_regularisers(estimator):
    """As a stop-gradient reward penalty, k2 / k3 ascend E[R] - beta sum_v Phi(pi_v) with
    Phi' = k, which is concave where pi_v < pi_ref(v): a token that falls below its
    reference is penalised for it and pushed further down.  The policy collapses onto a
    subset, dropping tokens pi* keeps, even its most likely one (FIXED_POINTS.md, section 4)."""
    ref, rm, s, data, r = rl_problem(V)
    cfg = RLOOConfig(iterations=300, rollouts=512, group_size=G, response_len=8, kl_estimator=estimator,
                     optim=OptimConfig(lr=0.1, schedule="cosine"))
    out, metrics = train(rloo, rloo.init(cfg, symbolic.unigram_family(V), ref, ref, rm, s), data, cfg.iterations)
    p, pi_star = probs(out.params["policy"]["logits"]), kl_optimum(ref["logits"], r, 1.0)
    dropped = (p < 1e-3) & (pi_star > 0.02)
    print(f"rloo {estimator}/reward: dropped tokens {np.flatnonzero(dropped).tolist()}, TV to pi* {tv(p, pi_star):.3f}")
    assert dropped.sum() >= 2 and dropped[np.argmax(pi_star)] and tv(p, pi_star) > 0.3
    assert np.all(p[p > 1e-3] > probs(ref["logits"])[p > 1e-3])  # the survivors all sit above the reference


def test_stacked_members_train_in_one_vmapped_call_as_they_do_alone():
    """The sweep's contract: K states differing in kl_coef and learning rate (dynamic
    leaves) train under one jax.vmap(run_steps) exactly as each does alone (to rounding)."""
    ref, rm, s, data, _ = rl_problem(V)
    cfg = RLOOConfig(iterations=10, rollouts=32, group_size=4, response_len=4)
    state = rloo.init(cfg, symbolic.unigram_family(V), ref, ref, rm, s)
    members = [state.replace(extras={**state.extras, "kl_coef": jnp.float32(c)},
                             opt_state=optim.set_learning_rate(state.opt_state, lr))
               for c, lr in ((0.5, 0.1), (2.0, 0.02))]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)
    keys = jnp.stack([jax.random.PRNGKey(7)] * len(members))
    run = lambda st, k: run_steps(st, data, k, step_fn=rloo.step, select_fn=rloo.select_batch, num_steps=10)  # noqa: E731
    together, _ = jax.jit(jax.vmap(run))(stacked, keys)
    for i, member in enumerate(members):
        alone, _ = run(member, keys[i])
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[i], together.params), alone.params,
                                    rtol=1e-5, atol=1e-6)
    assert not np.allclose(together.params["policy"]["logits"][0], together.params["policy"]["logits"][1])


def test_kl_guard_skip_drops_the_update_and_keeps_the_coefficient():
    """With kl_guard "skip" an iteration whose sampled KL exceeds max_kl changes nothing
    but the step count (one compiled step, two starting policies)."""
    ref, rm, s, data, _ = rl_problem(V)
    fam = symbolic.unigram_family(V)
    cfg = RLOOConfig(rollouts=16, group_size=4, response_len=4, clip=0.2, epochs=2, minibatches=2,
                     kl_target=1.0, max_kl=0.5, kl_guard="skip")
    step = jax.jit(rloo.step)
    key = jax.random.PRNGKey(5)
    far = {"logits": ref["logits"] + 2.0 * jax.random.normal(jax.random.PRNGKey(4), (V,))}
    for policy in (far, ref):
        state = rloo.init(cfg, fam, policy, ref, rm, s)
        out, m = step(state, rloo.select_batch(state, data, key), key)
        dropped = float(m["kl"]) > cfg.max_kl
        assert dropped == (policy is far)
        assert int(m["kl_skipped"]) == int(dropped)
        assert np.array_equal(out.params["policy"]["logits"], policy["logits"]) == dropped
        assert (float(out.extras["kl_coef"]) == 1.0) == dropped  # the controller moves unless dropped
        chex.assert_trees_all_equal(out.opt_state, state.opt_state) if dropped else None
        assert int(out.step) == 1


def test_rloo_config_names_the_field_and_value():
    with pytest.raises(ConfigError, match=r"RLOOConfig.clip must be a finite number > 0.0, got -0.1"):
        RLOOConfig(clip=-0.1)
    with pytest.raises(ConfigError, match=r"RLOOConfig.minibatches must divide rollouts \(512\), got 3"):
        RLOOConfig(minibatches=3)
    with pytest.raises(ConfigError, match=r"RLOOConfig.reference must be one of .* got 'rm'"):
        RLOOConfig(reference="rm")
    cfg = RLOOConfig()
    assert cfg.clip is None and cfg.epochs == cfg.minibatches == 1 and cfg.baseline == "leave_one_out"
    assert (cfg.kl_estimator, cfg.kl_placement) == ("k1", "reward")


@pytest.mark.slow
def test_rloo_raises_a_planted_reward_on_a_transformer_repeatably_and_resumably():
    fam, planted, policy, data = planted_transformer_problem()
    cfg = RLOOConfig(iterations=24, rollouts=32, group_size=8, response_len=8, epochs=2, minibatches=2, clip=0.2,
                     kl_coef=0.25, log_every=8, optim=OptimConfig(lr=1e-3))
    state = rloo.init(cfg, fam, policy, policy, planted, jnp.zeros(TRANSFORMER_V))
    out, m = train(rloo, state, data, 24)
    first, last = m["rm_score"][:3].mean(), m["rm_score"][-3:].mean()
    print(f"transformer rloo: rm_score {first:.2f} -> {last:.2f}, max kl {m['kl'].max():.2f}")
    assert last > first + 1.0, (first, last)
    assert m["kl"].max() < 12.0  # the context-free optimum's KL is 10 nats
    assert m["skipped"].sum() == 0
    again, _ = train(rloo, state, data, 24)
    chex.assert_trees_all_equal(out.params, again.params)
    half, _ = train(rloo, state, data, 12)
    resumed, _ = train(rloo, half, data, 12)
    chex.assert_trees_all_equal((out.params, out.opt_state, out.extras, out.step),
                                (resumed.params, resumed.opt_state, resumed.extras, resumed.step))
