"""The registry of model families: name -> constructor of a complete ``Family``.

Constructors are cached, so the same (name, vocabulary size, model config) gives the
same hashable object and jitted functions that take the family as a static argument
compile once.  A new family = one module in ``models/`` + one entry in ``FAMILIES``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from codex_jax.config.pipeline import MODELS, TransformerConfig
from codex_jax.config.tokenizers import EOS_ID
from codex_jax.errors import ConfigError
from codex_jax.models import symbolic
from codex_jax.models.family import Family


def unigram(vocab_size: int, model_cfg: Any = None) -> Family:
    """The exact symbolic family (unigram LM + bag-of-words RM); no model config."""
    del model_cfg
    return symbolic.unigram_family(vocab_size)


@functools.lru_cache(maxsize=None)
def transformer(vocab_size: int, cfg: TransformerConfig) -> Family:
    """Decoder-only transformer policy, reward model and critic; EOS-terminated responses."""
    from codex_jax.models import generate  # deferred: symbolic runs never import flax.linen
    from codex_jax.models import transformer as tf

    p = functools.partial
    return Family(
        name="transformer",
        vocab_size=vocab_size,
        init_policy=p(tf.init_policy, cfg, vocab_size),
        token_nll=p(tf.token_nll, cfg, vocab_size),
        response_logprobs=p(tf.response_logprobs, cfg, vocab_size),
        sample=p(generate.sample, cfg, vocab_size),
        sample_with_logprobs=p(generate.sample_with_logprobs, cfg, vocab_size),
        init_reward=p(tf.init_reward, cfg, vocab_size),
        reward_token_scores=p(tf.reward_token_scores, cfg, vocab_size),
        reward_l2=tf.reward_l2,
        init_value=p(tf.init_value, cfg, vocab_size),
        values=p(tf.values, cfg, vocab_size),
        eos_id=EOS_ID,
        random_init=True,
    )


FAMILIES: dict[str, Callable[[int, Any], Family]] = {"unigram": unigram, "transformer": transformer}
assert tuple(FAMILIES) == MODELS, "config.MODELS and the registry must name the same families"


def make_family(name: str, vocab_size: int, model_cfg: Any = None) -> Family:
    """The family called ``name`` over ``vocab_size`` ids."""
    if name not in FAMILIES:
        raise ConfigError(f"model must be one of {tuple(FAMILIES)}, got {name!r}")
    return FAMILIES[name](vocab_size, model_cfg)


def family_for(cfg: Any, vocab_size: int) -> Family:
    """The family a pipeline config selects, with its model config."""
    return make_family(cfg.model, vocab_size, cfg.transformer if cfg.model == "transformer" else None)
