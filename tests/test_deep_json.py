"""Every JSON the project reads rejects 100,000 levels of nesting with a clear error
(naming the file) instead of a raw ``RecursionError``."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest

from codex_jax.cli import sample as cli_sample
from codex_jax.config import load_config
from codex_jax.data.bpe import BPETokenizer
from codex_jax.data.records import DEMO_FIELDS, read_jsonl
from codex_jax.data.tokenizer import Tokenizer
from codex_jax.errors import CodexError
from codex_jax.run import audit, pipeline

DEPTH = 100_000
DEEP = ("[" * DEPTH + "]" * DEPTH).encode()
DEEP_OBJECT = ('{"a":' * DEPTH + "1" + "}" * DEPTH).encode()


def _deep(path: pathlib.Path, blob: bytes = DEEP) -> pathlib.Path:
    path.write_bytes(blob)
    return path


def _names_file(err: pytest.ExceptionInfo, path: pathlib.Path) -> None:
    assert str(path) in str(err.value) and "RecursionError" not in type(err.value).__name__


@pytest.mark.parametrize("blob", [DEEP, DEEP_OBJECT], ids=["array", "object"])
def test_regex_tokenizer_vocabulary(tmp_path, blob):
    path = _deep(tmp_path / "vocab.json", blob)
    with pytest.raises(CodexError) as err:
        Tokenizer.load(path)
    _names_file(err, path)


@pytest.mark.parametrize("blob", [DEEP, DEEP_OBJECT], ids=["array", "object"])
def test_bpe_tokenizer(tmp_path, blob):
    path = _deep(tmp_path / "vocab.json", blob)
    with pytest.raises(CodexError) as err:
        BPETokenizer.load(path)
    _names_file(err, path)


def test_pipeline_config(tmp_path):
    path = _deep(tmp_path / "config.json", DEEP_OBJECT)
    with pytest.raises(CodexError) as err:
        load_config(path)
    _names_file(err, path)


def test_jsonl_data_line(tmp_path):
    path = _deep(tmp_path / "demos.jsonl", DEEP_OBJECT + b"\n")
    with pytest.raises(CodexError) as err:
        read_jsonl(path, DEMO_FIELDS)
    _names_file(err, path)
    assert f"{path}:1" in str(err.value)


def test_run_record_for_resume(tmp_path):
    path = _deep(tmp_path / "run.json", DEEP_OBJECT)
    with pytest.raises(CodexError) as err:
        pipeline.read_run_record(tmp_path)
    _names_file(err, path)


def test_metrics_line_torn_or_deep_is_dropped_on_resume(tmp_path):
    good = {"stage": "sft", "step": 1, "loss": 0.5}
    (tmp_path / "metrics.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + DEEP + b"\n")
    assert pipeline.read_metrics(tmp_path / "metrics.jsonl") == [good]


def test_sample_run_config(tmp_path):
    path = _deep(tmp_path / "config.json", DEEP_OBJECT)
    args = argparse.Namespace(run=str(tmp_path), stage="M2", num=1, length=1, temperature=1.0, seed=0)
    with pytest.raises(CodexError) as err:
        cli_sample.cmd_sample(args)
    _names_file(err, path)


def test_audit_manifest_and_recorded_config(tmp_path):
    manifest = _deep(tmp_path / "manifest.json", DEEP_OBJECT)
    with pytest.raises(CodexError) as err:
        audit.read_manifest(manifest)
    _names_file(err, manifest)
    config = _deep(tmp_path / "config.json", DEEP_OBJECT)
    with pytest.raises(CodexError) as err:
        audit.recorded_config(manifest)
    _names_file(err, config)
