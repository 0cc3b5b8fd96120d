"""DPO and IPO: a naive loop, the closed-form equivalence with the bag-of-words reward
model on the unigram family, IPO's least-squares solution, and planted pairs on a tiny
transformer.  Derivations: experiments/FIXED_POINTS.md, section 8."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kl import TRANSFORMER_V, planted_transformer_problem, probs

from codex_jax.config import OptimConfig, RewardConfig
from codex_jax.config.algorithms import DPOConfig
from codex_jax.core.scan import run_steps
from codex_jax.errors import ConfigError
from codex_jax.models import symbolic
from codex_jax.models.family import response_mask
from codex_jax.stages import dpo, reward

V, L, N = 16, 6, 512


def bt_pairs(key, n=N, vocab=V, length=L, ragged=False):
    """Random bags of tokens; the chosen one drawn by Bradley-Terry on a planted w_true
    (noisy labels, so the maximum-likelihood fit is finite).  -> (w_true, pairs)."""
    w_true = jax.random.normal(jax.random.fold_in(key, 0), (vocab,))
    a = jax.random.randint(jax.random.fold_in(key, 1), (n, length), 0, vocab)
    b = jax.random.randint(jax.random.fold_in(key, 2), (n, length), 0, vocab)
    p_a = jax.nn.sigmoid(w_true[a].sum(-1) - w_true[b].sum(-1))
    a_wins = (jax.random.uniform(jax.random.fold_in(key, 3), (n,)) < p_a)[:, None]
    ones = jnp.ones((n, length), jnp.float32)
    if ragged:
        lens = jax.random.randint(jax.random.fold_in(key, 4), (2, n, 1), 1, length + 1)
        masks = (jnp.arange(length)[None, None] < lens).astype(jnp.float32)
    else:
        masks = jnp.stack([ones, ones])
    return w_true, {"prompt": jnp.zeros((n, 1), jnp.int32), "prompt_mask": jnp.ones((n, 1)),
                    "chosen": jnp.where(a_wins, a, b), "chosen_mask": jnp.where(a_wins, masks[0], masks[1]),
                    "rejected": jnp.where(a_wins, b, a), "rejected_mask": jnp.where(a_wins, masks[1], masks[0])}


def _fit(module, state, data, steps, seed=2):
    state, metrics = run_steps(state, data, jax.random.PRNGKey(seed), step_fn=module.step,
                               select_fn=module.select_batch, num_steps=steps)
    return state, jax.tree_util.tree_map(np.asarray, metrics)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_losses_match_a_naive_loop_on_ragged_pairs(kind):
    _, pairs = bt_pairs(jax.random.PRNGKey(0), n=40, ragged=True)
    fam = symbolic.unigram_family(V)
    ref = {"logits": jax.random.normal(jax.random.PRNGKey(1), (V,))}
    policy = {"logits": ref["logits"] + 0.5 * jax.random.normal(jax.random.PRNGKey(2), (V,))}
    beta, l2 = 0.3, 0.05
    cfg = DPOConfig(beta=beta, loss=kind, l2=l2)
    loss, metrics = dpo.loss_fn(policy, ref, fam, pairs, cfg)

    lp, lr = np.log(probs(policy["logits"])), np.log(probs(ref["logits"]))
    losses, correct, margins = [], [], []
    for i in range(40):
        def ratio(side):
            ids, mask = np.asarray(pairs[side][i]), np.asarray(pairs[f"{side}_mask"][i])
            return sum(lp[v] - lr[v] for v, m in zip(ids, mask) if m)
        h = ratio("chosen") - ratio("rejected")
        losses.append(np.log1p(np.exp(-beta * h)) if kind == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
        correct.append(1.0 if h > 0 else 0.5 if h == 0 else 0.0)
        margins.append(beta * h)
    penalty = 0.5 * np.sum((np.asarray(policy["logits"]) - np.asarray(ref["logits"])) ** 2)
    np.testing.assert_allclose(metrics["pair_loss"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(losses) + l2 * penalty, rtol=1e-5)
    np.testing.assert_allclose(metrics["implicit_reward_accuracy"], np.mean(correct))
    np.testing.assert_allclose(metrics["margin"], np.mean(margins), rtol=1e-5, atol=1e-6)
    # evaluate: jitted, in chunks that do not divide the pairs (the padding must not count)
    ev = dpo.evaluate(policy, ref, fam, pairs, beta, kind, chunk=16)
    np.testing.assert_allclose(ev["loss"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(ev["implicit_reward_accuracy"], np.mean(correct))
    np.testing.assert_allclose(ev["margin"], np.mean(margins), rtol=1e-5, atol=1e-6)


def test_dpo_on_a_unigram_is_the_bag_of_words_reward_model():
    """Equal lengths: log-normalisers cancel and h = (n_c - n_r) . (theta - theta_ref), so
    DPO with l2 = l2_RM beta^2 is the reward model's problem in u = beta (theta - theta_ref);
    both strictly convex (the all-ones direction, which no count difference sees, is held
    at 0 by the L2).  Full batch, trained to convergence, they agree to 1e-3 (centred)."""
    _, pairs = bt_pairs(jax.random.PRNGKey(0))
    fam = symbolic.unigram_family(V)
    l2_rm, beta, steps = 1e-2, 0.5, 1000
    optim = OptimConfig(lr=0.05, schedule="cosine")
    rm_state = reward.init(jax.random.PRNGKey(1), RewardConfig(steps=steps, batch_size=N, l2=l2_rm, optim=optim), fam)
    rm_state, rm_metrics = _fit(reward, rm_state, pairs, steps)
    ref = {"logits": jax.random.normal(jax.random.PRNGKey(9), (V,))}
    cfg = DPOConfig(beta=beta, l2=l2_rm * beta**2, steps=steps, batch_size=N, optim=optim)
    state, metrics = _fit(dpo, dpo.init(jax.random.PRNGKey(1), cfg, fam, ref, ref), pairs, steps)

    w = np.asarray(rm_state.params["w"], np.float64)
    u = beta * (np.asarray(state.params["logits"], np.float64) - np.asarray(ref["logits"], np.float64))
    diff = np.max(np.abs((w - w.mean()) - (u - u.mean())))
    print(f"DPO vs RM: max |w_RM - beta (theta - theta_ref)| (centred) = {diff:.2e}, |w|_max = {np.abs(w).max():.2f}")
    assert diff < 1e-3 and np.abs(w).max() > 0.5
    # both at their optimum (zero gradient), with the same fit
    g = jax.grad(lambda p: reward.loss_fn(p, fam, pairs, l2_rm)[0])(rm_state.params)["w"]
    assert float(jnp.max(jnp.abs(g))) < 1e-5
    np.testing.assert_allclose(metrics["implicit_reward_accuracy"][-1], rm_metrics["accuracy"][-1])
    np.testing.assert_allclose(metrics["pair_loss"][-1], rm_metrics["bt_loss"][-1], rtol=1e-4)
    # h is exactly the count difference times (theta - theta_ref): the normalisers cancel
    counts = jax.vmap(lambda ids: jnp.bincount(ids, length=V))
    d = np.asarray(counts(pairs["chosen"]) - counts(pairs["rejected"]), np.float64)
    chosen, rejected = dpo.log_ratios(state.params, ref, fam, pairs)
    np.testing.assert_allclose(np.asarray(chosen - rejected), d @ (u / beta), rtol=1e-4, atol=1e-4)


def test_ipo_reaches_its_least_squares_solution():
    """IPO on equal-length unigram pairs: min mean (d . delta - 1/(2 beta))^2 + l2/2 |delta|^2,
    solved by (D^T D / N + l2/2 I) delta = D^T 1 / (2 beta N)."""
    _, pairs = bt_pairs(jax.random.PRNGKey(4))
    fam = symbolic.unigram_family(V)
    beta, l2, steps = 0.5, 1e-2, 1000
    ref = {"logits": jax.random.normal(jax.random.PRNGKey(5), (V,))}
    cfg = DPOConfig(beta=beta, loss="ipo", l2=l2, steps=steps, batch_size=N,
                    optim=OptimConfig(lr=0.05, schedule="cosine"))
    state, _ = _fit(dpo, dpo.init(jax.random.PRNGKey(1), cfg, fam, ref, ref), pairs, steps)
    counts = jax.vmap(lambda ids: jnp.bincount(ids, length=V))
    d = np.asarray(counts(pairs["chosen"]) - counts(pairs["rejected"]), np.float64)
    delta = np.linalg.solve(d.T @ d / N + 0.5 * l2 * np.eye(V), d.T @ np.ones(N) / (2 * beta * N))
    got = np.asarray(state.params["logits"], np.float64) - np.asarray(ref["logits"], np.float64)
    diff = np.max(np.abs((got - got.mean()) - (delta - delta.mean())))
    print(f"IPO vs least squares: max |delta - delta_ls| (centred) = {diff:.2e}")
    assert diff < 1e-3


def test_dpo_config_names_the_field_and_value():
    with pytest.raises(ConfigError, match=r"DPOConfig.beta must be a finite number > 0.0, got 0"):
        DPOConfig(beta=0)
    with pytest.raises(ConfigError, match=r"DPOConfig.loss must be one of \('sigmoid', 'ipo'\), got 'hinge'"):
        DPOConfig(loss="hinge")
    with pytest.raises(ConfigError, match=r"DPOConfig.l2 must be a finite number >= 0.0, got -1.0"):
        DPOConfig(l2=-1.0)
    with pytest.raises(ConfigError, match=r"DPOConfig.heldout_fraction .* got 0.9"):
        DPOConfig(heldout_fraction=0.9)


def _planted_pairs(key, n, length=6):
    """Chosen responses contain id 7, rejected ones id 9; the rest is noise (ids >= 10)."""
    noise = jax.random.randint(key, (2, n, length), 10, TRANSFORMER_V)
    put = jax.nn.one_hot(jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, length), length, dtype=jnp.int32)
    ones = jnp.ones((n, length), jnp.float32)
    prompt = jax.random.randint(jax.random.fold_in(key, 2), (n, 3), 4, TRANSFORMER_V)
    return {"prompt": prompt, "prompt_mask": jnp.ones((n, 3)), "chosen": noise[0] * (1 - put) + 7 * put,
            "chosen_mask": ones, "rejected": noise[1] * (1 - put) + 9 * put, "rejected_mask": ones}


@pytest.mark.slow
def test_dpo_learns_planted_pairs_on_a_transformer_repeatably_and_resumably():
    fam, _, policy, _ = planted_transformer_problem()
    pairs = _planted_pairs(jax.random.key(3), 320)
    train = jax.tree_util.tree_map(lambda x: x[:256], pairs)
    held = jax.tree_util.tree_map(lambda x: x[256:], pairs)
    cfg = DPOConfig(beta=0.1, steps=32, batch_size=32, optim=OptimConfig(lr=3e-3))
    state = dpo.init(jax.random.key(4), cfg, fam, policy, policy)
    before = dpo.evaluate(policy, policy, fam, held, cfg.beta)
    assert float(before["implicit_reward_accuracy"]) == 0.5  # policy == ref: every margin is 0
    out, m = _fit(dpo, state, train, cfg.steps)
    after = dpo.evaluate(out.params, policy, fam, held, cfg.beta)
    # the sampled KL(pi || ref) per 8-token response stays small: the planted signal is
    # one token per pair, so DPO has no reason to move the rest of the distribution far
    prompts = held["prompt"]
    sample = fam.sample(out.params, jax.random.key(6), prompts, held["prompt_mask"], 8, 1.0)
    mask = response_mask(sample, fam.eos_id)
    kl = ((fam.response_logprobs(out.params, prompts, held["prompt_mask"], sample, 1.0)
           - fam.response_logprobs(policy, prompts, held["prompt_mask"], sample, 1.0)) * mask).sum(-1).mean()
    print(f"transformer dpo: held-out implicit-reward accuracy {float(after['implicit_reward_accuracy']):.3f}, "
          f"loss {float(before['loss']):.3f} -> {float(after['loss']):.3f}, sampled KL {float(kl):.2f}")
    assert float(after["implicit_reward_accuracy"]) >= 0.9 and float(after["loss"]) < float(before["loss"]) - 0.2
    assert float(kl) < 5.0 and m["skipped"].sum() == 0
    again, _ = _fit(dpo, state, train, cfg.steps)
    chex.assert_trees_all_equal(out.params, again.params)
    half, _ = _fit(dpo, state, train, cfg.steps // 2)
    resumed, _ = _fit(dpo, half, train, cfg.steps // 2)
    chex.assert_trees_all_equal((out.params, out.opt_state, out.step),
                                (resumed.params, resumed.opt_state, resumed.step))
