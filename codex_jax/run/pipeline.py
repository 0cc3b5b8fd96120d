"""The run directory around the driver: M0 (pretrain) -> M1 (SFT) -> RM -> M2 (RL).

``run_pipeline`` validates and encodes all data before it creates anything in the
output directory, runs the stage table (``run.driver``) with keys split once by
purpose from the seed, checkpoints each stage (exact resume with ``resume=True``),
and writes summary.json, metrics.jsonl, manifest.json, params/*.npz and the vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import jax

from codex_jax.config.checks import sha256_json
from codex_jax.config.pipeline import PipelineConfig, from_dict
from codex_jax.core.sharding import to_host
from codex_jax.data.bpe import BPETokenizer
from codex_jax.data.encode import EncodedData
from codex_jax.data.records import Dataset
from codex_jax.data.tokenizer import Tokenizer
from codex_jax.errors import CodexError, DataError
from codex_jax.run import artifacts
from codex_jax.run.checkpoint import StageCheckpointer
from codex_jax.run.driver import Runner, prepare, run_stages
from codex_jax.run.manifest import environment
from codex_jax.run.prepared import cached_prepare
from codex_jax.stages.table import LABELS, pipeline_stages


def data_hashes(enc: EncodedData) -> dict[str, str]:
    """sha256 of the token arrays each stage trains on."""
    held = [a for a in (enc.heldout_corpus_tokens, enc.heldout_corpus_mask,
                        enc.heldout_sft_tokens, enc.heldout_sft_mask) if a is not None]
    return {
        "corpus": artifacts.arrays_sha256(enc.corpus_tokens, enc.corpus_mask),
        "demos": artifacts.arrays_sha256(enc.sft_tokens, enc.sft_mask, enc.prompt),
        "prefs": artifacts.arrays_sha256(*[enc.pairs[k] for k in sorted(enc.pairs)]),
        "heldout": artifacts.arrays_sha256(*held),
    }


# --------------------------------------------------------------------------- run directory
def read_metrics(path: pathlib.Path) -> list[dict]:
    """Records of an earlier metrics.jsonl; a line torn by a crash is dropped."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(rec, dict) and "stage" in rec and "step" in rec:
                out.append(rec)
    return out


def _resume_metrics(out: pathlib.Path) -> list[dict]:
    """Earlier records up to each stage's last checkpoint (later ones will be redone)."""
    latest = {}
    for label in LABELS:
        if (out / "checkpoints" / label).is_dir():
            ckpt = StageCheckpointer(out / "checkpoints", label)
            latest[label] = ckpt.latest_step()
            ckpt.close()
    return [r for r in read_metrics(out / "metrics.jsonl")
            if latest.get(r["stage"]) is not None and r["step"] <= latest[r["stage"]]]


