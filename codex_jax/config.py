"""Frozen, keyword-only configs for every stage, validated on construction.

Each config rejects a bad value with a ``ConfigError`` that names the field and the
value.  ``PipelineConfig`` nests the stage configs and loads from TOML or JSON with
unknown keys rejected by their dotted path (``ppo.kl_coef``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
import sys
import typing
from typing import Any

from codex_jax.errors import ConfigError
from codex_jax.bpe import BPEConfig
from codex_jax.tokenizer import TokenizerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib


# --------------------------------------------------------------------------- checks
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(obj: Any, name: str, *, minimum: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(
            f"{type(obj).__name__}.{name} must be an integer >= {minimum}, got {value!r}"
        )


def _check_float(
    obj: Any, name: str, *, low: float, high: float = math.inf, low_open: bool = False
) -> None:
    value = getattr(obj, name)
    bad = not _is_number(value) or not math.isfinite(value)
    if not bad:
        bad = value <= low if low_open else value < low
        bad = bad or value > high
    if bad:
        bound = f"> {low}" if low_open else f">= {low}"
        if high != math.inf:
            bound += f" and <= {high}"
        raise ConfigError(f"{type(obj).__name__}.{name} must be a finite number {bound}, got {value!r}")


def _check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{type(obj).__name__}.{name} must be one of {choices}, got {value!r}")


def _check_bool(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{type(obj).__name__}.{name} must be true or false, got {value!r}")


# --------------------------------------------------------------------------- optimiser
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
        _check_choice(self, "name", ("adam", "adamw", "sgd"))
        _check_float(self, "lr", low=0.0, low_open=True)
        _check_choice(self, "schedule", ("constant", "cosine"))
        _check_float(self, "final_lr_fraction", low=0.0, high=1.0)
        _check_int(self, "warmup_steps", minimum=0)
        _check_float(self, "weight_decay", low=0.0)
        _check_float(self, "grad_clip", low=0.0)


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
        _check_choice(self, "mode", ("exact", "gradient"))
        _check_int(self, "steps", minimum=1)
        _check_int(self, "batch_size", minimum=1)
        _check_float(self, "smoothing", low=0.0)
        _check_int(self, "log_every", minimum=1)


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
        _check_int(self, "steps", minimum=1)
        _check_int(self, "batch_size", minimum=1)
        _check_float(self, "l2", low=0.0)
        _check_float(self, "heldout_fraction", low=0.0, high=0.5)
        _check_int(self, "log_every", minimum=1)


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
            _check_int(self, name, minimum=1)
        _check_float(self, "clip", low=0.0, low_open=True)
        _check_float(self, "kl_coef", low=0.0)
        if self.kl_target is not None:
            _check_float(self, "kl_target", low=0.0, low_open=True)
        _check_choice(self, "reference", ("pretrain", "sft"))
        _check_float(self, "gamma", low=0.0, high=1.0)
        _check_float(self, "gae_lambda", low=0.0, high=1.0)
        _check_bool(self, "whiten_advantages")
        _check_bool(self, "whiten_rewards")
        _check_float(self, "vf_coef", low=0.0)
        _check_float(self, "value_clip", low=0.0, low_open=True)
        _check_float(self, "no_eos_penalty", low=0.0)
        _check_float(self, "temperature", low=0.0, low_open=True)
        _check_float(self, "ptx_coef", low=0.0)
        _check_float(self, "safety_penalty", low=0.0)
        if self.max_kl is not None:
            _check_float(self, "max_kl", low=0.0, low_open=True)
        _check_choice(self, "kl_guard", ("stop", "skip"))
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
            _check_int(self, name, minimum=1)
        _check_int(self, "context_len", minimum=2)
        _check_int(self, "top_k", minimum=0)
        _check_float(self, "top_p", low=0.0, high=1.0, low_open=True)
        _check_choice(self, "positions", ("rotary", "learned"))
        _check_choice(self, "dtype", ("float32", "bfloat16"))
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
            _check_float(self, name, low=0.0)


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
            _check_int(self, name, minimum=2)
        _check_float(self, "heldout_fraction", low=0.0, high=0.5)


MODELS = ("unigram", "transformer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Everything one ``codex-jax run`` uses; hashed into the manifest."""

    seed: int = 0
    model: str = "unigram"
    checkpoint_every: int = 100  # steps between resumable checkpoints (0: stage ends only)
    max_consecutive_skips: int = 5  # non-finite updates in a row before the run stops
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()  # the regex tokenizer (unigram model)
    bpe: BPEConfig = BPEConfig()  # the byte-level BPE tokenizer (transformer model)
    transformer: TransformerConfig = TransformerConfig()
    pretrain: LMConfig = LMConfig(mode="exact", smoothing=0.1)
    sft: LMConfig = LMConfig(steps=100, batch_size=256, optim=OptimConfig(lr=0.02))
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    objective: ObjectiveConfig = ObjectiveConfig()

    def __post_init__(self):
        _check_int(self, "seed", minimum=0)
        if self.seed >= 2**32:  # jax.random.key keeps 32 bits: larger seeds would collide
            raise ConfigError(f"PipelineConfig.seed must be < 2**32, got {self.seed!r}")
        _check_int(self, "checkpoint_every", minimum=0)
        _check_int(self, "max_consecutive_skips", minimum=1)
        _check_choice(self, "model", MODELS)
        if self.sft.mode != "gradient":
            raise ConfigError(f"PipelineConfig.sft.mode must be 'gradient', got {self.sft.mode!r}")
        if self.model == "transformer":
            if self.pretrain.mode != "gradient":
                raise ConfigError("pretrain.mode must be 'gradient' for model 'transformer' "
                                  f"(only the unigram has a closed form), got {self.pretrain.mode!r}")
            need = max(self.data.context_len, self.data.max_prompt_len + self.data.max_response_len + 1,
                       self.data.max_prompt_len + self.ppo.response_len)
            if self.transformer.context_len < need:
                raise ConfigError(f"transformer.context_len must be >= {need} (data.context_len, prompt + "
                                  f"response lengths), got {self.transformer.context_len!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        return sha256_json(self.to_dict())


def sha256_json(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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


# --------------------------------------------------------------------------- device mesh
MESH_AXES = ("data", "model")
_MESH_PART = re.compile(r"^\s*(data|model)\s*=\s*([0-9]+)\s*$")


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=4"`` or ``"data=2,model=2"`` -> {"data": 2, "model": 2} (missing axes = 1)."""
    sizes: dict[str, int] = {}
    for part in str(spec).split(","):
        m = _MESH_PART.match(part)
        if m is None:
            raise ConfigError(f"--mesh {spec!r}: each part must be data=N or model=M (N, M >= 1), got {part!r}")
        name, size = m.group(1), int(m.group(2))
        if name in sizes:
            raise ConfigError(f"--mesh {spec!r}: axis {name!r} given twice")
        if size < 1:
            raise ConfigError(f"--mesh {spec!r}: axis {name!r} must have size >= 1, got {size}")
        sizes[name] = size
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def mesh_flags(mesh: dict | None) -> list[str]:
    """CLI flags that recreate a recorded mesh (manifest "mesh"); [] for one device."""
    if not mesh:
        return []
    flags = ["--mesh", f"data={int(mesh.get('data', 1))},model={int(mesh.get('model', 1))}"]
    return flags + (["--fsdp"] if mesh.get("fsdp") else [])
