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

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config import PPOConfig
from codex_jax.core import kernels
from codex_jax.core import kl as kl_estimators
from codex_jax.core.keys import split, to_device
from codex_jax.core.optim import apply_gradients, make_optimizer
from codex_jax.core.sharding import shard_rows
from codex_jax.core.state import TrainState, init_state
from codex_jax.models.family import Family, response_mask, sample_with_logprobs
from codex_jax.stages import rl
from codex_jax.stages.context import Setup, StageContext
from codex_jax.stages.rl import penalty_vector, update_kl_coef  # noqa: F401 - part of this stage's API


def init(cfg: PPOConfig, family: Family, policy, ref, reward, penalty, value=None) -> TrainState:
    """``value``: critic params (e.g. ``family.init_value(key)``); None trains critic-free.

    params = {"policy", "value"} (trained); extras = {"ref", "reward" (frozen),
    "penalty" f32 [V], "kl_coef" f32 [] (controller state)}."""
    tx = make_optimizer(cfg.optim, cfg.iterations * cfg.epochs * cfg.minibatches)
    extras = {"ref": ref, "reward": reward, "penalty": to_device(penalty, np.float32),
              "kl_coef": to_device(cfg.kl_coef, np.float32)}
    return init_state({"policy": policy, "value": value}, family, cfg, tx, extras)


def select_batch(state: TrainState, data: dict, key: jax.Array) -> dict:
    """Prompts for this iteration's rollouts and a demonstration batch for PPO-ptx
    (both drawn with replacement; a prompt pool may be smaller than ``rollouts``)."""
    k_prompt, k_ptx = jax.random.split(key)
    cfg = state.cfg
    p_idx = jax.random.randint(k_prompt, (cfg.rollouts,), 0, data["prompt"].shape[0])
    d_idx = jax.random.randint(k_ptx, (cfg.ptx_batch_size,), 0, data["ptx_tokens"].shape[0])
    return {
        "prompt_id": p_idx,  # row of the prompt pool (the problem, for an execution reward)
        "prompt": data["prompt"][p_idx],
        "prompt_mask": data["prompt_mask"][p_idx],
        "ptx_tokens": data["ptx_tokens"][d_idx],
        "ptx_mask": data["ptx_mask"][d_idx],
    }


def rollout(state: TrainState, batch: dict, key: jax.Array) -> dict:
    """Samples responses and everything the update needs; no gradients flow here."""
    cfg, fam = state.cfg, state.family
    prompt, pmask = batch["prompt"], batch["prompt_mask"]
    response, old_logp = sample_with_logprobs(fam, state.params["policy"], key, prompt, pmask, cfg.response_len,
                                              cfg.temperature)
    mask = response_mask(response, fam.eos_id)
    old_logp = old_logp * mask
    ref_logp = fam.response_logprobs(state.extras["ref"], prompt, pmask, response, cfg.temperature) * mask
    last = (jnp.arange(mask.shape[-1]) == mask.sum(-1, keepdims=True) - 1).astype(jnp.float32)
    rm = rl.task_reward(state, batch["prompt_id"], prompt, pmask, response, mask, last)  # [B, T]
    if cfg.whiten_rewards:
        rm = rm * jax.lax.rsqrt(kernels.masked_var(rm.sum(-1), jnp.ones(rm.shape[:1])) + kernels.EPS)
    if fam.eos_id is not None and cfg.no_eos_penalty:
        no_eos = 1.0 - jnp.any((response == fam.eos_id) & (mask > 0), axis=-1, keepdims=True)
        rm = rm - cfg.no_eos_penalty * no_eos * last
    safety = state.extras["penalty"][response] * mask
    kl = old_logp - ref_logp  # k1 per token: the sampled KL(pi || ref) (guards, controller, logs)
    estimate = kl if cfg.kl_estimator == "k1" else kl_estimators.masked_estimate(cfg.kl_estimator, old_logp,
                                                                                 ref_logp, mask)
    rewards = rm - safety
    if cfg.kl_placement == "reward":  # per-token penalty inside the return (k1: Ziegler et al.)
        rewards = rewards - state.extras["kl_coef"] * jax.lax.stop_gradient(estimate)
    values = (fam.values(state.params["value"], prompt, pmask, response) * mask if state.params["value"] is not None
              else jnp.zeros_like(rewards))  # critic-free: whitening supplies the baseline
    advantages, returns = jax.vmap(kernels.gae, in_axes=(0, 0, 0, None, None))(
        rewards, values, mask, cfg.gamma, cfg.gae_lambda
    )
    if cfg.whiten_advantages:
        advantages = kernels.masked_whiten(advantages, mask)
    return {
        "prompt": prompt, "prompt_mask": pmask, "response": response, "mask": mask,
        "old_logp": jax.lax.stop_gradient(old_logp),
        "ref_logp": jax.lax.stop_gradient(ref_logp),
        "old_values": jax.lax.stop_gradient(values),
        "returns": jax.lax.stop_gradient(returns),
        "advantages": jax.lax.stop_gradient(advantages),
        "stats": {
            "rm_score": jnp.mean(rm.sum(-1)),
            "safety_penalty": jnp.mean(safety.sum(-1)),
            "kl": jnp.mean(kl.sum(-1)),  # sampled KL(pi || ref) per response
            "kl_estimate": jnp.mean(estimate.sum(-1)),  # the configured estimator, per response
            "return": jnp.mean(returns[:, 0]),
            "response_len": jnp.mean(mask.sum(-1)),
        },
    }


