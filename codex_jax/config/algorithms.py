"""Configs of the RLHF algorithms beside PPO: GRPO / Dr. GRPO, RLOO (group-relative,
critic-free, on-policy) and DPO (offline, on preference pairs).

The on-policy configs mirror ``PPOConfig`` field for field where a field applies
(iterations, rollouts, response_len, epochs, minibatches, clip, kl_coef, the adaptive
controller kl_target / kl_horizon, reference, whiten_rewards, no_eos_penalty,
temperature, safety_penalty, unsafe_tokens, the KL guard, log_every, optim), so a
state of either stage has PPO's names and the driver, guards and sweep treat it alike.
What they add:

* ``group_size`` G: each iteration samples ``rollouts / G`` prompts and G responses
  to each; advantages are relative to the other responses of the same prompt.
* ``kl_estimator`` ("k1" | "k2" | "k3") and ``kl_placement`` ("reward" | "loss"):
  which per-token estimate of the KL to the reference is used, and whether it is a
  stop-gradient penalty inside the sequence reward or a loss term differentiated
  through log pi (``codex_jax.core.kl``).  Each pair has its own fixed point
  (``experiments/FIXED_POINTS.md``); the defaults (k1 in the reward) optimise
  E[R] - kl_coef KL(pi || pi_ref), the objective of the rest of the pipeline.
"""

from __future__ import annotations

import dataclasses

