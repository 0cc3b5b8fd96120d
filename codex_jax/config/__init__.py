"""Frozen, keyword-only configs for every stage, validated on construction.

Each config rejects a bad value with a ``ConfigError`` that names the field and the
value.  ``PipelineConfig`` nests the stage configs and loads from TOML or JSON.
The package re-exports every config so users write ``from codex_jax.config import
PipelineConfig``; inside the package, modules import the sub-module they need.
"""

from codex_jax.config.algorithms import DPOConfig, GRPOConfig, RLOOConfig
from codex_jax.config.checks import sha256_json
from codex_jax.config.mesh import MESH_AXES, mesh_flags, parse_mesh
from codex_jax.config.pipeline import (
    MODELS,
    DataConfig,
    ObjectiveConfig,
    PipelineConfig,
    TransformerConfig,
    default_config,
    from_dict,
    load_config,
)
from codex_jax.config.stages import DEFAULT_UNSAFE_TOKENS, LMConfig, OptimConfig, PPOConfig, RewardConfig
from codex_jax.config.tasks import TasksConfig
from codex_jax.config.tokenizers import BPEConfig, TokenizerConfig

__all__ = [
    "BPEConfig", "DEFAULT_UNSAFE_TOKENS", "DPOConfig", "DataConfig", "GRPOConfig", "LMConfig", "MESH_AXES",
    "MODELS", "ObjectiveConfig", "OptimConfig", "PPOConfig", "PipelineConfig", "RLOOConfig", "RewardConfig",
    "TasksConfig", "TokenizerConfig", "TransformerConfig", "default_config", "from_dict", "load_config",
    "mesh_flags", "parse_mesh", "sha256_json",
]
