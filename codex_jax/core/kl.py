"""Per-token estimators of the KL between a policy and its reference (Schulman 2020),
and the two places an RL stage can put them.

For a token y ~ pi with log r = log pi_ref(y) - log pi(y):

    k1 = -log r                      E_pi[k1] = KL(pi || pi_ref)            unbiased
    k2 = 0.5 (log r)^2               E_pi[k2] = 0.5 E_pi[(log r)^2]         biased: with
         d = r - 1 (E_pi[d] = 0),  E[k2] - KL = -E[d^3]/6 + 5 E[d^4]/24 + O(d^5)
    k3 = (r - 1) - log r             E_pi[k3] = KL(pi || pi_ref)            unbiased, >= 0,
         lower variance than k1 while pi ~ pi_ref (heavy-tailed through r when far)

Placement "reward": ``kl_coef * stop_gradient(k)`` is subtracted from the sequence
reward, so it acts only through the policy-gradient estimator:
E_pi[k(y) grad log pi(y)].  For k1 this is exactly grad KL(pi || pi_ref) (the score has
mean zero, so the missing grad of k1 itself contributes nothing in expectation).

Placement "loss": ``kl_coef * k`` is added to the loss with the gradient taken through
log pi on the sampled tokens (the sample itself is not differentiated), so its
expected gradient is E_{y~pi}[grad_theta k(y)]:

    k1: E[grad log pi(y)]                          = 0                 (no pull at all)
    k2: E[(log pi - log pi_ref)(y) grad log pi(y)] = grad KL(pi || pi_ref)   (exact)
    k3: E[(1 - r(y)) grad log pi(y)]               = grad KL(pi_ref || pi)   (reverse KL)

``experiments/FIXED_POINTS.md`` derives the fixed points these lead to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("k1", "k2", "k3")
PLACEMENTS = ("reward", "loss")


def estimate(kind: str, logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token estimator value.  logp = log pi(y), ref_logp = log pi_ref(y): [...] -> f32 [...].

    Differentiable in both arguments; callers stop the gradient where they need to.
    """
    log_r = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * jnp.square(log_r)
    if kind == "k3":
        # expm1 keeps (r - 1) - log r accurate near r = 1, where both terms are ~ log r
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"kl estimator must be one of {ESTIMATORS}, got {kind!r}")


def masked_estimate(kind: str, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """``estimate`` on valid tokens, exactly 0 on padding.  [B, T] -> f32 [B, T].

    Padded positions get log r = 0 *before* the estimator, so an arbitrary log-prob
    there can never overflow exp(log r) into inf * 0 = NaN (k3)."""
    valid = mask > 0
    zero = jnp.zeros((), jnp.float32)
    est = estimate(kind, jnp.where(valid, logp, zero), jnp.where(valid, ref_logp, zero))
    return est * mask.astype(jnp.float32)


def reward_penalty(kind: str, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """Placement "reward": the per-response penalty sum_t k_t, with no gradient.

    logp, ref_logp, mask: [B, T] -> f32 [B]; the caller subtracts kl_coef times it
    from the sequence reward before computing advantages."""
    return jax.lax.stop_gradient(masked_estimate(kind, logp, ref_logp, mask).sum(-1))


def loss_penalty(kind: str, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """Placement "loss": per-token k_t with the gradient through ``logp`` only.

    logp (differentiable), ref_logp, mask: [B, T] -> f32 [B, T]; the caller aggregates
    it with the same token weights as its policy loss and adds kl_coef times it."""
    return masked_estimate(kind, logp, jax.lax.stop_gradient(ref_logp), mask)


# --------------------------------------------------------------------------- closed forms
def categorical_expectations(p_logits: jax.Array, q_logits: jax.Array) -> dict:
    """Exact mean and variance of each estimator for y ~ p, pi = p, pi_ref = q.

    p_logits, q_logits: [V] -> {"kl": KL(p || q), "reverse_kl": KL(q || p),
    "mean_k1", "mean_k2", "mean_k3", "var_k1", "var_k2", "var_k3"} (f32 scalars).
    Tokens with p = 0 are never drawn and carry no weight."""
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32))
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32))
    p = jnp.exp(logp)
    live = p > 0
    safe_logp = jnp.where(live, logp, 0.0)
    out = {"kl": jnp.sum(jnp.where(live, p * (safe_logp - logq), 0.0)),
           "reverse_kl": jnp.sum(jnp.exp(logq) * (logq - logp))}
    for kind in ESTIMATORS:
        k = jnp.where(live, estimate(kind, safe_logp, logq), 0.0)
        mean = jnp.sum(p * k)
        out[f"mean_{kind}"] = mean
        out[f"var_{kind}"] = jnp.sum(p * jnp.square(k - mean))
    return out