def read_run_record(out: str | pathlib.Path) -> tuple[PipelineConfig, str]:
    """(config, data source) of the run in ``out``, for ``--resume``."""
    path = pathlib.Path(out) / "run.json"
    if not path.is_file():
        raise CodexError(f"{out}: nothing to resume (no run.json)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return from_dict(PipelineConfig, record["config"]), str(record["data_source"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise CodexError(f"{path}: not a valid run record ({type(err).__name__}: {err})") from None


def run_pipeline(
    dataset: Dataset,
    cfg: PipelineConfig,
    out_dir: str | pathlib.Path,
    *,
    progress: bool = True,
    resume: bool = False,
    stop_after: tuple[str, int] | None = None,
    layout: Any = None,
    cache_dir: str | pathlib.Path | None = None,
) -> dict:
    """Runs every stage and writes the run directory; returns the summary.

    ``layout`` (``sharding.make_layout``) runs every stage on a device mesh; the
    manifest records it.  With several processes only process 0 writes files.

    ``resume=True`` continues the run in ``out_dir`` from its checkpoints and must see
    the same data (checked by hash).  ``stop_after=(stage, step)`` stops right after the
    checkpoint at that step (raises ``loop.StopRequested``).  ``cache_dir`` keeps the
    prepared data (tokenizer + encoded arrays) between runs of the same data and configs.
    """
    t_start = time.perf_counter()
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CodexError(f"{out}: the output path exists and is not a directory")
    t_prep = time.perf_counter()  # raises before anything is written:
    tokenizer, enc, cached = cached_prepare(dataset, cfg, cache_dir, prepare,
                                            {"Tokenizer": Tokenizer, "BPETokenizer": BPETokenizer})
    if progress:
        print(f"[ prepare] tokenizer + encoded data: {time.perf_counter() - t_prep:.1f}s (cache {cached})",
              file=sys.stderr)
    hashes = data_hashes(enc)
    primary = jax.process_index() == 0  # one writer per run directory (orbax saves are collective)
    record = {"config": cfg.to_dict(), "data_source": dataset.source, "data_hash": hashes}
    if resume:
        old = json.loads((out / "run.json").read_text(encoding="utf-8"))
        if old["data_hash"] != hashes:
            raise DataError(f"{out}: the data differ from the run being resumed (data hash mismatch)")
        kept = _resume_metrics(out)
    else:
        if primary and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")  # a fresh run must never restore a stale state
        kept = []
        out.mkdir(parents=True, exist_ok=True)
        if primary:
            artifacts.write_json(out / "run.json", record)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("codex_jax.run_pipeline: run directory ready")
    if primary:
        artifacts.atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
    with open(out / "metrics.jsonl", "a", encoding="utf-8") if primary else contextlib.nullcontext() as fh:
        def log(rec: dict) -> None:
            fh.write(json.dumps(rec) + "\n")

        def sync() -> None:
            fh.flush()
            os.fsync(fh.fileno())

        runner = Runner(cfg=cfg, checkpoints=out / "checkpoints", log=log if primary else None,
                        progress=progress and primary, stop_after=stop_after, sync=sync if primary else None,
                        layout=layout)
        results = run_stages(enc, tokenizer, cfg, runner)

    results["params"] = to_host(results["params"])
    mesh = layout.describe() if layout is not None else None
    fingerprints = {name: artifacts.fingerprint(p) for name, p in results["params"].items()}
    summary = _summary(dataset, cfg, tokenizer, results, hashes, fingerprints, mesh, resume, t_start)
    if primary:
        _write_run_files(out, dataset, cfg, tokenizer, results, hashes, fingerprints, mesh, summary)
    return summary


def _summary(dataset, cfg, tokenizer, results, hashes, fingerprints, mesh, resume, t_start) -> dict:
    return {
        "model": cfg.model, "seed": cfg.seed, "data_source": dataset.source,
        "vocab_size": tokenizer.vocab_size, "resumed": resume, "mesh": mesh,
        "algorithm": pipeline_stages(cfg)[-1].label,
        "stages": results["metrics"], "objective": results.get("objective"),
        "functional": results.get("functional"),
        "fingerprints": fingerprints,
        "timings_s": {**results["timings"], "total": time.perf_counter() - t_start},
        "versions": environment(),
        # XLA options the family's programs were compiled with (core.compile): they set rounding
        "xla_compile_options": results["compile_options"],
    }


def _write_run_files(out, dataset, cfg, tokenizer, results, hashes, fingerprints, mesh, summary) -> None:
    for name, p in results["params"].items():
        artifacts.save_params(out / "params" / f"{name}.npz", p)
    tokenizer.save(out / "vocab.json")
    artifacts.atomic_write_bytes(out / "samples.jsonl", "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in results["samples"]).encode())
    artifacts.write_json(out / "config.json", cfg.to_dict())
    manifest = {
        "seed": cfg.seed, "model": cfg.model, "config_hash": cfg.config_hash(), "mesh": mesh,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "data_source": dataset.source,
        "environment": summary["versions"], "xla_compile_options": summary["xla_compile_options"],
        "stages": {s.name: {"label": s.label, "key_purpose": s.label, "key_data": results["keys"][s.label],
                            "config_hash": sha256_json(dataclasses.asdict(s.config(cfg))),
                            "data_hash": {d: hashes[d] for d in s.data},
                            "seed_independent": results["seed_use"][s.name],
                            "fingerprint": fingerprints[s.name]} for s in pipeline_stages(cfg)},
    }
    artifacts.write_json(out / "manifest.json", manifest)
    artifacts.write_json(out / "summary.json", summary)