def loss_fn(trainable: dict, state: TrainState, mb: dict, ptx: dict) -> tuple[jax.Array, dict]:
    """Clipped surrogate + vf_coef * clipped value loss + ptx_coef * L_SFT."""
    cfg, fam = state.cfg, state.family
    policy = trainable["policy"]
    logp = fam.response_logprobs(policy, mb["prompt"], mb["prompt_mask"], mb["response"],
                                 cfg.temperature)
    pg_loss, metrics = kernels.clipped_surrogate(logp, mb["old_logp"], mb["advantages"],
                                                 mb["mask"], cfg.clip)
    loss, extra = pg_loss, {}
    if cfg.kl_placement == "loss":  # gradient through log pi: k2 -> KL(pi||ref), k3 -> KL(ref||pi)
        kl_loss = kernels.masked_mean(kl_estimators.loss_penalty(cfg.kl_estimator, logp, mb["ref_logp"], mb["mask"]),
                                      mb["mask"])
        loss, extra = loss + state.extras["kl_coef"] * kl_loss, {"kl_loss": kl_loss}
    if cfg.ptx_coef > 0:  # static: at 0 the demonstration pass would only add 0 * L_SFT
        ptx_loss = _ptx_loss(fam, policy, ptx)
        loss, extra = loss + cfg.ptx_coef * ptx_loss, {**extra, "ptx_loss": ptx_loss}
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


def step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
    """One PPO iteration (rollout + all update epochs) as one pure function."""
    cfg = state.cfg
    k_sample, k_shuffle = jax.random.split(key)
    roll = rollout(state, batch, k_sample)
    ptx = {"ptx_tokens": batch["ptx_tokens"], "ptx_mask": batch["ptx_mask"]}
    fields = ("prompt", "prompt_mask", "response", "mask", "old_logp", "old_values", "returns", "advantages")
    if cfg.kl_placement == "loss":
        fields += ("ref_logp",)
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
    start = state.params
    (trainable, opt_state, skipped), mb_metrics = jax.lax.scan(
        epoch, (start, state.opt_state, state.skipped), epoch_keys
    )
    new, metrics = rl.finish_iteration(state, trainable, opt_state, skipped, roll["stats"], mb_metrics)
    if cfg.ptx_coef == 0:  # not trained on: reported once, for the policy kept
        metrics["ptx_loss"] = _ptx_loss(state.family, new.params["policy"], ptx)
    return new, metrics


def evaluate(state: TrainState, demo_counts: jax.Array) -> dict:
    """Exact objective terms where the family has a closed form (else empty)."""
    return {} if state.family.exact_objective is None else rl.exact_terms(state, demo_counts)


# --------------------------------------------------------------------------- the stage in the table
SHOW = ("rm_score", "kl", "safety_penalty")
sampled_objective = rl.sampled_objective


def setup(ctx: StageContext, key: jax.Array) -> Setup:
    cfg, trees = ctx.cfg.ppo, rl.start_trees(ctx, ctx.cfg.ppo)
    k_value, k_train, k_eval = split(key, 3)
    value = ctx.family.init_value(k_value) if ctx.family.init_value is not None else None
    start = init(cfg, ctx.family, trees["policy"], trees["ref"], trees["reward"], trees["penalty"], value=value)
    start = start.replace(host_reward=ctx.host_reward)
    return Setup(start, rl.prompt_data(ctx), k_train, cfg.iterations, cfg.log_every,
                 extra={"start": start, "eval_key": k_eval, "algorithm": "ppo"})


def report(ctx: StageContext, setup_: Setup, state: TrainState) -> dict:
    return rl.report(ctx, setup_, state, select_batch)


export, seed_independence, SWEEP_SETTERS = rl.export, rl.seed_independence, rl.SWEEP_SETTERS
