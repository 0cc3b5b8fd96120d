"""Shared fixtures: a tiny valid data set, a tiny fast pipeline config, an isolated
JAX compilation cache.

Every test that trains uses ``TINY_CONFIG`` on ``TINY_RECORDS`` so the compiled
shapes repeat and JAX compiles each stage once per test session.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest


# --------------------------------------------------------------------------- jaxprs
def dot_eqns(jaxpr):
    """Every dot_general equation of a jaxpr, sub-jaxprs (pjit, custom_vjp, scan) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)  # closed or open sub-jaxprs
            if hasattr(inner, "eqns"):
                yield from dot_eqns(inner)


# --------------------------------------------------------------------------- data
TINY_RECORDS: dict[str, list[dict[str, str]]] = {
    "corpus.jsonl": [{"text": f"def f{i}(x): return x + {i}"} for i in range(12)],
    "demos.jsonl": [{"prompt": f"def g{i}(a):", "completion": f"return a * {i}"} for i in range(8)],
    "prefs.jsonl": [{"prompt": f"def h{i}(y):", "chosen": f"return y + {i}", "rejected": "eval(y)"}
                    for i in range(10)],
}
DATA_FILES = tuple(TINY_RECORDS)
FIELDS = {name: tuple(recs[0]) for name, recs in TINY_RECORDS.items()}


def jsonl_bytes(records, *, ensure_ascii: bool = True) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records).encode("utf-8")


def write_dataset(directory, records=None, *, raw: dict[str, bytes] | None = None,
                  omit: tuple[str, ...] = ()) -> pathlib.Path:
    """Writes corpus/demos/prefs.jsonl into ``directory`` (created if needed).

    ``records`` maps a file name to its records (default ``TINY_RECORDS``); ``raw``
    maps a file name to its exact bytes (wins over ``records``); files in ``omit``
    are not written.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = {**TINY_RECORDS, **(records or {})}
    raw = raw or {}
    for name in DATA_FILES:
        if name in omit:
            continue
        data = raw[name] if name in raw else jsonl_bytes(records[name])
        (directory / name).write_bytes(data)
    return directory


# --------------------------------------------------------------------------- config
TINY_CONFIG: dict = {
    "tokenizer": {"max_size": 64},
    "data": {"context_len": 16},
    "pretrain": {"mode": "exact"},
    "sft": {"steps": 4, "log_every": 2, "batch_size": 4},
    "reward": {"steps": 4, "batch_size": 4},
    "ppo": {"iterations": 2, "rollouts": 8, "response_len": 4, "minibatches": 2,
            "ptx_batch_size": 2, "log_every": 1},
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def to_toml(data: dict) -> str:
    """A minimal TOML writer: scalars first, then one [table] per nested dict."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]

    def tables(prefix: list[str], table: dict) -> None:
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        for key, sub in subs.items():
            path = prefix + [key]
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in sub.items() if not isinstance(v, dict))
            tables(path, sub)

    tables([], data)
    return "\n".join(lines) + "\n"


def write_config(path, data: dict) -> pathlib.Path:
    """Writes ``data`` as JSON or TOML, by the file's suffix."""
    path = pathlib.Path(path)
    text = json.dumps(data) if path.suffix == ".json" else to_toml(data)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory) -> pathlib.Path:
    """The compilation cache the tests use: an explicitly set ``CODEX_JAX_CACHE``
    (e.g. .ci/run's repo-local .ci-cache, reused between sessions), else a fresh
    temporary directory.  Never the default ~/.cache/codex-jax."""
    explicit = os.environ.get("CODEX_JAX_CACHE")
    return pathlib.Path(explicit) if explicit else tmp_path_factory.mktemp("codex-jax-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, jax_cache_dir):
    """No test touches ~/.cache/codex-jax."""
    monkeypatch.setenv("CODEX_JAX_CACHE", str(jax_cache_dir))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> pathlib.Path:
    return write_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> pathlib.Path:
    return write_config(tmp_path_factory.mktemp("tiny-config") / "tiny.json", TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_config_toml(tmp_path_factory) -> pathlib.Path:
    return write_config(tmp_path_factory.mktemp("tiny-config-toml") / "tiny.toml", TINY_CONFIG)
