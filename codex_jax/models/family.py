"""The model-family interface that every stage is written against.

A family is a NamedTuple of pure functions (no class hierarchy): the stages call
these and never look inside the parameters, so the symbolic unigram family and a
transformer family go through the same drivers.  Shapes: B batch, L sequence,
P prompt, T response, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Params = Any


class Family(NamedTuple):
    name: str
    vocab_size: int
    # policy ---------------------------------------------------------------
    init_policy: Callable[..., Params]  # (key) -> params
    # (params, tokens [B, L], label_smoothing) -> smoothed NLL of tokens[t] given tokens[<t], [B, L]
    token_nll: Callable[..., Any]
    # (params, prompt [B, P], prompt_mask [B, P], response [B, T], temperature) -> log p [B, T]
    response_logprobs: Callable[..., Any]
    # (params, key, prompt [B, P], prompt_mask [B, P], length, temperature) -> response int32 [B, T]
    sample: Callable[..., Any]
    # reward model ---------------------------------------------------------
    init_reward: Callable[..., Params]  # (key) -> params
    # (params, prompt, prompt_mask, response, response_mask) -> per-token reward [B, T];
    # it sums over T to the sequence score
    reward_token_scores: Callable[..., Any]
    # (reward params) -> scalar L2 term (weights only; biases are not decayed)
    reward_l2: Callable[..., Any]
    # closed forms (None where the family has none) -----------------------
    # (counts [V], smoothing) -> params of the smoothed maximum-likelihood policy
    fit_exact: Optional[Callable[..., Params]] = None
    # (policy, ref, reward, penalty [V], demo_counts [V], response_len, kl_coef) -> exact terms
    exact_objective: Optional[Callable[..., dict]] = None
    # critic (None: critic-free PPO, whitening supplies the baseline) -----------
    init_value: Optional[Callable[..., Params]] = None  # (key) -> params
    # (params, prompt, prompt_mask, response) -> value before emitting response_t, [B, T]
    values: Optional[Callable[..., Any]] = None
    # (sample's arguments) -> (response, log p [B, T] as response_logprobs computes it), from the
    # sampling pass itself; None: rollouts take old log-probs from a second pass
    sample_with_logprobs: Optional[Callable[..., Any]] = None
    # responses end at this id (masked after it); None: fixed-length responses
    eos_id: Optional[int] = None
    # whether init_policy / init_reward / init_value use their key (a seed-independent
    # init makes a full-batch stage seed-independent: the audit must know)
    random_init: bool = False
    # XLA compiler options for the programs of this family's math, on CPU (core.compile):
    # ((name, value), ...); () = XLA's defaults
    compile_options: tuple = ()


def reward_score(family: Family, params, prompt, prompt_mask, response, response_mask):
    """Sequence score r(prompt, response) -> [B]."""
    return family.reward_token_scores(params, prompt, prompt_mask, response, response_mask).sum(-1)


def response_mask(response: jax.Array, eos_id: int | None) -> jax.Array:
    """1 up to and including the first EOS (all ones without an EOS id).  -> f32 [B, T]."""
    if eos_id is None:
        return jnp.ones(response.shape, jnp.float32)
    is_eos = (response == eos_id).astype(jnp.int32)
    before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS seen strictly before t
    return (before == 0).astype(jnp.float32)


def sample_with_logprobs(family: Family, params, key, prompt, prompt_mask, length: int, temperature):
    """Responses and their log-probs under ``params`` (old log-probs of a rollout): from the
    sampling pass where the family provides them, else one extra teacher-forced pass.
    -> (response int32 [B, T], log p f32 [B, T], not masked)."""
    if family.sample_with_logprobs is not None:
        return family.sample_with_logprobs(params, key, prompt, prompt_mask, length, temperature)
    response = family.sample(params, key, prompt, prompt_mask, length, temperature)
    return response, family.response_logprobs(params, prompt, prompt_mask, response, temperature)
