"""RLHF stage (M2): PPO against the reward model, KL-regularised to a reference.

One ``step`` is one whole PPO iteration, compiled as a single function:
rollout -> old / reference log-probs (+ critic values) -> per-token rewards
    r_t = RM_t - s[y_t] - kl_coef * (log pi_old(y_t) - log pi_ref(y_t))
(RM_t is the sequence score on the last valid token, or per token for bag-of-words;
responses of families with ``eos_id`` end at their first EOS, and ``no_eos_penalty``
is charged to those that never emit it) -> GAE -> whitening -> ``epochs`` x
``minibatches`` updates of the clipped surrogate (+ clipped value loss, + optional
PPO-ptx term on demonstrations) -> KL-controller update.

data  = {"prompt": int32 [N, P], "prompt_mask": [N, P],          # prompt pool
         "ptx_tokens": int32 [M, L], "ptx_mask": f32 [M, L]}      # demonstrations
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from codex_jax import kernels
from codex_jax.config import PPOConfig
from codex_jax.family import Family
from codex_jax.optim import make_optimizer
from codex_jax.sharding import shard_rows
from codex_jax.updates import apply_gradients


@struct.dataclass
class PPOState:
    policy: Any  # trained
    value: Any  # trained critic (None for critic-free families)
    ref: Any  # frozen reference policy for the KL penalty
    reward: Any  # frozen reward model
    penalty: jax.Array  # f32 [V] rule-based safety penalty per token id
    kl_coef: jax.Array  # f32 [] current KL coefficient (controller state)
    opt_state: Any
    step: jax.Array  # int32 []
    skipped: jax.Array  # int32 []
    family: Family = struct.field(pytree_node=False)
    cfg: PPOConfig = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def init(cfg: PPOConfig, family: Family, policy, ref, reward, penalty, value=None) -> PPOState:
    """``value``: critic params (e.g. ``family.init_value(key)``); None trains critic-free."""
    tx = make_optimizer(cfg.optim, cfg.iterations * cfg.epochs * cfg.minibatches)
    return PPOState(
        policy=policy,
        value=value,
        ref=ref,
        reward=reward,
        penalty=jnp.asarray(penalty, jnp.float32),
        kl_coef=jnp.asarray(cfg.kl_coef, jnp.float32),
        opt_state=tx.init({"policy": policy, "value": value}),
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        family=family,
        cfg=cfg,
        tx=tx,
    )


def penalty_vector(vocab_size: int, unsafe_ids, penalty: float):
    """s[v] = penalty for each unsafe id, else 0.  -> f32 [V]."""
    return jnp.zeros((vocab_size,), jnp.float32).at[jnp.asarray(list(unsafe_ids), jnp.int32)].set(penalty)


def select_batch(state: PPOState, data: dict, key: jax.Array) -> dict:
    """Prompts for this iteration's rollouts and a demonstration batch for PPO-ptx
    (both drawn with replacement; a prompt pool may be smaller than ``rollouts``)."""
    k_prompt, k_ptx = jax.random.split(key)
    cfg = state.cfg
    p_idx = jax.random.randint(k_prompt, (cfg.rollouts,), 0, data["prompt"].shape[0])
    d_idx = jax.random.randint(k_ptx, (cfg.ptx_batch_size,), 0, data["ptx_tokens"].shape[0])
    return {
        "prompt": data["prompt"][p_idx],
        "prompt_mask": data["prompt_mask"][p_idx],
        "ptx_tokens": data["ptx_tokens"][d_idx],
        "ptx_mask": data["ptx_mask"][d_idx],
    }


def response_mask(response: jax.Array, eos_id: int | None) -> jax.Array:
    """1 up to and including the first EOS (all ones without an EOS id).  -> f32 [B, T]."""
    if eos_id is None:
        return jnp.ones(response.shape, jnp.float32)
    is_eos = (response == eos_id).astype(jnp.int32)
    before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS seen strictly before t
    return (before == 0).astype(jnp.float32)


def rollout(state: PPOState, batch: dict, key: jax.Array) -> dict:
    """Samples responses and everything the update needs; no gradients flow here."""
    cfg, fam = state.cfg, state.family
    prompt, pmask = batch["prompt"], batch["prompt_mask"]
    response = fam.sample(state.policy, key, prompt, pmask, cfg.response_len, cfg.temperature)
    mask = response_mask(response, fam.eos_id)
    old_logp = fam.response_logprobs(state.policy, prompt, pmask, response, cfg.temperature) * mask
    ref_logp = fam.response_logprobs(state.ref, prompt, pmask, response, cfg.temperature) * mask
    rm = fam.reward_token_scores(state.reward, prompt, pmask, response, mask)  # [B, T]
    if cfg.whiten_rewards:
        rm = rm * jax.lax.rsqrt(kernels.masked_var(rm.sum(-1), jnp.ones(rm.shape[:1])) + kernels.EPS)
    last = (jnp.arange(mask.shape[-1]) == mask.sum(-1, keepdims=True) - 1).astype(jnp.float32)
    if fam.eos_id is not None and cfg.no_eos_penalty:
        no_eos = 1.0 - jnp.any((response == fam.eos_id) & (mask > 0), axis=-1, keepdims=True)
        rm = rm - cfg.no_eos_penalty * no_eos * last
    safety = state.penalty[response] * mask
    kl = old_logp - ref_logp
    rewards = rm - safety - state.kl_coef * kl
    values = (fam.values(state.value, prompt, pmask, response) * mask if state.value is not None
              else jnp.zeros_like(rewards))  # critic-free: whitening supplies the baseline
    advantages, returns = jax.vmap(kernels.gae, in_axes=(0, 0, 0, None, None))(
        rewards, values, mask, cfg.gamma, cfg.gae_lambda
    )
    if cfg.whiten_advantages:
        advantages = kernels.masked_whiten(advantages, mask)
    return {
        "prompt": prompt, "prompt_mask": pmask, "response": response, "mask": mask,
        "old_logp": jax.lax.stop_gradient(old_logp),
        "old_values": jax.lax.stop_gradient(values),
        "returns": jax.lax.stop_gradient(returns),
        "advantages": jax.lax.stop_gradient(advantages),
        "stats": {
            "rm_score": jnp.mean(rm.sum(-1)),
            "safety_penalty": jnp.mean(safety.sum(-1)),
            "kl": jnp.mean(kl.sum(-1)),  # sampled KL(pi || ref) per response
            "return": jnp.mean(returns[:, 0]),
            "response_len": jnp.mean(mask.sum(-1)),
        },
    }


def loss_fn(trainable: dict, state: PPOState, mb: dict, ptx: dict) -> tuple[jax.Array, dict]:
    """Clipped surrogate + vf_coef * clipped value loss + ptx_coef * L_SFT."""
    cfg, fam = state.cfg, state.family
    policy = trainable["policy"]
    logp = fam.response_logprobs(policy, mb["prompt"], mb["prompt_mask"], mb["response"],
                                 cfg.temperature)
    pg_loss, metrics = kernels.clipped_surrogate(logp, mb["old_logp"], mb["advantages"],
                                                 mb["mask"], cfg.clip)
    loss, extra = pg_loss, {}
    if cfg.ptx_coef > 0:  # static: at 0 the demonstration pass would only add 0 * L_SFT
        ptx_loss = _ptx_loss(fam, policy, ptx)
        loss, extra = loss + cfg.ptx_coef * ptx_loss, {"ptx_loss": ptx_loss}
    if trainable["value"] is not None:
        v = fam.values(trainable["value"], mb["prompt"], mb["prompt_mask"], mb["response"])
        v_clipped = mb["old_values"] + jnp.clip(v - mb["old_values"], -cfg.value_clip, cfg.value_clip)
        vf = 0.5 * jnp.maximum(jnp.square(v - mb["returns"]), jnp.square(v_clipped - mb["returns"]))
        value_loss = kernels.masked_mean(vf, mb["mask"])
        loss = loss + cfg.vf_coef * value_loss
        metrics = {**metrics, "value_loss": value_loss}
    return loss, {**metrics, **extra, "pg_loss": pg_loss}


def _ptx_loss(fam, policy, ptx: dict) -> jax.Array:
    """L_SFT of the policy on a demonstration batch (per completion token)."""
    return kernels.masked_mean(fam.token_nll(policy, ptx["ptx_tokens"], 0.0), ptx["ptx_mask"])


def update_kl_coef(cfg: PPOConfig, kl_coef: jax.Array, kl: jax.Array) -> jax.Array:
    """Adaptive controller of Ziegler et al. (2019); fixed when kl_target is None."""
    if cfg.kl_target is None:
        return kl_coef
    error = jnp.clip(kl / cfg.kl_target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * cfg.rollouts / cfg.kl_horizon)


def step(state: PPOState, batch: dict, key: jax.Array) -> tuple[PPOState, dict]:
    """One PPO iteration (rollout + all update epochs) as one pure function."""
    cfg = state.cfg
    k_sample, k_shuffle = jax.random.split(key)
    roll = rollout(state, batch, k_sample)
    ptx = {"ptx_tokens": batch["ptx_tokens"], "ptx_mask": batch["ptx_mask"]}
    fields = ("prompt", "prompt_mask", "response", "mask", "old_logp", "old_values", "returns", "advantages")
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def minibatch_update(carry, idx):
        trainable, opt_state, skipped = carry
        mb = shard_rows({name: roll[name][idx] for name in fields})  # data-parallel on a mesh
        grads, metrics = grad_fn(trainable, state, mb, ptx)
        trainable, opt_state, ok = apply_gradients(state.tx, trainable, opt_state, grads)
        return (trainable, opt_state, skipped + 1 - ok.astype(jnp.int32)), metrics

    def epoch(carry, epoch_key):
        perm = jax.random.permutation(epoch_key, cfg.rollouts)
        return jax.lax.scan(minibatch_update, carry, perm.reshape(cfg.minibatches, -1))

    epoch_keys = jax.random.split(k_shuffle, cfg.epochs)
    start = {"policy": state.policy, "value": state.value}
    (trainable, opt_state, skipped), mb_metrics = jax.lax.scan(
        epoch, (start, state.opt_state, state.skipped), epoch_keys
    )
    kl_coef = update_kl_coef(cfg, state.kl_coef, roll["stats"]["kl"])
    kl_skip = jnp.asarray(False)
    if cfg.max_kl is not None and cfg.kl_guard == "skip":
        # the KL guard in "skip" mode drops this iteration's update (host never syncs)
        kl_skip = roll["stats"]["kl"] > cfg.max_kl
        keep = lambda new, old: jnp.where(kl_skip, old, new)  # noqa: E731
        trainable = jax.tree_util.tree_map(keep, trainable, start)
        opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
        kl_coef = jnp.where(kl_skip, state.kl_coef, kl_coef)
    if cfg.ptx_coef == 0:  # not trained on: reported once, for the updated policy
        mb_metrics = {**mb_metrics, "ptx_loss": _ptx_loss(state.family, trainable["policy"], ptx)}
    metrics = {
        **roll["stats"],
        **jax.tree_util.tree_map(jnp.mean, mb_metrics),
        "kl_coef": state.kl_coef,
        "skipped": skipped - state.skipped,
        "kl_skipped": kl_skip.astype(jnp.int32),
    }
    new = state.replace(policy=trainable["policy"], value=trainable["value"], opt_state=opt_state,
                        kl_coef=kl_coef,
                        step=state.step + 1, skipped=skipped)
    return new, metrics


@jax.jit
def sampled_objective(state: PPOState, batch: dict, key: jax.Array) -> dict:
    """Monte Carlo objective terms per response on ``batch``'s prompts: L_RLHF = -mean raw
    RM score, KL = mean sampled KL(pi || ref), safety = mean penalty mass."""
    cfg, fam = state.cfg, state.family
    prompt, pmask = batch["prompt"], batch["prompt_mask"]
    response = fam.sample(state.policy, key, prompt, pmask, cfg.response_len, 1.0)
    mask = response_mask(response, fam.eos_id)
    logp = fam.response_logprobs(state.policy, prompt, pmask, response, 1.0)
    ref_logp = fam.response_logprobs(state.ref, prompt, pmask, response, 1.0)
    rm = fam.reward_token_scores(state.reward, prompt, pmask, response, mask).sum(-1)
    return {"L_RLHF": -jnp.mean(rm), "KL": jnp.mean(((logp - ref_logp) * mask).sum(-1)),
            "safety": jnp.mean((state.penalty[response] * mask).sum(-1))}


@jax.jit
def evaluate(state: PPOState, demo_counts: jax.Array) -> dict:
    """Exact objective terms where the family has a closed form (else empty)."""
    fam = state.family
    if fam.exact_objective is None:
        return {}
    return fam.exact_objective(state.policy, state.ref, state.reward, state.penalty,
                               demo_counts, state.cfg.response_len, state.kl_coef)
