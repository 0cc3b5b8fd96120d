"""Byte-level BPE tokenizer, trained with Hugging Face ``tokenizers``.

A drop-in alternative to :class:`codex_jax.data.tokenizer.Tokenizer`: the same special
tokens at ids 0..3 (``<pad> <unk> <bos> <eos>``), the same ``encode`` /
``encode_many`` / ``encode_batch`` / ``decode`` / ``save`` / ``load`` /
``fingerprint`` surface, and the same :class:`~codex_jax.data.tokenizer.EncodedBatch`.

Text is mapped to UTF-8 bytes, each byte to one of 256 printable characters
(GPT-2's byte-level alphabet), split by GPT-2's pre-tokenizer regex, and merged
by the learned BPE merges. Every byte has a token, so encoding never produces
UNK and ``decode(encode(text)) == text`` for every str that is valid Unicode (no
lone surrogates). Ids 4..259 are the 256 byte tokens in code point order; ids
260.. are the merges in the order they were learned.

Literal special-token text: the tokenizer that HF training returns matches
``"<eos>"`` etc. in the input and turns it into the control id, which would
break the exact round trip. So the trained vocabulary and merges are re-wrapped
in a plain ``models.BPE`` without added tokens: ``"<eos>"`` in text encodes as
its bytes (``<``, ``eos``, ``>``), and only ids 0..3 stand for the specials.
(GPT-2's regex never puts ``<`` and a letter in one pre-token, so no merge can
recreate a special token's string.)

Determinism. Given the same texts (as a multiset) and config, training gives
the same vocabulary and merges in any document order, any number of threads
and any process, because HF's BPE trainer
  * counts pre-tokens and pairs by summation (thread and order independent),
  * assigns the base alphabet's ids after sorting it by code point, and
  * picks each merge from a heap with a total order (count, then the pair's
    ids), and gives the new token the next id;
no step depends on hash-map iteration order or on randomness. (The one known
order-dependent path in HF, ids of ``continuing_subword_prefix`` /
``end_of_word_suffix`` tokens, huggingface/tokenizers#1794, is not used here.)
Documents are therefore not sorted before training. tests/test_bpe.py checks
shuffled corpora, fresh processes and ``RAYON_NUM_THREADS=1`` against the default.

Persistence: ``to_json`` stores the config, the tokens in id order and the merges
in our own small format (not HF's tokenizer.json, whose layout changes between
``tokenizers`` releases: merges were "a b" strings before 0.20, pairs since), so
files and fingerprints stay valid across ``tokenizers`` versions. ``hf_json()``
gives an equivalent HF tokenizer.json for use with other tools.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from codex_jax.config.checks import is_int
from codex_jax.config.tokenizers import MIN_BPE_VOCAB_SIZE, BPEConfig
from codex_jax.data.records import atomic_write_bytes
from codex_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK,
    UNK_ID,
    EncodedBatch,
    pack_ids,
    read_json_header,
)
from codex_jax.errors import ConfigError, DataError

__all__ = ["BPEConfig", "BPETokenizer", "BYTE_ALPHABET", "MIN_VOCAB_SIZE"]

_FORMAT, _VERSION = "codex-jax-bpe", 1
_INT32_MAX = int(np.iinfo(np.int32).max)


def _hf():
    """Import ``tokenizers`` lazily: only BPE users need it."""
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("codex_jax.data.bpe needs the 'tokenizers' package (pip install 'tokenizers>=0.19')") from e
    return tokenizers


def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's 256 byte characters (HF's ``ByteLevel.alphabet()``), in code point
    order, as HF assigns their ids: printable Latin-1 bytes stand for themselves,
    the other 68 bytes map to U+0100.. in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [0x100 + k for k in range(256 - len(printable))]
    return tuple(sorted(map(chr, printable + shifted)))


BYTE_ALPHABET = _byte_alphabet()
MIN_VOCAB_SIZE = MIN_BPE_VOCAB_SIZE  # 260: specials + one token per byte
assert MIN_VOCAB_SIZE == len(SPECIAL_TOKENS) + len(BYTE_ALPHABET)
_ALPHABET_SET = frozenset(BYTE_ALPHABET)


def _check_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{what} must be a str, got {type(text).__name__}")
    return text


def _surrogate_error(texts: Sequence[str], what: str) -> DataError:
    """The DataError for the first text that is not encodable as UTF-8."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return DataError(f"{what} {i} contains an unpaired surrogate (not valid Unicode text)")
    return DataError(f"{what}: not valid Unicode text")


