"""RLHF stage (M2) by GRPO (Shao et al. 2024) or Dr. GRPO (Liu et al. 2025).

Critic-free: each prompt gets ``group_size`` responses and each response the
advantage of its sequence reward relative to its group,

    GRPO     A_i = (R_i - mean_g R) / (std_g R + eps),  tokens weighted 1/|o_i|
    Dr. GRPO A_i =  R_i - mean_g R,                     tokens weighted 1/response_len

then PPO's clipped surrogate for ``epochs`` x ``minibatches`` updates, with the KL to
the reference as a per-token estimator (k1 / k2 / k3) in the reward or in the loss.
The machinery is ``stages.group_rl``; the fixed point of each configuration on the
unigram family is derived in ``experiments/FIXED_POINTS.md``.  Two facts to know:

* KL in the reward (k1): the fixed point is pi* ∝ pi_ref exp((w - s) / kl_coef) for
  GRPO and Dr. GRPO alike (at pi* every response has the same KL-regularised reward,
  so every advantage is 0, whatever the scaling).
* KL in the loss: the mean baseline includes the response itself, which scales the
  policy gradient by (G - 1)/G, so Dr. GRPO's fixed point is that of kl_coef * G/(G-1);
  GRPO's std scaling changes the effective coefficient by a reward-dependent factor.

state: params = {"policy"}; extras = {"ref", "reward", "penalty", "kl_coef"} (PPO's).
data  = PPO's prompt pool {"prompt", "prompt_mask", ...}.
"""

from __future__ import annotations

import jax

from codex_jax.config.algorithms import GRPOConfig
from codex_jax.core.state import TrainState
from codex_jax.errors import ConfigError
from codex_jax.models.family import Family
from codex_jax.stages import group_rl, ppo, rl
from codex_jax.stages.context import Setup, StageContext

select_batch, step, rollout, loss_fn = group_rl.select_batch, group_rl.step, group_rl.rollout, group_rl.loss_fn
evaluate, sampled_objective = ppo.evaluate, rl.sampled_objective
SHOW = group_rl.SHOW


def init(cfg: GRPOConfig, family: Family, policy, ref, reward, penalty) -> TrainState:
    """A GRPO state at iteration 0 (``group_rl.init``)."""
    if not isinstance(cfg, GRPOConfig):
        raise ConfigError(f"grpo.init needs a GRPOConfig, got {type(cfg).__name__}")
    return group_rl.init(cfg, family, policy, ref, reward, penalty)


# --------------------------------------------------------------------------- the stage in the table
def setup(ctx: StageContext, key: jax.Array) -> Setup:
    return group_rl.setup(ctx, key, ctx.cfg.grpo, "grpo")


def report(ctx: StageContext, setup_: Setup, state: TrainState) -> dict:
    return group_rl.report(ctx, setup_, state)


export, seed_independence, SWEEP_SETTERS = rl.export, rl.seed_independence, rl.SWEEP_SETTERS
