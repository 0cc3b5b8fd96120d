"""The prepared-data cache: a hit equals a fresh prepare; the key follows the records and
the configs; a damaged entry is rebuilt; an input error caches nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import TINY_CONFIG, write_dataset

from codex_jax.config import PipelineConfig, from_dict
from codex_jax.data.bpe import BPETokenizer
from codex_jax.data.records import load_dataset
from codex_jax.data.tokenizer import Tokenizer
from codex_jax.errors import DataError
from codex_jax.run import prepared
from codex_jax.run.driver import prepare

CLASSES = {"Tokenizer": Tokenizer, "BPETokenizer": BPETokenizer}
CFG = from_dict(PipelineConfig, TINY_CONFIG)
TRANSFORMER = from_dict(PipelineConfig, {
    **TINY_CONFIG, "model": "transformer", "pretrain": {"mode": "gradient"},
    "bpe": {"vocab_size": 280, "min_frequency": 1}, "transformer": {"layers": 1, "d_model": 16, "heads": 2},
    "data": {"context_len": 16, "max_prompt_len": 8, "max_response_len": 8}})


def _arrays(enc) -> dict:
    out = {f.name: getattr(enc, f.name) for f in dataclasses.fields(enc) if f.name != "pairs"}
    return {**out, **{f"pairs.{k}": v for k, v in enc.pairs.items()}}


def _assert_same(a, b) -> None:
    (tok_a, enc_a), (tok_b, enc_b) = a, b
    assert tok_a.to_json() == tok_b.to_json()
    xa, xb = _arrays(enc_a), _arrays(enc_b)
    assert xa.keys() == xb.keys()
    for name in xa:
        if isinstance(xa[name], np.ndarray):
            assert xa[name].dtype == xb[name].dtype, name
        np.testing.assert_array_equal(xa[name], xb[name], err_msg=name)


def _counting_prepare():
    calls = []

    def fn(dataset, cfg):
        calls.append(1)
        return prepare(dataset, cfg)
    return fn, calls


@pytest.mark.parametrize("model", ["unigram", "transformer"])
def test_a_hit_returns_exactly_what_a_fresh_prepare_builds(tmp_path, tiny_data_dir, model):
    cfg = TRANSFORMER if model == "transformer" else CFG
    ds = load_dataset(tiny_data_dir)
    fn, calls = _counting_prepare()
    *first, status = prepared.cached_prepare(ds, cfg, tmp_path, fn, CLASSES)
    assert status == "miss" and len(calls) == 1
    *second, status = prepared.cached_prepare(ds, cfg, tmp_path, fn, CLASSES)
    assert status == "hit" and len(calls) == 1  # not rebuilt
    _assert_same(first, second)
    _assert_same(second, prepare(ds, cfg))
    assert type(second[0]).__name__ == ("BPETokenizer" if model == "transformer" else "Tokenizer")


def test_the_key_follows_the_records_and_the_configs(tmp_path, tiny_data_dir):
    ds = load_dataset(tiny_data_dir)
    key = prepared.cache_key(ds, CFG)
    assert key == prepared.cache_key(load_dataset(tiny_data_dir), CFG)  # deterministic
    other = write_dataset(tmp_path / "other", {"corpus.jsonl": [{"text": "def other(): return 1"}]})
    assert prepared.cache_key(load_dataset(other), CFG) != key
    shorter = from_dict(PipelineConfig, {**TINY_CONFIG, "data": {**TINY_CONFIG.get("data", {}), "max_prompt_len": 3}})
    assert prepared.cache_key(ds, shorter) != key
    assert prepared.cache_key(ds, TRANSFORMER) != key
    # ppo / seed settings do not shape the prepared data: same entry
    assert prepared.cache_key(ds, dataclasses.replace(CFG, seed=CFG.seed + 1)) == key


def test_a_damaged_entry_is_rebuilt(tmp_path, tiny_data_dir):
    ds = load_dataset(tiny_data_dir)
    fn, calls = _counting_prepare()
    prepared.cached_prepare(ds, CFG, tmp_path, fn, CLASSES)
    entry = tmp_path / prepared.cache_key(ds, CFG)
    damages = {"garbage": lambda raw: b"not an array file", "truncated": lambda raw: raw[:-7],
               "missing": None}
    for n, (what, damage) in enumerate(damages.items(), start=2):
        target = entry / "corpus_tokens.npy"
        if damage is None:
            target.unlink()
        else:
            target.write_bytes(damage(target.read_bytes()))
        *got, status = prepared.cached_prepare(ds, CFG, tmp_path, fn, CLASSES)
        assert status == "miss" and len(calls) == n, what
        _assert_same(got, prepare(ds, CFG))
        assert prepared.cached_prepare(ds, CFG, tmp_path, fn, CLASSES)[2] == "hit"  # rewritten whole


def test_an_input_error_propagates_and_caches_nothing(tmp_path, tiny_data_dir):
    def failing(dataset, cfg):
        raise DataError("demos.jsonl:3: field 'prompt': bad")

    with pytest.raises(DataError, match="demos.jsonl:3"):
        prepared.cached_prepare(load_dataset(tiny_data_dir), CFG, tmp_path / "cache", failing, CLASSES)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_no_cache_directory_means_no_cache(tiny_data_dir):
    fn, calls = _counting_prepare()
    assert prepared.cached_prepare(load_dataset(tiny_data_dir), CFG, None, fn, CLASSES)[2] == "off"
    assert len(calls) == 1