from codex_jax.config.checks import check_bool, check_choice, check_float, check_int
from codex_jax.config.stages import DEFAULT_UNSAFE_TOKENS, OptimConfig
from codex_jax.errors import ConfigError

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("reward", "loss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupRLConfig:
    """The fields GRPO and RLOO share (see the module docstring); not a stage by itself."""

    iterations: int = 300
    rollouts: int = 512  # responses sampled per iteration = (prompts per iteration) x group_size
    group_size: int = 8
    response_len: int = 16
    epochs: int = 4
    minibatches: int = 4
    kl_coef: float = 1.0
    kl_target: float | None = None  # switches on the adaptive controller (on the sampled k1 KL)
    kl_horizon: int = 10_000
    kl_estimator: str = "k1"
    kl_placement: str = "reward"
    reference: str = "sft"  # "pretrain" | "sft"
    whiten_rewards: bool = False  # scale RM scores by their batch std (no mean shift)
    no_eos_penalty: float = 0.0  # subtracted from responses that end without EOS
    temperature: float = 1.0
    safety_penalty: float = 5.0
    max_kl: float | None = None  # KL guard: bound on the sampled KL(pi || ref) per response
    kl_guard: str = "stop"  # "stop": end the run with an error; "skip": skip that update
    unsafe_tokens: tuple[str, ...] = DEFAULT_UNSAFE_TOKENS
    log_every: int = 25
    optim: OptimConfig = OptimConfig(lr=0.1, schedule="cosine")

    def __post_init__(self):
        for name in ("iterations", "rollouts", "response_len", "epochs", "minibatches", "kl_horizon",
                     "log_every"):
            check_int(self, name, minimum=1)
        check_int(self, "group_size", minimum=2)  # a group of one has no relative advantage
        check_float(self, "kl_coef", low=0.0)
        if self.kl_target is not None:
            check_float(self, "kl_target", low=0.0, low_open=True)
        check_choice(self, "kl_estimator", KL_ESTIMATORS)
        check_choice(self, "kl_placement", KL_PLACEMENTS)
        check_choice(self, "reference", ("pretrain", "sft"))
        check_bool(self, "whiten_rewards")
        check_float(self, "no_eos_penalty", low=0.0)
        check_float(self, "temperature", low=0.0, low_open=True)
        check_float(self, "safety_penalty", low=0.0)
        if self.max_kl is not None:
            check_float(self, "max_kl", low=0.0, low_open=True)
        check_choice(self, "kl_guard", ("stop", "skip"))
        if not isinstance(self.unsafe_tokens, tuple) or not all(
            isinstance(t, str) and t for t in self.unsafe_tokens
        ):
            raise ConfigError(f"{type(self).__name__}.unsafe_tokens must be a list of non-empty strings, "
                              f"got {self.unsafe_tokens!r}")
        name = type(self).__name__
        if self.rollouts % self.group_size:
            raise ConfigError(f"{name}.group_size must divide rollouts ({self.rollouts}), got {self.group_size!r}")
        if self.rollouts % self.minibatches:
            raise ConfigError(f"{name}.minibatches must divide rollouts ({self.rollouts}), "
                              f"got {self.minibatches!r}")

    @property
    def minibatch_size(self) -> int:
        return self.rollouts // self.minibatches

    @property
    def groups(self) -> int:
        """Prompts per iteration."""
        return self.rollouts // self.group_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(GroupRLConfig):
    """GRPO (Shao et al. 2024) and Dr. GRPO (Liu et al. 2025).

    advantage  A_i = (R_i - mean_g R) / (std_g R + eps)   if ``scale_rewards``
               A_i =  R_i - mean_g R                       otherwise (Dr. GRPO)
    loss       -(1/G) sum_i w_i sum_t min(rho A_i, clip(rho) A_i), with the token weight
               w_i = 1/|o_i| if ``length_normalise`` (GRPO) else 1/response_len (Dr. GRPO)

    Presets: ``GRPOConfig()`` is GRPO (both True); ``GRPOConfig.dr_grpo(...)`` is
    Dr. GRPO (both False).  The DeepSeekMath KL term is ``kl_estimator="k3",
    kl_placement="loss"``, whose fixed point regularises KL(pi_ref || pi) instead
    (``experiments/FIXED_POINTS.md``); the default k1-in-reward regularises KL(pi || pi_ref).
    """

    clip: float = 0.2
    scale_rewards: bool = True
    length_normalise: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_float(self, "clip", low=0.0, low_open=True)
        check_bool(self, "scale_rewards")
        check_bool(self, "length_normalise")

    @classmethod
    def dr_grpo(cls, **overrides) -> "GRPOConfig":
        """Dr. GRPO: no std scaling, no per-sequence length normalisation."""
        return cls(**{"scale_rewards": False, "length_normalise": False, **overrides})

    @property
    def variant(self) -> str:
        """"grpo", "dr_grpo", or "custom" for a mix of the two switches."""
        if self.scale_rewards and self.length_normalise:
            return "grpo"
        if not self.scale_rewards and not self.length_normalise:
            return "dr_grpo"
        return "custom"

    @property
    def baseline(self) -> str:
        return "mean"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOConfig(GroupRLConfig):
    """RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline of its k
    (= ``group_size``) samples per prompt, A_i = R_i - mean_{j != i} R_j, tokens weighted
    1/response_len.  ``clip`` None is plain importance-weighted REINFORCE (exactly
    REINFORCE at ``epochs = minibatches = 1``); a number clips the ratio as PPO does.
    """

    epochs: int = 1
    minibatches: int = 1
    clip: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.clip is not None:
            check_float(self, "clip", low=0.0, low_open=True)

    @property
    def baseline(self) -> str:
        return "leave_one_out"

    @property
    def scale_rewards(self) -> bool:
        return False

    @property
    def length_normalise(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """DPO (Rafailov et al. 2023) on the reward stage's preference pairs.

    h = [log pi(c) - log pi_ref(c)] - [log pi(r) - log pi_ref(r)]   (sequence log-probs)
    loss "sigmoid": -log sigmoid(beta h);  "ipo" (Azar et al. 2023): (h - 1 / (2 beta))^2
    plus ``l2`` * 0.5 ||theta - theta_ref||^2: with l2 = l2_RM * beta^2 the unigram DPO
    problem is exactly the reward model's (``experiments/FIXED_POINTS.md``).
    ``heldout_fraction`` is read by the caller that splits the pairs (as for the RM).
    """

    beta: float = 0.1
    loss: str = "sigmoid"
    l2: float = 0.0
    reference: str = "sft"  # "pretrain" | "sft"; the policy starts from M1 either way
    steps: int = 300
    batch_size: int = 256
    heldout_fraction: float = 0.1
    log_every: int = 50
    optim: OptimConfig = OptimConfig(lr=0.05)

    def __post_init__(self):
        check_float(self, "beta", low=0.0, low_open=True)
        check_choice(self, "loss", ("sigmoid", "ipo"))
        check_float(self, "l2", low=0.0)
        check_choice(self, "reference", ("pretrain", "sft"))
        check_int(self, "steps", minimum=1)
        check_int(self, "batch_size", minimum=1)
        check_float(self, "heldout_fraction", low=0.0, high=0.5)
        check_int(self, "log_every", minimum=1)
