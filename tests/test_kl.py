"""The KL estimators k1 / k2 / k3 against exact expectations over a categorical, their
expected gradients in each placement against exact KL gradients, and the closed-form
fixed points (``experiments/FIXED_POINTS.md``) that ``test_grpo`` / ``test_rloo``
compare the trained policies with."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.config import OptimConfig
from codex_jax.core import kernels, kl
from codex_jax.core.scan import run_steps
from codex_jax.models import symbolic
from codex_jax.stages import ppo

V = 16


# --------------------------------------------------------------------------- closed forms
def probs(logits) -> np.ndarray:
    """softmax in float64."""
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def tv(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def kl_optimum(ref_logits, r, beta) -> np.ndarray:
    """argmax <pi, r> - beta KL(pi || pi_ref):  pi*(v) ∝ pi_ref(v) exp(r_v / beta)."""
    return probs(np.log(probs(ref_logits)) + np.asarray(r, np.float64) / beta)


def reverse_kl_optimum(ref_logits, r, beta) -> np.ndarray:
    """argmax <pi, r> - beta KL(pi_ref || pi):  pi(v) = beta pi_ref(v) / (lam - r_v), with
    lam > max r solved by bisection (sum_v beta pi_ref(v) / (lam - r_v) = 1 is decreasing
    in lam, -> inf at max r and <= 1 at max r + beta)."""
    q, r = probs(ref_logits), np.asarray(r, np.float64)
    lo, hi = r.max(), r.max() + beta
    for _ in range(200):
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if np.sum(beta * q / (lam - r)) > 1.0 else (lo, lam)
    p = beta * q / (0.5 * (lo + hi) - r)
    return p / p.sum()


REPETITION_C = 6.0


def repetition_scores(params, prompt, prompt_mask, response, mask):
    """A bag-of-words reward with a repetition penalty: R(y) = sum_t w[y_t] - (C/T) sum_v n_v(y)^2,
    written per token as w[y_t] - (C/T)(2 #{s < t: y_s = y_t} + 1).  -> [B, T].

    E_pi[R] = T <pi, w> - C - C (T - 1) sum_v pi_v^2 is strictly concave in pi, so the
    *unregularised* optimum is interior (``repetition_optimum``)."""
    del prompt, prompt_mask
    t = response.shape[-1]
    same = response[:, :, None] == response[:, None, :]  # [B, T, T]
    before = jnp.tril(jnp.ones((t, t), bool), -1)[None]  # s < t
    repeats = jnp.sum(same & before, axis=-1).astype(jnp.float32)  # [B, T]
    return (params["w"][response] - REPETITION_C / t * (2.0 * repeats + 1.0)) * mask


def repetition_family(vocab: int):
    return symbolic.unigram_family(vocab)._replace(reward_token_scores=repetition_scores)


def repetition_optimum(r, response_len: int, c: float = REPETITION_C) -> np.ndarray:
    """argmax T <pi, r> - c (T - 1) sum pi^2: water-filling pi_v = (r_v - mu)_+ / kappa,
    kappa = 2 c (T - 1) / T, with mu by bisection so that sum pi = 1."""
    r = np.asarray(r, np.float64)
    kappa = 2.0 * c * (response_len - 1) / response_len
    lo, hi = r.min() - kappa, r.max()
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        lo, hi = (mu, hi) if np.maximum(r - mu, 0.0).sum() / kappa > 1.0 else (lo, mu)
    p = np.maximum(r - 0.5 * (lo + hi), 0.0) / kappa
    return p / p.sum()


# --------------------------------------------------------------------------- RL problems
def rl_problem(vocab: int = 8, seed: int = 0, w_scale: float = 1.0, penalty: float = 1.0):
    """A unigram RLHF problem: reference logits, a planted bag-of-words reward w, a safety
    penalty on token 3, and a prompt pool (the unigram ignores prompts).
    -> (ref, rm, penalty [V], data, r = w - s as float64)."""
    k = jax.random.PRNGKey(seed)
    ref = {"logits": jax.random.normal(jax.random.fold_in(k, 1), (vocab,))}
    rm = {"w": w_scale * jax.random.normal(jax.random.fold_in(k, 2), (vocab,)), "b": jnp.zeros(())}
    s = ppo.penalty_vector(vocab, [3], penalty)
    data = {"prompt": jnp.zeros((4, 1), jnp.int32), "prompt_mask": jnp.ones((4, 1)),
            "ptx_tokens": jnp.zeros((4, 2), jnp.int32), "ptx_mask": jnp.ones((4, 2))}
    return ref, rm, s, data, np.asarray(rm["w"] - s, np.float64)


# KL in the loss: the noise of the update does not vanish at the fixed point, and Adam
# divides it out (its jitter does not shrink with the batch), so those runs use plain
# SGD on large on-policy batches, whose noise averages out (FIXED_POINTS.md, section 7)
LOSS_PLACEMENT_RUN = dict(iterations=600, rollouts=2048, epochs=1, minibatches=1,
                          optim=OptimConfig(name="sgd", lr=2.0, schedule="cosine"))


def train(module, state, data, iterations: int, seed: int = 11, kl_coef: float | None = None):
    """``iterations`` steps of an RL stage in one compiled call; ``kl_coef`` overrides the
    coefficient in the state (a dynamic leaf, so other values reuse the same program).
    -> (state, metrics as host arrays [iterations])."""
    if kl_coef is not None:
        state = state.replace(extras={**state.extras, "kl_coef": jnp.asarray(kl_coef, jnp.float32)})
    state, metrics = run_steps(state, data, jax.random.PRNGKey(seed), step_fn=module.step,
                               select_fn=module.select_batch, num_steps=iterations)
    return state, jax.tree_util.tree_map(np.asarray, metrics)


TRANSFORMER_V = 64


def planted_transformer_problem():
    """A tiny transformer policy (ref = the same init) and a planted bag-of-words reward
    of +1 per id 5 (the transformer's RM head swapped for the symbolic one, as in PPO's
    test).  At kl_coef 0.25 the context-free optimum pi* ∝ exp(r / 0.25) from a uniform
    start has reward 8 pi*(5) = 3.7 and KL 10 nats per 8-token response.
    -> (family, reward params, policy params, prompt pool)."""
    from codex_jax.config import TransformerConfig
    from codex_jax.models.registry import make_family

    vocab = TRANSFORMER_V
    fam = make_family("transformer", vocab, TransformerConfig(layers=1, d_model=32, heads=2, context_len=32))
    fam = fam._replace(reward_token_scores=symbolic.reward_token_scores, reward_l2=symbolic.reward_l2)
    planted = {"w": jnp.zeros(vocab).at[5].set(1.0), "b": jnp.zeros(())}
    data = {"prompt": jnp.full((8, 2), 4, jnp.int32), "prompt_mask": jnp.ones((8, 2)),
            "ptx_tokens": jnp.full((8, 4), 4, jnp.int32), "ptx_mask": jnp.ones((8, 4))}
    return fam, planted, fam.init_policy(jax.random.key(5)), data


def _pair(scale: float, vocab: int = V):
    """pi (logits) and pi_ref = pi shifted by scale x a fixed random direction."""
    key = jax.random.PRNGKey(0)
    p = jax.random.normal(jax.random.fold_in(key, 1), (vocab,))
    return p, p + scale * jax.random.normal(jax.random.fold_in(key, 2), (vocab,))


# --------------------------------------------------------------------------- estimator values
@pytest.mark.parametrize("scale", [0.1, 0.3, 0.6, 1.0])
def test_estimator_means_match_their_exact_expectations(scale):
    """k1, k3 unbiased for KL(pi || pi_ref); k2's mean is 0.5 E[(log r)^2] (not the KL)."""
    p_logits, q_logits = _pair(scale)
    exact = kl.categorical_expectations(p_logits, q_logits)
    np.testing.assert_allclose(exact["mean_k1"], exact["kl"], rtol=1e-5)
    np.testing.assert_allclose(exact["mean_k3"], exact["kl"], rtol=1e-4)
    n = 200_000
    y = jax.random.categorical(jax.random.PRNGKey(int(scale * 10)), p_logits, shape=(n,))
    logp = jax.nn.log_softmax(p_logits)[y]
    logq = jax.nn.log_softmax(q_logits)[y]
    for kind in kl.ESTIMATORS:
        k = np.asarray(kl.estimate(kind, logp, logq), np.float64)
        se = np.sqrt(float(exact[f"var_{kind}"]) / n)
        assert abs(k.mean() - float(exact[f"mean_{kind}"])) < 4 * se + 1e-6, (kind, k.mean(), exact[f"mean_{kind}"])
        np.testing.assert_allclose(k.var(), exact[f"var_{kind}"], rtol=0.1)
    print(f"scale {scale}: KL {float(exact['kl']):.4f}  E[k2] {float(exact['mean_k2']):.4f}  "
          f"var k1 {float(exact['var_k1']):.4f} k2 {float(exact['var_k2']):.4f} k3 {float(exact['var_k3']):.4f}")


def test_k2_bias_follows_its_expansion_and_k3_has_lower_variance_than_k1_nearby():
    """E[k2] - KL = -E[d^3]/6 + 5 E[d^4]/24 + O(d^5), d = pi_ref/pi - 1; var k3 < var k1
    for nearby distributions (and the variances agree with sampling, above)."""
    for scale in (0.02, 0.05):
        p_logits, q_logits = _pair(scale)
        exact = kl.categorical_expectations(p_logits, q_logits)
        p, d = probs(p_logits), probs(q_logits) / probs(p_logits) - 1.0
        bias = np.sum(p * 0.5 * np.log1p(d) ** 2) - np.sum(p * -np.log1p(d))  # float64
        expansion = -np.sum(p * d**3) / 6 + 5 * np.sum(p * d**4) / 24
        np.testing.assert_allclose(bias, expansion, rtol=0.1)
        np.testing.assert_allclose(float(exact["mean_k2"] - exact["kl"]), bias, rtol=0.05, atol=1e-7)
    for scale in (0.1, 0.3, 0.6, 1.0):
        exact = kl.categorical_expectations(*_pair(scale))
        assert exact["var_k3"] < exact["var_k1"], scale
        assert exact["var_k3"] < 0.5 * exact["var_k1"] or scale >= 1.0, scale


def test_masked_estimates_are_zero_on_padding_and_never_nan():
    logp = jnp.array([[-1.0, -2.0, -1e4], [-0.5, 3e3, -3e3]])
    ref = jnp.array([[-1.5, -1.0, 50.0], [-0.7, -1e4, 80.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for kind in kl.ESTIMATORS:
        out = kl.masked_estimate(kind, logp, ref, mask)
        assert np.all(np.isfinite(out)) and np.all(np.asarray(out)[mask == 0] == 0)
        # jit and eager agree; reward_penalty sums the masked estimate per response
        chex.assert_trees_all_close(jax.jit(kl.masked_estimate, static_argnums=0)(kind, logp, ref, mask), out)
        chex.assert_trees_all_close(kl.reward_penalty(kind, logp, ref, mask), out.sum(-1))
        g = jax.grad(lambda x: kl.loss_penalty(kind, x, ref, mask).sum())(logp)
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[mask == 0] == 0)


# --------------------------------------------------------------------------- expected gradients
def _expected_gradients(kind: str, theta, q_logits):
    """Exact E_{y ~ pi}[.] by enumerating the V tokens (each a response of length 1).
    -> (loss-placement gradient E[grad k(y)], reward-placement gradient E[k(y) grad log pi(y)])."""
    p = jax.lax.stop_gradient(jax.nn.softmax(theta))
    tokens_q = jax.nn.log_softmax(q_logits)[:, None]  # [V, 1]: V responses of one token
    ones = jnp.ones((V, 1))

    def loss_placement(th):
        return jnp.sum(p * kl.loss_penalty(kind, jax.nn.log_softmax(th)[:, None], tokens_q, ones)[:, 0])

    def reward_placement(th):
        k = kl.reward_penalty(kind, jax.nn.log_softmax(theta)[:, None], tokens_q, ones)  # [V], no gradient
        return jnp.sum(p * k * jax.nn.log_softmax(th))  # the score-function surrogate

    return jax.grad(loss_placement)(theta), jax.grad(reward_placement)(theta)


def _grad(fn, theta):
    return jax.grad(fn)(theta)


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_expected_gradients_of_each_estimator_in_each_placement(scale):
    """loss: k1 -> 0, k2 -> grad KL(pi||ref), k3 -> grad KL(ref||pi);
    reward: k1 -> grad KL(pi||ref), k3 -> grad [KL(pi||ref) - KL(ref||pi)],
            k2 -> grad sum_v G(pi_v), G(x) = 0.5 x ((log(x/ref_v) - 1)^2 + 1)."""
    theta, q = _pair(scale)
    forward = lambda th: kernels.categorical_kl(th, q)  # noqa: E731
    reverse = lambda th: kernels.categorical_kl(q, th)  # noqa: E731

    def g_k2(th):
        x, lq = jax.nn.softmax(th), jax.nn.log_softmax(q)
        return jnp.sum(0.5 * x * (jnp.square(jax.nn.log_softmax(th) - lq - 1.0) + 1.0))

    want = {
        "k1": (jnp.zeros(V), _grad(forward, theta)),
        "k2": (_grad(forward, theta), _grad(g_k2, theta)),
        "k3": (_grad(reverse, theta), _grad(forward, theta) - _grad(reverse, theta)),
    }
    for kind in kl.ESTIMATORS:
        loss_g, reward_g = _expected_gradients(kind, theta, q)
        chex.assert_trees_all_close(loss_g, want[kind][0], atol=2e-6, rtol=1e-4)
        chex.assert_trees_all_close(reward_g, want[kind][1], atol=2e-6, rtol=1e-4)


# --------------------------------------------------------------------------- fixed points
def test_closed_form_fixed_points_are_stationary_points_of_their_objectives():
    """The references of test_grpo / test_rloo: pi* of <pi,r> - beta KL(pi||ref), the
    reverse-KL optimum, and the repetition-penalty water-filling (interior case)."""
    key = jax.random.PRNGKey(3)
    ref = jax.random.normal(jax.random.fold_in(key, 0), (V,))
    r = jax.random.normal(jax.random.fold_in(key, 1), (V,))
    beta, t = 0.7, 8
    objectives = {
        "forward": (kl_optimum(ref, r, beta),
                    lambda th: jnp.dot(jax.nn.softmax(th), r) - beta * kernels.categorical_kl(th, ref)),
        "reverse": (reverse_kl_optimum(ref, r, beta),
                    lambda th: jnp.dot(jax.nn.softmax(th), r) - beta * kernels.categorical_kl(ref, th)),
        "repetition": (repetition_optimum(0.3 * r, t),
                       lambda th: t * jnp.dot(jax.nn.softmax(th), 0.3 * r)
                       - REPETITION_C * (t - 1) * jnp.sum(jnp.square(jax.nn.softmax(th)))),
    }
    for name, (p, objective) in objectives.items():
        assert np.all(p > 1e-6) and abs(p.sum() - 1) < 1e-9, name  # interior: the gradient must vanish
        g = jax.grad(objective)(jnp.log(jnp.asarray(p, jnp.float32)))
        assert float(jnp.max(jnp.abs(g))) < 1e-5, (name, g)
        # and it is a maximum: random perturbations only lower the objective
        for i in range(5):
            d = 0.05 * jax.random.normal(jax.random.fold_in(key, 10 + i), (V,))
            assert objective(jnp.log(jnp.asarray(p, jnp.float32)) + d) < objective(jnp.log(jnp.asarray(p, jnp.float32)))


def test_repetition_reward_has_the_closed_form_expectation():
    vocab, t = 8, 6
    logits = jax.random.normal(jax.random.PRNGKey(4), (vocab,))
    w = jax.random.normal(jax.random.PRNGKey(5), (vocab,))
    fam = repetition_family(vocab)
    y = fam.sample({"logits": logits}, jax.random.PRNGKey(6), jnp.zeros((200_000, 1), jnp.int32), None, t)
    rew = np.asarray(fam.reward_token_scores({"w": w}, None, None, y, jnp.ones(y.shape)).sum(-1), np.float64)
    p = probs(logits)
    exact = t * p @ np.asarray(w) - REPETITION_C - REPETITION_C * (t - 1) * np.sum(p**2)
    assert abs(rew.mean() - exact) < 4 * rew.std() / np.sqrt(rew.size), (rew.mean(), exact)
    # the per-token form sums to sum_v n_v^2 exactly
    n = np.stack([np.bincount(row, minlength=vocab) for row in np.asarray(y[:50])])
    direct = np.asarray(w)[np.asarray(y[:50])].sum(-1) - REPETITION_C / t * (n**2).sum(-1)
    np.testing.assert_allclose(rew[:50], direct, rtol=1e-5, atol=1e-4)