def _check_model(tokens: tuple, merges: tuple, config: BPEConfig) -> None:
    """Raise DataError unless (tokens, merges) is a byte-level BPE model valid for config."""
    if tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise DataError(f"tokens must start with {SPECIAL_TOKENS}, got {tokens[:len(SPECIAL_TOKENS)]}")
    if len(tokens) > config.vocab_size:
        raise DataError(f"{len(tokens)} tokens exceed bpe vocab_size={config.vocab_size}")
    index = {}
    for i, tok in enumerate(tokens):
        if not isinstance(tok, str) or not tok:
            raise DataError(f"token {i} must be a non-empty string, got {tok!r}")
        if tok in index:
            raise DataError(f"token {tok!r} appears more than once (ids {index[tok]} and {i})")
        if i >= len(SPECIAL_TOKENS) and not _ALPHABET_SET.issuperset(tok):
            bad = next(c for c in tok if c not in _ALPHABET_SET)
            raise DataError(f"token {i} {tok!r} has {bad!r}, which is not a byte-level character")
        index[tok] = i
    missing = [c for c in BYTE_ALPHABET if c not in index]
    if missing:
        raise DataError(f"{len(missing)} of the 256 byte tokens are missing (e.g. {missing[0]!r}); "
                        "a byte-level vocabulary needs all of them")
    specials = set(SPECIAL_TOKENS)
    seen = set()
    for k, pair in enumerate(merges):
        if (not isinstance(pair, tuple) or len(pair) != 2
                or not all(isinstance(p, str) and p in index for p in pair)):
            raise DataError(f"merge {k} must be a pair of vocabulary tokens, got {pair!r}")
        merged = pair[0] + pair[1]
        if merged not in index or merged in specials or pair[0] in specials or pair[1] in specials:
            raise DataError(f"merge {k} {pair!r} must join two non-special tokens into a vocabulary token")
        if pair in seen:
            raise DataError(f"merge {k} {pair!r} appears more than once")
        seen.add(pair)


def _make_hf(tokens: tuple[str, ...], merges: tuple[tuple[str, str], ...]):
    """The HF tokenizer for a checked model: no added tokens, normalizer or post-processor."""
    hf = _hf()
    model = hf.models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=list(merges), unk_token=UNK)
    tok = hf.Tokenizer(model)
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    return tok


def _merge_pair(m: object) -> tuple | object:
    """A merge as stored by HF: [a, b] (tokenizers >= 0.20) or "a b" (earlier)."""
    if isinstance(m, list):
        return tuple(m)
    if isinstance(m, str) and m.count(" ") == 1:
        return tuple(m.split(" "))
    return m


