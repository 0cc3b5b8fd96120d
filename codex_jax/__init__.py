"""codex-jax: Codex-style training (pretrain -> SFT -> reward model -> PPO RLHF) in JAX."""

from codex_jax.core import xla_options as _xla_options

__version__ = "0.1.0"

_xla_options.apply()  # before any computation starts XLA's backend (see core/xla_options.py)
