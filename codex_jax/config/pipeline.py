"""The pipeline config: model, data, tokenizers, every stage; loading from TOML / JSON.

Unknown keys are rejected by their dotted path (``ppo.kl_coef``); a file's values
go over the chosen model's defaults (``default_config``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import typing
from typing import Any

from codex_jax.config.algorithms import DPOConfig, GRPOConfig, RLOOConfig
from codex_jax.config.checks import check_choice, check_float, check_int, sha256_json
from codex_jax.config.stages import LMConfig, OptimConfig, PPOConfig, RewardConfig
from codex_jax.config.tasks import TasksConfig
from codex_jax.config.tokenizers import BPEConfig, TokenizerConfig
from codex_jax.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """A small decoder-only transformer (``model = "transformer"``)."""

    layers: int = 2
    d_model: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    context_len: int = 256  # longest prompt + response the model attends over
    positions: str = "rotary"  # "rotary" | "learned"
    dtype: str = "float32"  # activations: "float32" | "bfloat16" (params stay float32)
    top_k: int = 0  # sampling: 0 disables
    top_p: float = 1.0  # sampling: nucleus mass; 1 disables

    def __post_init__(self):
        for name in ("layers", "d_model", "heads", "mlp_ratio"):
            check_int(self, name, minimum=1)
        check_int(self, "context_len", minimum=2)
        check_int(self, "top_k", minimum=0)
        check_float(self, "top_p", low=0.0, high=1.0, low_open=True)
        check_choice(self, "positions", ("rotary", "learned"))
        check_choice(self, "dtype", ("float32", "bfloat16"))
        if self.d_model % self.heads:
            raise ConfigError(f"TransformerConfig.heads must divide d_model ({self.d_model}), got {self.heads!r}")
        if self.positions == "rotary" and (self.d_model // self.heads) % 2:
            raise ConfigError(f"TransformerConfig.heads: rotary positions need an even head size, "
                              f"got d_model/heads = {self.d_model // self.heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """Weights of U = alpha * L_SFT + beta * L_RLHF + gamma * Omega."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma"):
            check_float(self, name, low=0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How records become token arrays."""

    context_len: int = 256  # rows of the packed pretraining stream
    max_prompt_len: int = 64
    max_response_len: int = 192
    # corpus documents / demonstrations held out for evaluation (chosen by content hash)
    heldout_fraction: float = 0.05

    def __post_init__(self):
        for name in ("context_len", "max_prompt_len", "max_response_len"):
            check_int(self, name, minimum=2)
        check_float(self, "heldout_fraction", low=0.0, high=0.5)


MODELS = ("unigram", "transformer")
ALGORITHMS = ("ppo", "grpo", "rloo", "dpo")  # stages.table.RL_STAGES: how M2 is trained


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Everything one ``codex-jax run`` uses; hashed into the manifest."""

    seed: int = 0
    model: str = "unigram"
    algorithm: str = "ppo"  # M2 by "ppo" | "grpo" (also Dr. GRPO) | "rloo" | "dpo"
    checkpoint_every: int = 100  # steps between resumable checkpoints (0: stage ends only)
    # an intermediate checkpoint is written only once this many seconds have passed since the
    # stage's last one (or its start), so a stage of a few seconds saves its end only; a
    # crash loses at most this much work.  0: at every checkpoint_every steps
    checkpoint_min_seconds: float = 30.0
    max_consecutive_skips: int = 5  # non-finite updates in a row before the run stops
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()  # the regex tokenizer (unigram model)
    bpe: BPEConfig = BPEConfig()  # the byte-level BPE tokenizer (transformer model)
    transformer: TransformerConfig = TransformerConfig()
    pretrain: LMConfig = LMConfig(mode="exact", smoothing=0.1)
    sft: LMConfig = LMConfig(steps=100, batch_size=256, optim=OptimConfig(lr=0.02))
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    rloo: RLOOConfig = RLOOConfig()
    dpo: DPOConfig = DPOConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    tasks: TasksConfig = TasksConfig()

    def __post_init__(self):
        check_int(self, "seed", minimum=0)
        if self.seed >= 2**32:  # jax.random.key keeps 32 bits: larger seeds would collide
            raise ConfigError(f"PipelineConfig.seed must be < 2**32, got {self.seed!r}")
        check_int(self, "checkpoint_every", minimum=0)
        check_float(self, "checkpoint_min_seconds", low=0.0)
        check_int(self, "max_consecutive_skips", minimum=1)
        check_choice(self, "model", MODELS)
        check_choice(self, "algorithm", ALGORITHMS)
        if self.sft.mode != "gradient":
            raise ConfigError(f"PipelineConfig.sft.mode must be 'gradient', got {self.sft.mode!r}")
        if self.tasks.enabled and self.model != "transformer":
            raise ConfigError("tasks.enabled needs model 'transformer' (a context-free unigram cannot write "
                              f"a program), got model {self.model!r}")
        if self.tasks.enabled and self.data.heldout_fraction != 0:
            raise ConfigError("tasks.enabled: set data.heldout_fraction = 0 (the task set holds out whole "
                              f"problems by parameter), got {self.data.heldout_fraction!r}")
        if self.model == "transformer":
            if self.pretrain.mode != "gradient":
                raise ConfigError("pretrain.mode must be 'gradient' for model 'transformer' "
                                  f"(only the unigram has a closed form), got {self.pretrain.mode!r}")
            rl_len = getattr(getattr(self, self.algorithm), "response_len", self.ppo.response_len)
            need = max(self.data.context_len, self.data.max_prompt_len + self.data.max_response_len + 1,
                       self.data.max_prompt_len + self.ppo.response_len, self.data.max_prompt_len + rl_len)
            if self.transformer.context_len < need:
                raise ConfigError(f"transformer.context_len must be >= {need} (data.context_len, prompt + "
                                  f"response lengths), got {self.transformer.context_len!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        return sha256_json(self.to_dict())


# --------------------------------------------------------------------------- loading
def from_dict(cls: type, data: Any, path: str = "", base: Any = None) -> Any:
    """Builds dataclass ``cls`` from nested dicts over ``base`` (default ``cls()``).

    Keys not given keep the base's values, so ``[sft] steps = 10`` keeps the
    pipeline's other SFT defaults.  Unknown keys name their dotted path.
    """
    base = cls() if base is None else base
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table/object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = ", ".join(repr(f"{path + '.' if path else ''}{k}") for k in unknown)
        raise ConfigError(f"unknown config key(s): {dotted}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        dotted = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, dotted, getattr(base, name))
        elif hint == tuple[str, ...]:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{dotted} must be a list of strings, got {value!r}")
            kwargs[name] = tuple(value)
        elif hint in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
            try:  # 1 and 1.0 must give the same config (and config hash)
                kwargs[name] = float(value)
            except OverflowError:
                raise ConfigError(f"{dotted} must be a finite number, got an integer of "
                                  f"{len(str(value))} digits") from None
        else:
            kwargs[name] = value
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if path else str(err)) from None


def default_config(model: str = "unigram") -> PipelineConfig:
    """The defaults of each model family.

    The transformer trains every stage with optax on short sequences sized for a
    2-core CPU run of a few minutes; its PPO follows the InstructGPT recipe
    (critic, GAE gamma=1 lambda=0.95, adaptive KL, EOS-terminated responses).
    """
    if model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}, got {model!r}")
    if model == "unigram":
        return PipelineConfig()
    adam = lambda lr, **kw: OptimConfig(lr=lr, grad_clip=1.0, **kw)  # noqa: E731
    return PipelineConfig(
        model="transformer",
        checkpoint_every=50,
        data=DataConfig(context_len=128, max_prompt_len=48, max_response_len=64),
        bpe=BPEConfig(vocab_size=4096),
        transformer=TransformerConfig(layers=2, d_model=128, heads=4, context_len=128),
        pretrain=LMConfig(mode="gradient", steps=300, batch_size=32, log_every=25,
                          optim=adam(3e-3, schedule="cosine", warmup_steps=20, final_lr_fraction=0.1)),
        sft=LMConfig(steps=150, batch_size=32, log_every=25, optim=adam(1e-3, schedule="cosine")),
        reward=RewardConfig(steps=150, batch_size=32, log_every=25, l2=0.0,
                            optim=adam(1e-3, schedule="cosine")),
        ppo=PPOConfig(iterations=20, rollouts=32, response_len=32, epochs=4, minibatches=4,
                      kl_coef=0.05, kl_target=6.0, kl_horizon=10_000, gamma=1.0, gae_lambda=0.95,
                      whiten_rewards=True, no_eos_penalty=1.0, ptx_batch_size=8, log_every=5,
                      optim=adam(1e-4)),
        # critic-free methods: the same generated tokens per iteration as PPO (32 x 32)
        grpo=GRPOConfig(iterations=20, rollouts=32, group_size=4, response_len=32, epochs=4, minibatches=4,
                        kl_coef=0.05, whiten_rewards=True, no_eos_penalty=1.0, log_every=5, optim=adam(1e-4)),
        rloo=RLOOConfig(iterations=20, rollouts=32, group_size=4, response_len=32, kl_coef=0.05,
                        whiten_rewards=True, no_eos_penalty=1.0, log_every=5, optim=adam(1e-4)),
        dpo=DPOConfig(beta=0.1, steps=150, batch_size=32, log_every=25, optim=adam(1e-4)),
    )


def load_config(path: str | pathlib.Path | None, **overrides: Any) -> PipelineConfig:
    """Reads a TOML or JSON pipeline config over the model's defaults; top-level
    ``overrides`` win (e.g. seed, model)."""
    data: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        raw = path.read_bytes()
        try:
            if path.suffix == ".json":
                data = json.loads(raw.decode("utf-8"))
            else:
                data = tomllib.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ConfigError(f"{path}: cannot parse config: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a table/object")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    model = data.get("model", "unigram")
    if model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}, got {model!r}")
    return from_dict(PipelineConfig, data, base=default_config(model))


