"""The shared core of the group-relative, critic-free RL stages: GRPO, Dr. GRPO, RLOO.

One ``step`` is one whole iteration, compiled as a single function (as ``ppo.step``):

1. ``select_batch`` draws ``rollouts / G`` prompts and repeats each G times, so rows
   ``g*G .. g*G + G - 1`` of a batch form group g (G = ``cfg.group_size``).
2. rollout: one response per row; its *sequence* reward
       R = RM(prompt, response) - sum_t s[y_t] - no_eos_penalty * [no EOS]
           - kl_coef * sum_t k(y_t)                       (placement "reward" only)
   and one advantage per response, relative to its group (``group_advantages``):
   mean baseline (GRPO, optionally / group std) or leave-one-out baseline (RLOO).
   Every token of a response gets the response's advantage: sequence-level credit,
   so any sequence reward is handled (nothing assumes it is a sum over tokens).
3. ``epochs`` x ``minibatches`` updates of the (optionally clipped) surrogate
       -(1/B) sum_i sum_t w_it min(rho_it A_i, clip(rho_it) A_i)
   with token weights w_it = mask/|o_i| (GRPO's length normalisation) or
   mask/response_len (Dr. GRPO, RLOO), plus kl_coef * (1/B) sum_i sum_t w_it k_it
   for placement "loss" (gradient through log pi; ``codex_jax.core.kl``).
4. the adaptive KL coefficient (Ziegler et al., on the sampled k1 KL, as PPO) and the
   KL guard in "skip" mode.

Fixed points on the unigram family: ``experiments/FIXED_POINTS.md``.

data = {"prompt": int32 [N, P], "prompt_mask": [N, P], ...}  (PPO's prompt pool; the
ptx fields are ignored: these stages have no PPO-ptx term).  The task reward is
``rl.task_reward``: the reward model and/or a host execution reward, as PPO's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config.algorithms import GroupRLConfig
from codex_jax.core import kernels, kl
from codex_jax.core.keys import split, to_device
from codex_jax.core.optim import apply_gradients, make_optimizer
from codex_jax.core.sharding import shard_rows
from codex_jax.core.state import TrainState, init_state
from codex_jax.models.family import Family, response_mask, sample_with_logprobs
from codex_jax.stages import rl
from codex_jax.stages.context import Setup, StageContext

# added to the group std before dividing (as TRL's GRPO): a group whose rewards differ
# only by float rounding must not be blown up to unit-scale advantages
GROUP_STD_EPS = 1e-4
MINIBATCH_FIELDS = ("prompt", "prompt_mask", "response", "mask", "old_logp", "ref_logp", "advantages")


def init(cfg: GroupRLConfig, family: Family, policy, ref, reward, penalty) -> TrainState:
    """params = {"policy"} (trained); extras = {"ref", "reward" (frozen), "penalty" f32 [V],
    "kl_coef" f32 [] (controller state)}: PPO's names, so ``rl.exact_terms``,
    ``rl.sampled_objective``, the guards and the sweep setters apply unchanged."""
    tx = make_optimizer(cfg.optim, cfg.iterations * cfg.epochs * cfg.minibatches)
    extras = {"ref": ref, "reward": reward, "penalty": to_device(penalty, np.float32),
              "kl_coef": to_device(cfg.kl_coef, np.float32)}
    return init_state({"policy": policy}, family, cfg, tx, extras)


def select_batch(state: TrainState, data: dict, key: jax.Array) -> dict:
    """``rollouts / G`` prompts drawn with replacement, each repeated G times in a row.
    -> {"prompt_id": int32 [rollouts] (row of the pool: the problem, for an execution
    reward), "prompt": int32 [rollouts, P], "prompt_mask": [rollouts, P]}."""
    cfg = state.cfg
    idx = jax.random.randint(key, (cfg.groups,), 0, data["prompt"].shape[0])
    idx = jnp.repeat(idx, cfg.group_size)
    return {"prompt_id": idx, "prompt": data["prompt"][idx], "prompt_mask": data["prompt_mask"][idx]}


def group_advantages(rewards: jax.Array, group_size: int, baseline: str, scale: bool) -> jax.Array:
    """Advantages of rewards [N] in consecutive groups of ``group_size``.  -> f32 [N].

    baseline "mean":          A_i = R_i - mean_g R     (scale: / (std_g R + GROUP_STD_EPS),
                                                         std with Bessel's correction)
    baseline "leave_one_out": A_i = R_i - (sum_g R - R_i) / (G - 1) = G/(G-1) (R_i - mean_g R)
    """
    r = rewards.astype(jnp.float32).reshape(-1, group_size)  # [N/G, G]
    mean = jnp.mean(r, axis=-1, keepdims=True)
    if baseline == "mean":
        adv = r - mean
    elif baseline == "leave_one_out":
        adv = r - (jnp.sum(r, axis=-1, keepdims=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"baseline must be 'mean' or 'leave_one_out', got {baseline!r}")
    if scale:
        std = jnp.sqrt(jnp.sum(jnp.square(r - mean), axis=-1, keepdims=True) / (group_size - 1))
        adv = adv / (std + GROUP_STD_EPS)
    return adv.reshape(-1)


def token_weights(mask: jax.Array, length_normalise: bool, response_len: int) -> jax.Array:
    """Weight of each token in the per-response loss.  mask [B, T] -> f32 [B, T].

    length_normalise: 1/|o_i| (each response counts once, whatever its length);
    else 1/response_len, a constant (Dr. GRPO: long responses are not favoured when
    wrong nor penalised when right)."""
    mask = mask.astype(jnp.float32)
    if length_normalise:
        return mask / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
    return mask / response_len


def sequence_rewards(state: TrainState, batch: dict, response, mask) -> dict:
    """Sequence reward terms of responses [B, T] -> {"rm" [B], "safety" [B]}.

    "rm" is the task reward (``rl.task_reward``: the RM score and/or the host execution
    reward), whitened if ``whiten_rewards``, minus the no-EOS penalty; "safety" =
    sum_t s[y_t] over valid tokens."""
    cfg, fam, e = state.cfg, state.family, state.extras
    prompt, pmask = batch["prompt"], batch["prompt_mask"]
    last = (jnp.arange(mask.shape[-1]) == mask.sum(-1, keepdims=True) - 1).astype(jnp.float32)
    rm = rl.task_reward(state, batch["prompt_id"], prompt, pmask, response, mask, last).sum(-1)  # [B]
    if cfg.whiten_rewards:
        rm = rm * jax.lax.rsqrt(kernels.masked_var(rm, jnp.ones_like(rm)) + kernels.EPS)
    if fam.eos_id is not None and cfg.no_eos_penalty:
        no_eos = 1.0 - jnp.any((response == fam.eos_id) & (mask > 0), axis=-1)
        rm = rm - cfg.no_eos_penalty * no_eos
    return {"rm": rm, "safety": (e["penalty"][response] * mask).sum(-1)}


def rollout(state: TrainState, batch: dict, key: jax.Array) -> dict:
    """Responses, their log-probs and group-relative advantages; no gradients flow here."""
    cfg, fam, e = state.cfg, state.family, state.extras
    policy, prompt, pmask = state.params["policy"], batch["prompt"], batch["prompt_mask"]
    response, old_logp = sample_with_logprobs(fam, policy, key, prompt, pmask, cfg.response_len, cfg.temperature)
    mask = response_mask(response, fam.eos_id)
    old_logp = old_logp * mask
    ref_logp = fam.response_logprobs(e["ref"], prompt, pmask, response, cfg.temperature) * mask
    terms = sequence_rewards(state, batch, response, mask)
    k1 = kl.reward_penalty("k1", old_logp, ref_logp, mask)  # [B] sampled KL(pi || ref)
    estimate = kl.reward_penalty(cfg.kl_estimator, old_logp, ref_logp, mask)  # [B]
    score = terms["rm"] - terms["safety"]
    if cfg.kl_placement == "reward":
        score = score - e["kl_coef"] * estimate
    adv = group_advantages(score, cfg.group_size, cfg.baseline, cfg.scale_rewards)
    group_std = jnp.std(score.reshape(-1, cfg.group_size), axis=-1)
    return {
        "prompt": prompt, "prompt_mask": pmask, "response": response, "mask": mask,
        "old_logp": jax.lax.stop_gradient(old_logp),
        "ref_logp": jax.lax.stop_gradient(ref_logp),
        "advantages": jax.lax.stop_gradient(adv),
        "stats": {
            "rm_score": jnp.mean(terms["rm"]),
            "safety_penalty": jnp.mean(terms["safety"]),
            "kl": jnp.mean(k1),  # sampled k1 KL(pi || ref) per response (guards, controller)
            "kl_estimate": jnp.mean(estimate),  # the configured estimator, per response
            "reward": jnp.mean(score),  # the sequence reward the advantages are built from
            "group_reward_std": jnp.mean(group_std),
            "zero_std_groups": jnp.mean((group_std == 0).astype(jnp.float32)),  # groups with no signal
            "response_len": jnp.mean(mask.sum(-1)),
        },
    }


def loss_fn(trainable: dict, state: TrainState, mb: dict) -> tuple[jax.Array, dict]:
    """Surrogate (+ kl_coef * KL loss for placement "loss") on a minibatch of B responses."""
    cfg, fam = state.cfg, state.family
    logp = fam.response_logprobs(trainable["policy"], mb["prompt"], mb["prompt_mask"], mb["response"],
                                 cfg.temperature)  # [B, T]
    mask = mb["mask"]
    weights = token_weights(mask, cfg.length_normalise, cfg.response_len)
    n = mask.shape[0]
    # padded positions get log rho = 0, so exp never sees an unmasked log-prob there
    log_ratio = jnp.where(mask > 0, logp - jax.lax.stop_gradient(mb["old_logp"]), 0.0)
    ratio = jnp.exp(log_ratio)
    adv = jax.lax.stop_gradient(mb["advantages"])[:, None]
    if cfg.clip is None:
        surrogate, clipped = ratio * adv, jnp.zeros_like(ratio)
    else:
        surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cfg.clip, 1.0 + cfg.clip) * adv)
        clipped = (jnp.abs(ratio - 1.0) > cfg.clip).astype(jnp.float32)
    pg_loss = -jnp.sum(surrogate * weights) / n
    metrics = {"pg_loss": pg_loss, "clip_fraction": kernels.masked_mean(clipped, mask),
               # k3 of KL(old || new) on the old policy's samples
               "approx_kl": kernels.masked_mean(jnp.expm1(log_ratio) - log_ratio, mask)}
    loss = pg_loss
    if cfg.kl_placement == "loss":
        kl_loss = jnp.sum(kl.loss_penalty(cfg.kl_estimator, logp, mb["ref_logp"], mask) * weights) / n
        loss = loss + state.extras["kl_coef"] * kl_loss
        metrics["kl_loss"] = kl_loss
    return loss, {**metrics, "loss": loss}


def step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
    """One iteration (group rollout + all update epochs) as one pure function.

    Metrics: rollout stats (rm_score, safety_penalty, kl, kl_estimate, reward,
    group_reward_std, zero_std_groups, response_len), minibatch means (loss, pg_loss,
    kl_loss for placement "loss", clip_fraction, approx_kl), kl_coef (used this
    iteration), skipped, kl_skipped, and exact_kl of the rollout policy where the
    family has a closed form."""
    cfg = state.cfg
    k_sample, k_shuffle = jax.random.split(key)
    roll = rollout(state, batch, k_sample)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def minibatch_update(carry, idx):
        trainable, opt_state, skipped = carry
        mb = shard_rows({name: roll[name][idx] for name in MINIBATCH_FIELDS})  # data-parallel on a mesh
        grads, metrics = grad_fn(trainable, state, mb)
        trainable, opt_state, ok = apply_gradients(state.tx, trainable, opt_state, grads)
        return (trainable, opt_state, skipped + 1 - ok.astype(jnp.int32)), metrics

    def epoch(carry, epoch_key):
        perm = jax.random.permutation(epoch_key, cfg.rollouts)  # mixes groups: advantages are fixed
        return jax.lax.scan(minibatch_update, carry, perm.reshape(cfg.minibatches, -1))

    start = state.params
    (trainable, opt_state, skipped), mb_metrics = jax.lax.scan(
        epoch, (start, state.opt_state, state.skipped), jax.random.split(k_shuffle, cfg.epochs))
    return rl.finish_iteration(state, trainable, opt_state, skipped, roll["stats"], mb_metrics)


# --------------------------------------------------------------------------- the stage in the table
SHOW = ("rm_score", "kl", "safety_penalty")


def setup(ctx: StageContext, key: jax.Array, cfg: GroupRLConfig, algorithm: str) -> Setup:
    """The stage ready to train from M1 against RM (``rl.start_trees``), on PPO's prompt pool."""
    trees = rl.start_trees(ctx, cfg)
    k_train, k_eval = split(key)
    start = init(cfg, ctx.family, trees["policy"], trees["ref"], trees["reward"], trees["penalty"])
    start = start.replace(host_reward=ctx.host_reward)  # the execution reward, if the run has one
    return Setup(start, rl.prompt_data(ctx), k_train, cfg.iterations, cfg.log_every,
                 extra={"start": start, "eval_key": k_eval, "algorithm": algorithm})


def report(ctx: StageContext, setup_: Setup, state: TrainState) -> dict:
    return rl.report(ctx, setup_, state, select_batch)
