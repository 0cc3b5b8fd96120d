"""RLHF stage (M2) by RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline.

Each prompt gets k = ``group_size`` responses; response i's advantage is its sequence
reward minus the mean reward of the other k - 1,

    A_i = R_i - (1/(k-1)) sum_{j != i} R_j        (an unbiased baseline: it does not
                                                   depend on y_i)

and every token of it is credited with A_i (weight 1/response_len).  With ``epochs =
minibatches = 1`` and ``clip = None`` this is exactly REINFORCE; more update passes
use the importance ratio, clipped as PPO's when ``clip`` is set.  The KL to the
reference is a k1 / k2 / k3 estimator in the reward or in the loss
(``stages.group_rl``).  Because the baseline is unbiased, the expected update is
exactly grad E[R] (- kl_coef grad D for KL in the loss), so RLOO's fixed points are
the textbook ones for every placement (``experiments/FIXED_POINTS.md``).

state: params = {"policy"}; extras = {"ref", "reward", "penalty", "kl_coef"} (PPO's).
data  = PPO's prompt pool {"prompt", "prompt_mask", ...}.
"""

from __future__ import annotations

import jax

from codex_jax.config.algorithms import RLOOConfig
from codex_jax.core.state import TrainState
from codex_jax.errors import ConfigError
from codex_jax.models.family import Family
from codex_jax.stages import group_rl, ppo, rl
from codex_jax.stages.context import Setup, StageContext

select_batch, step, rollout, loss_fn = group_rl.select_batch, group_rl.step, group_rl.rollout, group_rl.loss_fn
evaluate, sampled_objective = ppo.evaluate, rl.sampled_objective
SHOW = group_rl.SHOW


def init(cfg: RLOOConfig, family: Family, policy, ref, reward, penalty) -> TrainState:
    """An RLOO state at iteration 0 (``group_rl.init``)."""
    if not isinstance(cfg, RLOOConfig):
        raise ConfigError(f"rloo.init needs an RLOOConfig, got {type(cfg).__name__}")
    return group_rl.init(cfg, family, policy, ref, reward, penalty)


# --------------------------------------------------------------------------- the stage in the table
def setup(ctx: StageContext, key: jax.Array) -> Setup:
    return group_rl.setup(ctx, key, ctx.cfg.rloo, "rloo")


def report(ctx: StageContext, setup_: Setup, state: TrainState) -> dict:
    return group_rl.report(ctx, setup_, state)


export, seed_independence, SWEEP_SETTERS = rl.export, rl.seed_independence, rl.SWEEP_SETTERS
