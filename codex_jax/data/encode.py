"""Records -> the token arrays every stage trains on (host side, NumPy).

corpus -> packed stream rows   tokens int32 [R, C], mask [R, C]    (EOS after each document)
demos  -> SFT rows             prompt completion [EOS], loss on completion + EOS
          (a model's own start token, e.g. the transformer's BOS, is added by the family, so
          SFT rows and PPO prompts look the same to it)
prefs  -> pair arrays          prompt [N, P], chosen / rejected [N, T] with masks
A fraction of the corpus documents and of the demonstrations (``heldout_fraction``) is
held out for perplexity / held-out loss, chosen by content hash: the same records
are held out for every seed and every model, and no held-out text is trained on.
Every id is checked against the vocabulary here, on the host, because a gather in
JAX clamps an out-of-range id silently.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from codex_jax.config import DataConfig
from codex_jax.data.records import Dataset
from codex_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, pack_ids
from codex_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class EncodedData:
    corpus_tokens: np.ndarray  # int32 [R, C]
    corpus_mask: np.ndarray  # f32 [R, C]
    sft_tokens: np.ndarray  # int32 [D, L]
    sft_mask: np.ndarray  # f32 [D, L]  loss mask: completion + EOS
    prompt: np.ndarray  # int32 [D, P]  demonstration prompts (the PPO prompt pool)
    prompt_mask: np.ndarray  # f32 [D, P]
    pairs: dict  # reward.PAIR_FIELDS -> arrays
    vocab_size: int
    # held-out records (None when the split holds none out): evaluation only
    heldout_corpus_tokens: np.ndarray | None = None  # int32 [R', C]
    heldout_corpus_mask: np.ndarray | None = None  # f32 [R', C]
    heldout_sft_tokens: np.ndarray | None = None  # int32 [D', L']
    heldout_sft_mask: np.ndarray | None = None  # f32 [D', L']

    @property
    def num_corpus_tokens(self) -> int:
        return int(self.corpus_mask.sum())


def check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    """Raises DataError if any id is outside [0, vocab_size)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise DataError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def heldout_flags(records: list[str], fraction: float) -> np.ndarray:
    """bool [n]: the floor(n * fraction) records with the smallest sha256 are held out.

    A content hash, not a key: the split is the same for every seed, so runs with
    different seeds are scored on the same held-out text."""
    n = len(records)
    n_held = int(n * fraction)
    flags = np.zeros(n, bool)
    if n_held:
        digests = [hashlib.sha256(r.encode("utf-8", "surrogatepass")).digest() for r in records]
        flags[sorted(range(n), key=lambda i: (digests[i], i))[:n_held]] = True
    return flags


def pack_stream(docs: list[np.ndarray], context_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates documents (each followed by EOS) and cuts rows of context_len."""
    stream = np.concatenate([np.append(d.astype(np.int32), EOS_ID) for d in docs]) if docs else np.zeros(0, np.int32)
    rows = max(-(-stream.size // context_len), 1)
    tokens = np.full(rows * context_len, PAD_ID, np.int32)
    tokens[: stream.size] = stream
    mask = np.zeros(rows * context_len, np.float32)
    mask[: stream.size] = 1.0
    return tokens.reshape(rows, context_len), mask.reshape(rows, context_len)


def sft_rows(prompts: list[np.ndarray], completions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """prompt completion [EOS] rows and their completion-only loss mask."""
    seqs, masks = [], []
    for p, c in zip(prompts, completions):
        seqs.append(np.concatenate([p, c, [EOS_ID]]).astype(np.int32))
        masks.append(np.concatenate([np.zeros(p.size), np.ones(c.size + 1)]).astype(np.int32))
    tokens = pack_ids(seqs).ids
    mask = pack_ids(masks).ids.astype(np.float32)
    return tokens, mask


def encode_dataset(dataset: Dataset, tokenizer: Tokenizer, cfg: DataConfig) -> EncodedData:
    """Tokenises and arranges every record; raises DataError on empty results."""
    V = tokenizer.vocab_size
    corpus_docs = tokenizer.encode_many(dataset.corpus.texts)
    held_doc = heldout_flags(list(dataset.corpus.texts), cfg.heldout_fraction)
    corpus_tokens, corpus_mask = pack_stream([d for d, h in zip(corpus_docs, held_doc) if not h], cfg.context_len)
    held = {}
    if held_doc.any():
        held["heldout_corpus_tokens"], held["heldout_corpus_mask"] = pack_stream(
            [d for d, h in zip(corpus_docs, held_doc) if h], cfg.context_len)

    prompts = [p[: cfg.max_prompt_len] for p in tokenizer.encode_many(dataset.demos.prompts)]
    completions = [c[: cfg.max_response_len] for c in tokenizer.encode_many(dataset.demos.completions)]
    held_demo = heldout_flags([p + "\0" + c for p, c in zip(dataset.demos.prompts, dataset.demos.completions)],
                              cfg.heldout_fraction)
    if held_demo.any():
        held["heldout_sft_tokens"], held["heldout_sft_mask"] = sft_rows(
            [p for p, h in zip(prompts, held_demo) if h], [c for c, h in zip(completions, held_demo) if h])
        prompts = [p for p, h in zip(prompts, held_demo) if not h]
        completions = [c for c, h in zip(completions, held_demo) if not h]
    sft_tokens, sft_mask = sft_rows(prompts, completions)
    prompt = pack_ids(prompts)

    def enc(texts, limit):
        return pack_ids([x[:limit] for x in tokenizer.encode_many(texts)])

    pp = enc(dataset.prefs.prompts, cfg.max_prompt_len)
    ch = enc(dataset.prefs.chosen, cfg.max_response_len)
    rj = enc(dataset.prefs.rejected, cfg.max_response_len)
    pairs = {
        "prompt": pp.ids, "prompt_mask": pp.mask.astype(np.float32),
        "chosen": ch.ids, "chosen_mask": ch.mask.astype(np.float32),
        "rejected": rj.ids, "rejected_mask": rj.mask.astype(np.float32),
    }
    for name, arr in [("corpus", corpus_tokens), ("demos", sft_tokens), ("prefs.prompt", pp.ids),
                      ("prefs.chosen", ch.ids), ("prefs.rejected", rj.ids),
                      *[(k, v) for k, v in held.items() if k.endswith("tokens")]]:
        check_ids(name, arr, V)
    if corpus_mask.sum() == 0:
        raise DataError("corpus: no tokens after tokenisation (an empty corpus)")
    return EncodedData(
        corpus_tokens=corpus_tokens, corpus_mask=corpus_mask,
        sft_tokens=sft_tokens, sft_mask=sft_mask,
        prompt=prompt.ids, prompt_mask=prompt.mask.astype(np.float32),
        pairs=pairs, vocab_size=V, **held,
    )
