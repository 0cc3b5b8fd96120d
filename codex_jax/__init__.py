"""codex-jax: Codex-style training (pretrain -> SFT -> reward model -> PPO RLHF) in JAX."""

__version__ = "0.1.0"
