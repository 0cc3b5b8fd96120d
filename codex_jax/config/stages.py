"""Configs of the training stages (pretrain / SFT, reward model, PPO) and their optimiser."""

from __future__ import annotations

import dataclasses

from codex_jax.config.checks import check_bool, check_choice, check_float, check_int
from codex_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """An optax optimiser: adam/adamw/sgd with a constant or cosine-decayed rate."""

    name: str = "adam"
    lr: float = 0.05
    schedule: str = "constant"  # "constant" | "cosine" (decays to lr * final_lr_fraction)
    final_lr_fraction: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0  # adamw only
    grad_clip: float = 0.0  # global-norm clip; 0 disables

    def __post_init__(self):
        check_choice(self, "name", ("adam", "adamw", "sgd"))
        check_float(self, "lr", low=0.0, low_open=True)
        check_choice(self, "schedule", ("constant", "cosine"))
        check_float(self, "final_lr_fraction", low=0.0, high=1.0)
        check_int(self, "warmup_steps", minimum=0)
        check_float(self, "weight_decay", low=0.0)
        check_float(self, "grad_clip", low=0.0)


# --------------------------------------------------------------------------- stages
@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Pretraining (M0) or SFT (M1): masked next-token cross-entropy.

    ``mode="exact"`` (pretraining, symbolic family only) sets the maximum-likelihood
    solution with additive smoothing from token counts; ``"gradient"`` trains with optax.
    ``smoothing`` is the additive pseudo-count; in gradient mode it becomes the
    equivalent label smoothing, so both modes have the same optimum.
    """

    mode: str = "gradient"
    steps: int = 200
    batch_size: int = 64
    smoothing: float = 0.0
    log_every: int = 20
    optim: OptimConfig = OptimConfig(lr=0.05)

    def __post_init__(self):
        check_choice(self, "mode", ("exact", "gradient"))
        check_int(self, "steps", minimum=1)
        check_int(self, "batch_size", minimum=1)
        check_float(self, "smoothing", low=0.0)
        check_int(self, "log_every", minimum=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Bradley-Terry reward model on preference pairs, with L2 on the weights."""

    steps: int = 300
    batch_size: int = 256
    l2: float = 1e-4
    heldout_fraction: float = 0.1
    log_every: int = 50
    optim: OptimConfig = OptimConfig(lr=0.05)

    def __post_init__(self):
        check_int(self, "steps", minimum=1)
        check_int(self, "batch_size", minimum=1)
        check_float(self, "l2", low=0.0)
        check_float(self, "heldout_fraction", low=0.0, high=0.5)
        check_int(self, "log_every", minimum=1)


DEFAULT_UNSAFE_TOKENS = ("system", "eval", "exec", "rmtree", "popen", "__import__", "unlink", "shell")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO against the reward model with a per-token KL penalty to a reference.

    ``kl_target`` switches on the adaptive (Ziegler et al. 2019) controller; without it
    ``kl_coef`` stays fixed.  ``gamma``/``gae_lambda`` feed GAE: the symbolic policy
    is context-free, so tokens are independent and ``gamma=0`` (credit each token with
    its own reward) is the unbiased, lowest-variance choice.
    """

    iterations: int = 300
    rollouts: int = 512  # responses sampled per iteration
    response_len: int = 16
    epochs: int = 4
    minibatches: int = 4
    clip: float = 0.2
    kl_coef: float = 1.0
    kl_target: float | None = None
    kl_horizon: int = 10_000
    kl_estimator: str = "k1"  # per-token KL estimator: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r
    kl_placement: str = "reward"  # "reward": penalty in the return; "loss": a term of the policy loss
    reference: str = "sft"  # "pretrain" (as in the seed design) or "sft"
    gamma: float = 0.0
    gae_lambda: float = 1.0
    whiten_advantages: bool = True
    whiten_rewards: bool = False  # scale RM scores by their batch std (no mean shift)
    vf_coef: float = 0.1  # weight of the clipped value loss (families with a critic)
    value_clip: float = 0.2
    no_eos_penalty: float = 0.0  # subtracted from responses that end without EOS
    temperature: float = 1.0
    ptx_coef: float = 0.0  # alpha of PPO-ptx: weight of L_SFT on demonstrations
    ptx_batch_size: int = 32
    safety_penalty: float = 5.0
    max_kl: float | None = None  # KL guard: bound on the sampled KL(pi || ref) per response
    kl_guard: str = "stop"  # "stop": end the run with an error; "skip": skip that update
    unsafe_tokens: tuple[str, ...] = DEFAULT_UNSAFE_TOKENS
    log_every: int = 25  # divides checkpoint_every: every chunk has one length, one compile
    optim: OptimConfig = OptimConfig(lr=0.1, schedule="cosine")

    def __post_init__(self):
        for name in ("iterations", "rollouts", "response_len", "epochs", "minibatches",
                     "kl_horizon", "ptx_batch_size", "log_every"):
            check_int(self, name, minimum=1)
        check_float(self, "clip", low=0.0, low_open=True)
        check_float(self, "kl_coef", low=0.0)
        if self.kl_target is not None:
            check_float(self, "kl_target", low=0.0, low_open=True)
        check_choice(self, "reference", ("pretrain", "sft"))
        check_choice(self, "kl_estimator", ("k1", "k2", "k3"))
        check_choice(self, "kl_placement", ("reward", "loss"))
        check_float(self, "gamma", low=0.0, high=1.0)
        check_float(self, "gae_lambda", low=0.0, high=1.0)
        check_bool(self, "whiten_advantages")
        check_bool(self, "whiten_rewards")
        check_float(self, "vf_coef", low=0.0)
        check_float(self, "value_clip", low=0.0, low_open=True)
        check_float(self, "no_eos_penalty", low=0.0)
        check_float(self, "temperature", low=0.0, low_open=True)
        check_float(self, "ptx_coef", low=0.0)
        check_float(self, "safety_penalty", low=0.0)
        if self.max_kl is not None:
            check_float(self, "max_kl", low=0.0, low_open=True)
        check_choice(self, "kl_guard", ("stop", "skip"))
        if not isinstance(self.unsafe_tokens, tuple) or not all(
            isinstance(t, str) and t for t in self.unsafe_tokens
        ):
            raise ConfigError(
                f"PPOConfig.unsafe_tokens must be a list of non-empty strings, got {self.unsafe_tokens!r}"
            )
        if self.rollouts % self.minibatches:
            raise ConfigError(
                f"PPOConfig.minibatches must divide rollouts ({self.rollouts}), got {self.minibatches!r}"
            )

    @property
    def minibatch_size(self) -> int:
        return self.rollouts // self.minibatches


