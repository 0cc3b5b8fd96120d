"""Validated records kept between runs: a data directory read before comes back in
milliseconds instead of re-parsing and re-validating every JSON line.

``load_dataset_cached(directory, cache_dir)`` keeps one snapshot per data directory
(named by its absolute path) and trusts it only while its signature matches what
identifies the three files' contents without reading them: size, modification time
(ns) and inode of each (the test ``make`` and ``git`` use), plus the record format
version and the Python version (``marshal``'s format is Python's own).  Editing,
replacing or touching a file changes the signature, so the files are read and
validated again and the snapshot is replaced (the cache holds one per directory, never
a pile of stale ones); it only ever holds records that passed ``records.load_dataset``.
A missing, damaged or unwritable snapshot costs only the full read.

The snapshot also carries the records' digest (``records_digest``), which keys the
prepared-data cache, so a cached run never hashes 20 MB of text either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import marshal
import os
import pathlib
import sys

from codex_jax.data import records
from codex_jax.data.records import Corpus, Dataset, Demos, Prefs, RecordsDigest

_FORMAT = 1  # bump when the record schema or the snapshot layout changes
_FILES = (records.CORPUS_FILE, records.DEMOS_FILE, records.PREFS_FILE)


def _columns(ds: Dataset) -> tuple[tuple[str, ...], ...]:
    return (ds.corpus.texts, ds.demos.prompts, ds.demos.completions,
            ds.prefs.prompts, ds.prefs.chosen, ds.prefs.rejected)


def records_digest(dataset: Dataset) -> str:
    """sha256 over every record's text, field by field (lengths delimit the strings);
    the loader's value when it has one (``Dataset.digest``)."""
    own = dataset.digest
    if own is not None and all(a is b for a, b in zip(own.columns, (dataset.corpus, dataset.demos, dataset.prefs))):
        return own.hex
    h = hashlib.sha256()
    for texts in _columns(dataset):
        h.update(len(texts).to_bytes(8, "little"))
        for text in texts:
            raw = text.encode("utf-8", "surrogatepass")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    return h.hexdigest()


def files_signature(directory: pathlib.Path) -> str | None:
    """Hash of the three files' (path, size, mtime_ns, inode); None if one is missing
    (``records.load_dataset`` then reports it)."""
    h = hashlib.sha256(f"{_FORMAT}\n{sys.version}\n".encode())
    for name in _FILES:
        path = (directory / name).absolute()
        try:
            st = path.stat()
        except OSError:
            return None
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def _read(entry: pathlib.Path, source: str, signature: str) -> Dataset | None:
    try:
        stored, digest, cols = marshal.loads(entry.read_bytes())
        if stored != signature:
            return None  # the files changed since the snapshot
        texts, prompts, completions, p_prompts, chosen, rejected = cols
        return _with_digest(Dataset(corpus=Corpus(texts=texts), source=source,
                                    demos=Demos(prompts=prompts, completions=completions),
                                    prefs=Prefs(prompts=p_prompts, chosen=chosen, rejected=rejected)), digest)
    except Exception:  # noqa: BLE001 - missing or damaged: read the files instead
        return None


def _with_digest(ds: Dataset, digest: str) -> Dataset:
    return dataclasses.replace(ds, digest=RecordsDigest(digest, (ds.corpus, ds.demos, ds.prefs)))


def _write(entry: pathlib.Path, signature: str, ds: Dataset) -> None:
    try:
        records.atomic_write_bytes(entry, marshal.dumps((signature, records_digest(ds), _columns(ds))))
    except OSError:
        pass  # a read-only or full cache only costs the next run the full read


def load_dataset_cached(directory: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Dataset:
    """``records.load_dataset(directory)`` through the snapshots in ``cache_dir``
    (None: no snapshot).  The result equals a fresh load (a test checks it)."""
    directory = pathlib.Path(directory)
    signature = files_signature(directory) if cache_dir is not None else None
    if signature is None:
        return records.load_dataset(directory)
    name = hashlib.sha256(str(directory.absolute()).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    entry = pathlib.Path(cache_dir) / f"{name}.marshal"
    ds = _read(entry, str(directory), signature)
    if ds is None:
        ds = records.load_dataset(directory)  # every input error surfaces here
        ds = _with_digest(ds, records_digest(ds))
        _write(entry, signature, ds)
    return ds
