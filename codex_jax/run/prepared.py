"""A disk cache of prepared data: the tokenizer and the encoded arrays of one data set.

Building the tokenizer and encoding ~17k records is seconds of pure-Python regex work
that every run of the same data repeats; the cache keeps its result under a key that
covers everything the result depends on: the records themselves (their text, hashed),
the model family, the tokenizer / BPE / data configs and the library version.  A hit
returns arrays equal to a fresh ``prepare`` (a test checks it); a missing, stale or
unreadable entry is rebuilt and rewritten atomically (nothing half-written is ever
read: the entry is renamed into place only when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable

import numpy as np

import codex_jax
from codex_jax.config.pipeline import PipelineConfig
from codex_jax.data.encode import EncodedData
from codex_jax.data.records import Dataset
from codex_jax.data.snapshot import records_digest

_ARRAYS = ("corpus_tokens", "corpus_mask", "sft_tokens", "sft_mask", "prompt", "prompt_mask",
           "heldout_corpus_tokens", "heldout_corpus_mask", "heldout_sft_tokens", "heldout_sft_mask")


def cache_key(dataset: Dataset, cfg: PipelineConfig) -> str:
    """What the prepared data depend on, hashed."""
    c = cfg.to_dict()
    shaping = {"version": codex_jax.__version__, "model": c["model"], "tokenizer": c["tokenizer"],
               "bpe": c["bpe"], "data": c["data"], "records": records_digest(dataset)}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def _save(entry: pathlib.Path, tokenizer, enc: EncodedData) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        arrays = {name: getattr(enc, name) for name in _ARRAYS if getattr(enc, name) is not None}
        arrays.update({f"pairs.{k}": v for k, v in enc.pairs.items()})
        for name, value in arrays.items():  # one .npy per array: a hit maps them, no zip to unpack
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(value))
        meta = {"vocab_size": enc.vocab_size, "tokenizer_kind": type(tokenizer).__name__, "arrays": sorted(arrays),
                "tokenizer": tokenizer.to_json()}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(tmp, entry)  # atomic; an entry another process wrote meanwhile stays
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(entry: pathlib.Path, tokenizer_classes: dict):
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    tokenizer = tokenizer_classes[meta["tokenizer_kind"]].from_json(meta["tokenizer"])
    # read-only maps of the page cache: nothing is copied until a stage uses an array
    arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    pairs = {k.split(".", 1)[1]: arrays.pop(k) for k in list(arrays) if k.startswith("pairs.")}
    return tokenizer, EncodedData(pairs=pairs, vocab_size=int(meta["vocab_size"]), **arrays)


def cached_prepare(dataset: Dataset, cfg: PipelineConfig, cache_dir: str | os.PathLike | None,
                   prepare: Callable, tokenizer_classes: dict):
    """``prepare(dataset, cfg)`` through the cache in ``cache_dir`` (None: no cache).
    -> (tokenizer, EncodedData, "hit" | "miss" | "off")."""
    if cache_dir is None:
        return (*prepare(dataset, cfg), "off")
    entry = pathlib.Path(cache_dir) / cache_key(dataset, cfg)
    if entry.is_dir():
        try:
            return (*_load(entry, tokenizer_classes), "hit")
        except Exception:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
            shutil.rmtree(entry, ignore_errors=True)
    tokenizer, enc = prepare(dataset, cfg)  # input errors surface here, before anything is cached
    try:
        _save(entry, tokenizer, enc)
    except OSError:
        pass  # a read-only or full cache directory only costs the next run the same work
    return tokenizer, enc, "miss"
