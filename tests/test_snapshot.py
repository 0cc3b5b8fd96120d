"""Record snapshots: a second load of the same files equals a fresh load without reading
them; any change to a file is read and validated again; bad files are never snapshotted."""

from __future__ import annotations

import dataclasses
import os

import pytest
from conftest import TINY_RECORDS, write_dataset

from codex_jax.data import records, snapshot
from codex_jax.data.records import Corpus, load_dataset
from codex_jax.errors import DataError


def _spy_reads(monkeypatch) -> list:
    reads = []
    real = records.load_dataset

    def counting(directory):
        reads.append(directory)
        return real(directory)
    monkeypatch.setattr(records, "load_dataset", counting)
    return reads


def test_a_snapshot_hit_equals_a_fresh_load_and_skips_the_files(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    reads = _spy_reads(monkeypatch)
    first = snapshot.load_dataset_cached(data, tmp_path / "snap")
    second = snapshot.load_dataset_cached(data, tmp_path / "snap")
    assert len(reads) == 1  # the second load read no JSONL
    fresh = load_dataset(data)
    assert first == fresh and second == fresh  # every column, every string
    # the stored digest is the digest of the records
    assert snapshot.records_digest(second) == snapshot.records_digest(fresh) == second.digest.hex


def test_editing_a_file_is_seen_even_with_the_same_size(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    snap = tmp_path / "snap"
    before = snapshot.load_dataset_cached(data, snap)
    path = data / records.CORPUS_FILE
    raw = path.read_bytes()
    swapped = raw.replace(b"def", b"fed", 1)
    assert swapped != raw and len(swapped) == len(raw)
    st = path.stat()
    path.write_bytes(swapped)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))  # a later write, same size
    after = snapshot.load_dataset_cached(data, snap)
    assert after == load_dataset(data) and after != before
    assert len(list(snap.iterdir())) == 1  # replaced, not piled up
    assert snapshot.load_dataset_cached(data, snap) == after


def test_a_bad_file_raises_the_loaders_error_and_is_never_snapshotted(tmp_path):
    data = write_dataset(tmp_path / "data", raw={records.DEMOS_FILE: b'{"prompt": "x"}\n'})
    with pytest.raises(DataError, match=r"demos.jsonl:1: field 'completion': missing"):
        snapshot.load_dataset_cached(data, tmp_path / "snap")
    assert not (tmp_path / "snap").exists() or not any((tmp_path / "snap").iterdir())
    with pytest.raises(DataError, match="no such directory"):
        snapshot.load_dataset_cached(tmp_path / "absent", tmp_path / "snap")


def test_a_damaged_snapshot_is_read_around(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    snap = tmp_path / "snap"
    snapshot.load_dataset_cached(data, snap)
    (entry,) = snap.iterdir()
    for junk in (b"", b"\x00garbage", entry.read_bytes()[:100]):
        entry.write_bytes(junk)
        assert snapshot.load_dataset_cached(data, snap) == load_dataset(data)


def test_a_digest_never_outlives_the_records_it_was_computed_on(tmp_path):
    data = write_dataset(tmp_path / "data")
    ds = snapshot.load_dataset_cached(data, tmp_path / "snap")
    moved = dataclasses.replace(ds, source="elsewhere")  # same records: the digest still applies
    assert snapshot.records_digest(moved) == ds.digest.hex
    other = dataclasses.replace(ds, corpus=Corpus(texts=ds.corpus.texts[:-1]))
    expected = snapshot.records_digest(dataclasses.replace(other, digest=None))
    assert snapshot.records_digest(other) == expected != ds.digest.hex
    assert len(TINY_RECORDS[records.CORPUS_FILE]) == len(ds.corpus.texts)
