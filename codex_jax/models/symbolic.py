"""The exact symbolic family: a unigram policy and a bag-of-words reward model.

policy params  {"logits": [V]}         pi(v) = softmax(logits)_v, context-free
reward params  {"w": [V], "b": []}     r(y) = b + sum_t w[y_t]

Every optimum has a closed form, used by the tests and reported by the pipeline:

* smoothed MLE             pi(v) = (c_v + a) / (N + a V)
* KL-regularised optimum   pi*(v) ∝ pi_ref(v) exp((w_v - s_v) / kl_coef)
  of  E_pi[w - s] - kl_coef KL(pi || pi_ref)  (per token; a response of T i.i.d.
  tokens scales every term by T, so the optimum is the same).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from codex_jax.core import kernels
from codex_jax.core.compile import LEGACY_FUSION_EMITTERS
from codex_jax.models.family import Family


# --------------------------------------------------------------------------- policy
def init_policy(key: jax.Array, vocab_size: int) -> dict:
    """Uniform policy.  The key is accepted for the common signature; a unigram's
    maximum-likelihood problem is convex, so no symmetry needs breaking."""
    del key
    return {"logits": jnp.zeros((vocab_size,), jnp.float32)}


def token_nll(params: dict, tokens: jax.Array, label_smoothing: float | jax.Array) -> jax.Array:
    """Label-smoothed NLL per position.  tokens [B, L] -> [B, L].

    (1 - eps) * -log pi(y) + eps * mean_v -log pi(v); the second term is the same at
    every position for a context-free model, so it is computed once ([V] not [B, L, V]).
    """
    logp = jax.nn.log_softmax(params["logits"].astype(jnp.float32))
    return -(1.0 - label_smoothing) * logp[tokens] - label_smoothing * jnp.mean(logp)


def response_logprobs(params, prompt, prompt_mask, response, temperature=1.0) -> jax.Array:
    """log pi(response_t) under the tempered policy; the prompt is ignored.  -> [B, T]."""
    del prompt, prompt_mask
    logp = jax.nn.log_softmax(params["logits"].astype(jnp.float32) / temperature)
    return logp[response]


def sample(params, key, prompt, prompt_mask, length: int, temperature=1.0) -> jax.Array:
    """length i.i.d. draws per prompt from softmax(logits / temperature).  -> int32 [B, T].

    Inverse-CDF sampling: one uniform per token and a binary search in the CDF, i.e.
    O(B T log V).  ``jax.random.categorical`` would draw B*T*V Gumbel variates
    (33M for 256 x 16 tokens over 8192 ids), which dominated a PPO iteration.
    """
    del prompt_mask
    probs = jax.nn.softmax(params["logits"].astype(jnp.float32) / temperature)
    cdf = jnp.cumsum(probs)
    u = jax.random.uniform(key, (prompt.shape[0], length)) * cdf[-1]
    # side="right": u in [cdf[i-1], cdf[i]) -> i, so zero-probability ids are never drawn
    ids = jnp.searchsorted(cdf, u, side="right")
    # float rounding can put u at cdf[-1]; fall back to the last id with mass
    last = probs.shape[0] - 1 - jnp.argmax(probs[::-1] > 0)
    return jnp.minimum(ids, last).astype(jnp.int32)


def fit_exact(counts: jax.Array, smoothing: float) -> dict:
    """Smoothed maximum likelihood: logits = log((c + a) / (N + a V)).  counts [V]."""
    counts = counts.astype(jnp.float32)
    probs = (counts + smoothing) / (counts.sum() + smoothing * counts.shape[0])
    return {"logits": jnp.log(probs)}


# --------------------------------------------------------------------------- reward
def init_reward(key: jax.Array, vocab_size: int) -> dict:
    """Zero weights: the Bradley-Terry loss is convex in (w, b), so zero is a fine start."""
    del key
    return {"w": jnp.zeros((vocab_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def reward_token_scores(params, prompt, prompt_mask, response, response_mask) -> jax.Array:
    """w[y_t] on each valid response token, plus b on the last one.  -> [B, T].

    A gather over ids: no dense [B, V] bag-of-words matrix is ever built, and the
    gradient w.r.t. w is the matching scatter-add of counts.
    """
    del prompt, prompt_mask
    mask = response_mask.astype(jnp.float32)
    scores = params["w"][response] * mask
    is_last = jnp.arange(response.shape[-1]) == (mask.sum(-1, keepdims=True) - 1)
    # b cancels in every Bradley-Terry margin, so its exact gradient is 0; stop_gradient
    # keeps float noise in that gradient from being amplified by Adam into a drifting b
    return scores + jax.lax.stop_gradient(params["b"]) * is_last.astype(jnp.float32)


def reward_l2(params: dict) -> jax.Array:
    return 0.5 * jnp.sum(jnp.square(params["w"]))


# --------------------------------------------------------------------------- closed forms
def kl_regularised_optimum(ref_logits, w, penalty, kl_coef) -> jax.Array:
    """Logits of pi* ∝ pi_ref exp((w - s) / kl_coef).  All [V]."""
    return jax.nn.log_softmax(jax.nn.log_softmax(ref_logits) + (w - penalty) / kl_coef)


def exact_objective(policy, ref, reward, penalty, demo_counts, response_len, kl_coef) -> dict:
    """Exact objective terms for responses of ``response_len`` tokens.

    L_SFT  = cross-entropy of pi on demonstration completion tokens (per token)
    L_RLHF = -E_pi[r(y)] = -(b + T <pi, w>)          (per response)
    KL     = T KL(pi || pi_ref);  safety = T <pi, s>  (per response)
    tv_to_optimum = TV(pi, pi*) for the KL-regularised optimum at ``kl_coef``
    """
    logp = jax.nn.log_softmax(policy["logits"].astype(jnp.float32))
    probs = jnp.exp(logp)
    demo_counts = demo_counts.astype(jnp.float32)
    kl = kernels.categorical_kl(policy["logits"], ref["logits"])
    return {
        "L_SFT": -jnp.sum(demo_counts * logp) / jnp.maximum(demo_counts.sum(), 1.0),
        "L_RLHF": -(reward["b"] + response_len * jnp.dot(probs, reward["w"])),
        "KL": response_len * kl,
        "safety": response_len * jnp.dot(probs, penalty),
        "tv_to_optimum": total_variation(
            policy["logits"], kl_regularised_optimum(ref["logits"], reward["w"], penalty, kl_coef)
        ),
    }


def total_variation(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """0.5 * sum |p - q| between two categorical distributions given as logits."""
    return 0.5 * jnp.sum(jnp.abs(jax.nn.softmax(p_logits) - jax.nn.softmax(q_logits)))


@functools.lru_cache(maxsize=None)
def unigram_family(vocab_size: int) -> Family:
    """Cached, so the same vocabulary size gives the same (hashable, static) family and
    jitted functions that take it as a static argument compile once."""
    return Family(
        name="unigram",
        vocab_size=vocab_size,
        init_policy=lambda key: init_policy(key, vocab_size),
        token_nll=token_nll,
        response_logprobs=response_logprobs,
        sample=sample,
        init_reward=lambda key: init_reward(key, vocab_size),
        reward_token_scores=reward_token_scores,
        reward_l2=reward_l2,
        fit_exact=fit_exact,
        exact_objective=exact_objective,
        # its programs are small and quick: a run is mostly their compilation (core.compile)
        compile_options=LEGACY_FUSION_EMITTERS,
    )
