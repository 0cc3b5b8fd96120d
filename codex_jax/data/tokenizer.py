"""Word-level tokenizer with a deterministic, frequency-ordered vocabulary.

Ids 0..3 are always ``<pad> <unk> <bos> <eos>``; the rest are corpus tokens in
order of descending count, ties broken by the token string, so the same corpus
(in any document order) always gives the same ids.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codex_jax.config.checks import is_int
from codex_jax.config.tokenizers import (  # noqa: F401 - re-exported: the tokenizer's ids
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    INT32_MAX,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    TOKENIZER_MODES,
    UNK,
    UNK_ID,
    TokenizerConfig,
)
from codex_jax.data.records import atomic_write_bytes
from codex_jax.errors import ConfigError, DataError

MODES = TOKENIZER_MODES

_WORD_RE = re.compile(r"\w+|[^\w\s]")
_FORMAT, _VERSION = "codex-jax-tokenizer", 1
_INT32_MAX = INT32_MAX


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """A padded batch. ids int32 [B, L] (PAD_ID past each length), lengths int32 [B],
    mask bool [B, L] (True on real tokens)."""

    ids: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray


def _check_size(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


def _pack(seqs: Sequence, max_len: int | None, pad_to_multiple: int, bos: bool, eos: bool) -> EncodedBatch:
    """Pad [BOS] + seq + [EOS] per row, cut to max_len from the tail; vectorised over all tokens."""
    _check_size("max_len", max_len, allow_none=True)
    _check_size("pad_to_multiple", pad_to_multiple, allow_none=False)
    if isinstance(seqs, (str, bytes)):
        raise TypeError(f"expected a list of 1-D id arrays, got {type(seqs).__name__}")
    b = len(seqs)
    if b == 0:
        return EncodedBatch(ids=np.zeros((0, 0), np.int32), lengths=np.zeros((0,), np.int32),
                            mask=np.zeros((0, 0), bool))
    n = np.fromiter(map(len, seqs), dtype=np.int64, count=b)
    try:
        flat = np.concatenate([np.asarray(s) for s in seqs]) if n.sum() else np.zeros((0,), np.int64)
    except ValueError:
        flat = np.zeros((0, 0))  # mixed ranks: reported just below
    if flat.ndim != 1:
        raise DataError("each sequence must be a 1-D array of ids")
    if flat.size:
        if not np.issubdtype(flat.dtype, np.integer):
            raise DataError(f"ids must be integers, got dtype {flat.dtype}")
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi > _INT32_MAX:
            raise DataError(f"ids must lie in [0, {_INT32_MAX}], got values in [{lo}, {hi}]")
    full = n + int(bos) + int(eos)
    lengths = full if max_len is None else np.minimum(full, max_len)
    width = int(lengths.max())
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids = np.full((b, width), PAD_ID, np.int32)
    if bos:
        ids[lengths > 0, 0] = BOS_ID
    # Flat position of every token within its own row; keep only those that fit.
    starts = np.cumsum(n) - n
    row = np.repeat(np.arange(b), n)
    pos = np.arange(flat.size) - np.repeat(starts, n)
    keep = pos < np.repeat(lengths - int(bos), n)
    ids[row[keep], pos[keep] + int(bos)] = flat[keep]
    if eos:
        fits = lengths == full  # EOS is the last token, so it survives only without truncation
        ids[fits, (n + int(bos))[fits]] = EOS_ID
    mask = np.arange(width)[None, :] < lengths[:, None]
    return EncodedBatch(ids=ids, lengths=lengths.astype(np.int32), mask=mask)


def pack_ids(seqs: Sequence[np.ndarray], *, max_len: int | None = None, pad_to_multiple: int = 1) -> EncodedBatch:
    """Pad 1-D int id arrays into [B, L]; each cut to max_len, L = longest rounded up to pad_to_multiple."""
    return _pack(seqs, max_len, pad_to_multiple, bos=False, eos=False)


def _check_tokens(tokens: tuple, config: TokenizerConfig) -> None:
    """Raise DataError unless tokens is a valid id -> token table for config."""
    if tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise DataError(f"tokens must start with {SPECIAL_TOKENS}, got {tokens[:len(SPECIAL_TOKENS)]}")
    if len(tokens) <= len(SPECIAL_TOKENS):
        raise DataError("tokens hold no token besides the 4 special tokens")
    if len(tokens) > config.max_size:
        raise DataError(f"{len(tokens)} tokens exceed tokenizer.max_size={config.max_size}")
    for i, tok in enumerate(tokens):
        # decode() joins with spaces, so a token with whitespace could not round-trip.
        if not isinstance(tok, str) or not tok or tok != "".join(tok.split()):
            raise DataError(f"token {i} must be a non-empty string without whitespace, got {tok!r}")
    if len(set(tokens)) != len(tokens):
        dup = next(t for t, c in collections.Counter(tokens).items() if c > 1)
        raise DataError(f"token {dup!r} appears more than once")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A fixed vocabulary: ``tokens[i]`` is the token of id i; ``tokens[:4] == SPECIAL_TOKENS``."""

    config: TokenizerConfig
    tokens: tuple[str, ...] = dataclasses.field(repr=False)

    def __post_init__(self):
        if not isinstance(self.config, TokenizerConfig):
            raise ConfigError(f"config must be a TokenizerConfig, got {type(self.config).__name__}")
        if isinstance(self.tokens, (list, tuple)):
            object.__setattr__(self, "tokens", tuple(self.tokens))
        else:
            raise DataError(f"tokens must be a tuple of str, got {type(self.tokens).__name__}")
        _check_tokens(self.tokens, self.config)
        # Text spelling "<eos>" etc. is a word, not a control token: only the
        # specials' own ids may produce them, so encode() maps them to UNK.
        text_index = {tok: i for i, tok in enumerate(self.tokens)}
        for tok in SPECIAL_TOKENS:
            text_index[tok] = UNK_ID
        object.__setattr__(self, "_index", {tok: i for i, tok in enumerate(self.tokens)})
        object.__setattr__(self, "_text_index", text_index)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
        """Count the tokens of ``texts`` and keep the ``max_size - 4`` most frequent with count >= min_count."""
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not a single string")
        if not isinstance(config, TokenizerConfig):
            raise ConfigError(f"config must be a TokenizerConfig, got {type(config).__name__}")
        counts: collections.Counter[str] = collections.Counter()
        split = _splitter(config)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"text {i} must be a str, got {type(text).__name__}")
            counts.update(split(text))
        for tok in SPECIAL_TOKENS:  # a literal "<pad>" in whitespace mode must not get a second id
            counts.pop(tok, None)
        kept = [(tok, c) for tok, c in counts.items() if c >= config.min_count]
        if not kept:
            raise DataError(f"no token occurs at least min_count={config.min_count} times "
                            f"(an empty corpus?); {len(counts)} distinct tokens seen")
        kept.sort(key=lambda tc: (-tc[1], tc[0]))
        kept = kept[: config.max_size - len(SPECIAL_TOKENS)]
        return cls(config, SPECIAL_TOKENS + tuple(tok for tok, _ in kept))

    def split(self, text: str) -> list[str]:
        """Text -> token strings (lowercased first when configured)."""
        return _splitter(self.config)(text)

    def token_id(self, token: str) -> int:
        """Id of ``token`` (special tokens included); UNK_ID if unknown."""
        return self._index.get(token, UNK_ID)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS; unknown tokens (and literal special-token text) -> UNK_ID."""
        get = self._text_index.get
        return [get(tok, UNK_ID) for tok in self.split(text)]

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Texts -> list of int32 [n_i] id arrays."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        split, get = _splitter(self.config), self._text_index.get
        out = []
        for text in texts:
            toks = split(text)
            out.append(np.fromiter(map(get, toks, itertools.repeat(UNK_ID)), dtype=np.int32, count=len(toks)))
        return out

    def encode_batch(self, texts: Sequence[str], *, max_len: int | None = None, add_bos: bool = False,
                     add_eos: bool = False, pad_to_multiple: int = 1) -> EncodedBatch:
        """Texts -> padded batch [B, L]. BOS/EOS are added before cutting each row to
        max_len from the tail (the BOS stays, the EOS goes); L is rounded up to
        pad_to_multiple so jit sees few shapes."""
        return _pack(self.encode_many(texts), max_len, pad_to_multiple, bool(add_bos), bool(add_eos))

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Ids -> tokens joined by single spaces. skip_special drops PAD/BOS/EOS but keeps
        UNK, which stands for a real word of the text."""
        tokens, n = self.tokens, len(self.tokens)
        out = []
        for i in ids:
            if not is_int(i) or not 0 <= i < n:
                raise DataError(f"id {i!r} is not in the vocabulary [0, {n})")
            if skip_special and (i == PAD_ID or i == BOS_ID or i == EOS_ID):
                continue
            out.append(tokens[i])
        return " ".join(out)

    def to_json(self) -> dict:
        """A JSON-ready dict that from_json() turns back into an equal tokenizer."""
        return {"format": _FORMAT, "version": _VERSION,
                "config": dataclasses.asdict(self.config), "tokens": list(self.tokens)}

    @classmethod
    def from_json(cls, obj: object) -> Tokenizer:
        """Inverse of to_json(); DataError on any malformed content."""
        config = read_json_header(obj, what="tokenizer", keys=("format", "version", "config", "tokens"),
                                  fmt=_FORMAT, version=_VERSION, config_cls=TokenizerConfig)
        if not isinstance(obj["tokens"], list):
            raise DataError(f"tokenizer tokens must be a list, got {type(obj['tokens']).__name__}")
        return cls(config, tuple(obj["tokens"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write to_json() to ``path`` atomically."""
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=1)
        atomic_write_bytes(path, (text + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a file written by save()."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{path}: not a valid tokenizer JSON file: {e}") from None
        except RecursionError:
            raise DataError(f"{path}: not a valid tokenizer JSON file: nested too deeply") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
        try:
            return cls.from_json(obj)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of to_json(): equal tokenizers, equal fingerprints."""
        canon = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def read_json_header(obj: object, *, what: str, keys: tuple[str, ...], fmt: str, version: int,
                     config_cls: type) -> Any:
    """Checks a saved tokenizer's keys, format and version; returns its validated config.
    Any malformed content is a DataError naming ``what``."""
    if not isinstance(obj, dict):
        raise DataError(f"{what} JSON must be an object, got {type(obj).__name__}")
    if set(obj) != set(keys):
        raise DataError(f"{what} JSON must have keys {', '.join(keys)}; got {sorted(obj)}")
    if obj["format"] != fmt or obj["version"] != version:
        raise DataError(f"not a {fmt} v{version} file: format={obj['format']!r} version={obj['version']!r}")
    cfg = obj["config"]
    names = {f.name for f in dataclasses.fields(config_cls)}
    if not isinstance(cfg, dict) or set(cfg) != names:
        raise DataError(f"{what} config must be an object with keys {sorted(names)}, got {cfg!r}")
    try:
        return config_cls(**cfg)
    except ConfigError as e:
        raise DataError(f"bad {what} config: {e}") from None


def _splitter(config: TokenizerConfig):
    """The text -> tokens function for config (lowercase, then split)."""
    base = _WORD_RE.findall if config.mode == "regex" else str.split
    if config.lowercase:
        return lambda text: base(text.lower())
    return base