class BPETokenizer:
    """A trained byte-level BPE: ``tokens[i]`` is the token of id i (``tokens[:4] ==
    SPECIAL_TOKENS``, then the 256 byte tokens, then merge results); ``merges`` are
    the learned (left, right) pairs in priority order. Immutable; equal when config,
    tokens and merges are equal."""

    __slots__ = ("config", "tokens", "merges", "_hf_tok", "_index")

    def __init__(self, config: BPEConfig, tokens: Sequence[str], merges: Sequence[tuple[str, str]]):
        if not isinstance(config, BPEConfig):
            raise ConfigError(f"config must be a BPEConfig, got {type(config).__name__}")
        if not isinstance(tokens, (list, tuple)):
            raise DataError(f"tokens must be a tuple of str, got {type(tokens).__name__}")
        if not isinstance(merges, (list, tuple)):
            raise DataError(f"merges must be a tuple of (str, str) pairs, got {type(merges).__name__}")
        tokens = tuple(tokens)
        merges = tuple(tuple(m) if isinstance(m, list) else m for m in merges)
        _check_model(tokens, merges, config)
        try:
            hf_tok = _make_hf(tokens, merges)
        except Exception as e:  # HF raises its own exception types for a bad model
            raise DataError(f"not a valid BPE model: {e}") from None
        for name, value in (("config", config), ("tokens", tokens), ("merges", merges), ("_hf_tok", hf_tok),
                            ("_index", {tok: i for i, tok in enumerate(tokens)})):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BPETokenizer):
            return NotImplemented
        return (self.config, self.tokens, self.merges) == (other.config, other.tokens, other.merges)

    def __hash__(self) -> int:
        return hash((self.config, self.tokens, self.merges))

    def __reduce__(self):  # pickling (e.g. multiprocessing) rebuilds the HF object
        return (self.__class__, (self.config, self.tokens, self.merges))

    def __repr__(self) -> str:
        return f"BPETokenizer(config={self.config!r}, vocab_size={self.vocab_size}, merges={len(self.merges)})"

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, texts: Iterable[str], config: BPEConfig) -> BPETokenizer:
        """Train on ``texts``: up to ``config.vocab_size - 260`` merges of pairs that
        occur at least ``config.min_frequency`` times. The result depends only on
        the multiset of texts and the config (see the module docstring)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of strings, not a single string")
        if not isinstance(config, BPEConfig):
            raise ConfigError(f"config must be a BPEConfig, got {type(config).__name__}")
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_text(text, f"text {i}")
        if not any(texts):
            raise DataError(f"empty corpus: {len(texts)} texts, none with any character")
        try:
            "".join(texts).encode("utf-8")
        except UnicodeEncodeError:
            raise _surrogate_error(texts, "text") from None
        hf = _hf()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=config.vocab_size, min_frequency=config.min_frequency,
            special_tokens=list(SPECIAL_TOKENS), initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False)
        tok = hf.Tokenizer(hf.models.BPE(unk_token=UNK))
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        model = json.loads(tok.to_str())["model"]
        vocab = model["vocab"]
        tokens = [None] * len(vocab)
        for t, i in vocab.items():
            tokens[i] = t
        return cls(config, tuple(tokens), tuple(_merge_pair(m) for m in model["merges"]))

    # ------------------------------------------------------------------ lookup
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_id(self, token: str) -> int:
        """Id of the vocabulary string ``token`` (special tokens included; byte-level
        spelling, e.g. ``"Ġreturn"`` for ``" return"``); UNK_ID if unknown."""
        return self._index.get(token, UNK_ID)

    def split(self, text: str) -> list[str]:
        """Text -> BPE token strings (byte-level spelling)."""
        return self._hf_tok.encode(self._text(text), add_special_tokens=False).tokens

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _text(text: object) -> str:
        _check_text(text, "text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError("text contains an unpaired surrogate (not valid Unicode text)") from None
        return text

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS. Never UNK; literal "<eos>" etc. encode as text."""
        return self._hf_tok.encode(self._text(text), add_special_tokens=False).ids

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Texts -> list of int32 [n_i] id arrays (HF batch encoding, multi-threaded)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a sequence of strings, not a single string")
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_text(text, f"text {i}")
        if not texts:
            return []
        try:  # some tokenizers versions raise on lone surrogates, others drop them silently
            "".join(texts).encode("utf-8")
        except UnicodeEncodeError:
            raise _surrogate_error(texts, "text") from None
        batch = getattr(self._hf_tok, "encode_batch_fast", None) or self._hf_tok.encode_batch  # fast: >= 0.21
        encs = batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def encode_batch(self, texts: Sequence[str], *, max_len: int | None = None, add_bos: bool = False,
                     add_eos: bool = False, pad_to_multiple: int = 1) -> EncodedBatch:
        """Texts -> padded batch [B, L], exactly as Tokenizer.encode_batch: BOS/EOS are
        added before cutting each row to max_len from the tail (the BOS stays, the EOS
        goes); L is rounded up to pad_to_multiple."""
        pack_ids([], max_len=max_len, pad_to_multiple=pad_to_multiple)  # ConfigError before any work
        seqs = self.encode_many(texts)
        if add_bos or add_eos:
            head = np.array([BOS_ID] if add_bos else [], np.int32)
            tail = np.array([EOS_ID] if add_eos else [], np.int32)
            seqs = [np.concatenate((head, s, tail)) for s in seqs]
        return pack_ids(seqs, max_len=max_len, pad_to_multiple=pad_to_multiple)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Ids -> text; the exact inverse of encode(). skip_special drops PAD/BOS/EOS
        but keeps UNK (as "<unk>"); with skip_special=False the specials appear as
        their names. Ids that cut a multi-byte character give U+FFFD."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        n = len(self.tokens)
        out = []
        for i in ids:
            if not is_int(i) or not 0 <= i < n:
                raise DataError(f"id {i!r} is not in the vocabulary [0, {n})")
            if skip_special and (i == PAD_ID or i == BOS_ID or i == EOS_ID):
                continue
            out.append(int(i))
        return self._hf_tok.decode(out, skip_special_tokens=False)

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        """A JSON-ready dict that from_json() turns back into an equal tokenizer."""
        return {"format": _FORMAT, "version": _VERSION, "config": dataclasses.asdict(self.config),
                "tokens": list(self.tokens), "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_json(cls, obj: object) -> BPETokenizer:
        """Inverse of to_json(); DataError on any malformed content."""
        config = read_json_header(obj, what="BPE tokenizer", keys=("config", "format", "merges", "tokens", "version"),
                                  fmt=_FORMAT, version=_VERSION, config_cls=BPEConfig)
        if not isinstance(obj["tokens"], list):
            raise DataError(f"BPE tokens must be a list, got {type(obj['tokens']).__name__}")
        if not isinstance(obj["merges"], list):
            raise DataError(f"BPE merges must be a list, got {type(obj['merges']).__name__}")
        for k, m in enumerate(obj["merges"]):
            if not isinstance(m, list):
                raise DataError(f"merge {k} must be a [left, right] list, got {m!r}")
        return cls(config, tuple(obj["tokens"]), tuple(tuple(m) for m in obj["merges"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write to_json() to ``path`` atomically."""
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=1)
        atomic_write_bytes(path, (text + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a file written by save()."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DataError(f"{path}: not a valid BPE tokenizer JSON file: {e}") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
        try:
            return cls.from_json(obj)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of to_json() (which fixes the HF tokenizer:
        pre-tokenizer and decoder are constant): equal tokenizers, equal fingerprints,
        whatever the ``tokenizers`` version."""
        canon = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def hf_json(self) -> str:
        """An equivalent HF tokenizer.json (``tokenizers.Tokenizer.from_str``), for other tools."""
        return self._hf_tok.to_str()
