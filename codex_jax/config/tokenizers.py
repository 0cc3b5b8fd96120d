"""Tokenizer configs (regex / whitespace and byte-level BPE) and the special tokens
every tokenizer reserves at ids 0..3 (configs validate sizes against them)."""

from __future__ import annotations

import dataclasses

import numpy as np

from codex_jax.config.checks import is_int
from codex_jax.errors import ConfigError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
TOKENIZER_MODES = ("regex", "whitespace")
NUM_BYTE_TOKENS = 256  # byte-level BPE: one token per byte value
MIN_BPE_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS  # 260
INT32_MAX = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """How text is split and which tokens enter the vocabulary."""

    mode: str = "regex"  # "regex": words and single punctuation marks; "whitespace": str.split()
    lowercase: bool = False
    min_count: int = 1  # a token must occur at least this often to get an id
    max_size: int = 8192  # total vocabulary size, the 4 special tokens included

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in TOKENIZER_MODES:
            raise ConfigError(f"TokenizerConfig.mode must be one of {TOKENIZER_MODES}, got {self.mode!r}")
        if not isinstance(self.lowercase, bool):
            raise ConfigError(f"TokenizerConfig.lowercase must be a bool, got {self.lowercase!r}")
        if not is_int(self.min_count) or self.min_count < 1:
            raise ConfigError(f"TokenizerConfig.min_count must be an int >= 1, got {self.min_count!r}")
        if not is_int(self.max_size) or self.max_size < len(SPECIAL_TOKENS) + 1:
            raise ConfigError(f"TokenizerConfig.max_size must be an int >= 5 (4 special tokens + 1), "
                              f"got {self.max_size!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BPEConfig:
    """BPE training settings."""

    vocab_size: int = 8192  # upper bound on the vocabulary, the 4 specials and 256 byte tokens included
    min_frequency: int = 2  # a pair must occur at least this often to be merged

    def __post_init__(self):
        if not is_int(self.vocab_size) or not MIN_BPE_VOCAB_SIZE <= self.vocab_size <= INT32_MAX:
            raise ConfigError(f"BPEConfig.vocab_size must be an int in [{MIN_BPE_VOCAB_SIZE}, {INT32_MAX}] "
                              f"(4 special tokens + 256 byte tokens at least), got {self.vocab_size!r}")
        if not is_int(self.min_frequency) or not 1 <= self.min_frequency <= INT32_MAX:
            raise ConfigError(f"BPEConfig.min_frequency must be an int in [1, {INT32_MAX}], "
                              f"got {self.min_frequency!r}")
        for name in ("vocab_size", "min_frequency"):  # np.int64 -> int, so to_json() can serialise it
            object.__setattr__(self, name, int(getattr(self, name)))
