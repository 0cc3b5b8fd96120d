"""The determinism audit behind ``codex-jax audit`` (``cli.audit``): is a run
reproducible bit for bit?

Two modes:

* ``codex-jax audit [--data DIR] [--seed N] [--runs K] [--config FILE]`` runs the
  pipeline K times (default 2), each in a fresh process, and checks that every
  stage's parameter fingerprint is the same in all of them; one more run with seed
  N+1 checks that the seed reaches every stage (except a stage whose result is a
  closed form that does not use the seed: M0 with ``pretrain.mode = "exact"``).
* ``codex-jax audit --against OUT/manifest.json`` runs once more with the config,
  seed and data source recorded in OUT and compares each stage's fingerprint,
  config hash and data hash with the recorded ones; on a mismatch it also prints
  how the environment (versions, backend, JAX flags) differs.

Sub-runs are ``python -m codex_jax.cli run --quiet ...`` processes run one after
another with this process's environment; their run directories go into
``--workdir`` (default: a new temporary directory) and are deleted unless ``--keep``.
Exit status: 0 when everything matches, 1 on any mismatch (or a stage that does not
change with the seed), 2 on a user error (``CodexError``).

``audit_runs`` and ``compare_against`` do the comparisons on manifest dicts, without
processes.  This module does not import JAX (only ``--against`` does, to describe
environment differences).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from codex_jax.errors import CodexError

DEFAULT_RUNS = 2
SHORT = 16  # hex digits shown of a fingerprint or hash

YES, NO = "yes", "no"
CLOSED_FORM = "n/a (closed form)"
SEED_INDEPENDENT = "seed-independent ({})"  # the reason recorded in the manifest (from the stage table)
NOT_CHECKED = "not checked"
RUN_COLUMNS = ("stage", "fingerprint", "equal across runs", "changes with seed")
AGAINST_COLUMNS = ("stage", "field", "recorded", "new", "equal")


# --------------------------------------------------------------------------- comparisons
def short(value: Any) -> str:
    if value is None:
        return "(missing)"
    return str(value)[:SHORT]


def _stage_names(manifests: list[dict]) -> list[str]:
    """Every stage any manifest has, in the order the runs recorded them (the stage
    table's order; manifests keep it), first appearance first."""
    names: dict[str, None] = {}
    for m in manifests:
        names.update(dict.fromkeys(m.get("stages") or {}))
    return list(names)


def fingerprint(manifest: dict | None, stage: str) -> str | None:
    if not manifest:
        return None
    entry = (manifest.get("stages") or {}).get(stage)
    return entry.get("fingerprint") if isinstance(entry, dict) else None


def seed_independence(manifest: dict | None, stage: str) -> str | None:
    """Why ``stage`` does not use the seed, as the run recorded it from the stage table
    ("closed form", "full batch"); None: it uses the seed."""
    entry = ((manifest or {}).get("stages") or {}).get(stage)
    reason = entry.get("seed_independent") if isinstance(entry, dict) else None
    return reason if isinstance(reason, str) and reason else None


def audit_runs(manifests: list[dict], other_seed: dict | None,
               closed_form: set[str] | frozenset[str] = frozenset()) -> tuple[list[dict], bool]:
    """Compares same-seed run manifests, and each against a run with another seed.

    Returns ``(rows, ok)``: one row per stage, a dict keyed by ``RUN_COLUMNS``
    ("stage", "fingerprint" (first 16 hex of the first run's), "equal across runs"
    ("yes"/"no"), "changes with seed" ("yes"/"no"; "seed-independent (REASON)" for a
    stage whose manifest entry records why it ignores the seed, which must then stay
    equal; "n/a (closed form)" for a stage in ``closed_form`` (manifests that predate
    the record); "not checked" when ``other_seed`` is None)).  ``ok`` is False when a
    stage's fingerprint differs between the runs or is missing from one of them, when
    the other seed leaves a seed-using stage unchanged, or changes a stage declared
    seed-independent (the declaration would be wrong).
    """
    if not manifests:
        raise CodexError("audit: no run manifests to compare")
    rows, ok = [], True
    for stage in _stage_names(manifests + ([other_seed] if other_seed else [])):
        prints = [fingerprint(m, stage) for m in manifests]
        equal = prints[0] is not None and all(p == prints[0] for p in prints)
        reason = seed_independence(manifests[0], stage)
        if other_seed is None:
            changes = NOT_CHECKED
        elif reason is not None:
            changes = SEED_INDEPENDENT.format(reason)
            other = fingerprint(other_seed, stage)
            if other != prints[0]:
                changes, ok = f"yes (declared {reason}: wrong)", False
        elif stage in closed_form:
            changes = CLOSED_FORM
        else:
            other = fingerprint(other_seed, stage)
            changed = other is not None and prints[0] is not None and other != prints[0]
            changes = YES if changed else NO
            ok = ok and changed
        ok = ok and equal
        rows.append({"stage": stage, "fingerprint": short(prints[0]),
                     "equal across runs": YES if equal else NO, "changes with seed": changes})
    return rows, ok


def _stage_fields(manifest: dict, stage: str) -> dict[str, Any]:
    entry = (manifest.get("stages") or {}).get(stage)
    entry = entry if isinstance(entry, dict) else {}
    fields = {"fingerprint": entry.get("fingerprint"), "config_hash": entry.get("config_hash")}
    data_hash = entry.get("data_hash")
    if isinstance(data_hash, dict):
        fields.update({f"data_hash.{name}": value for name, value in sorted(data_hash.items())})
    else:
        fields["data_hash"] = data_hash
    return fields


def compare_against(recorded: dict, new: dict) -> tuple[list[dict], bool]:
    """Compares a new run's manifest with a recorded one, field by field.

    Returns ``(rows, ok)``: rows keyed by ``AGAINST_COLUMNS`` for the run's config hash
    and tokenizer fingerprint (stage "run", where recorded) and, for every stage, its
    fingerprint, config hash and each data hash; ``ok`` is True when all are equal.
    """
    rows, ok = [], True

    def add(stage: str, field: str, old: Any, cur: Any) -> None:
        nonlocal ok
        equal = old is not None and old == cur
        ok = ok and equal
        rows.append({"stage": stage, "field": field, "recorded": short(old), "new": short(cur),
                     "equal": YES if equal else NO})

    for field in ("config_hash", "tokenizer_fingerprint"):
        if field in recorded:
            add("run", field, recorded.get(field), new.get(field))
    if recorded.get("mesh") or new.get("mesh"):  # a run on a mesh is reproduced on the same mesh
        add("run", "mesh", mesh_text(recorded.get("mesh")), mesh_text(new.get("mesh")))
    for stage in _stage_names([recorded, new]):
        old_fields, new_fields = _stage_fields(recorded, stage), _stage_fields(new, stage)
        for field in list(old_fields) + [f for f in new_fields if f not in old_fields]:
            add(stage, field, old_fields.get(field), new_fields.get(field))
    return rows, ok


def mesh_text(mesh: dict | None) -> str:
    if not mesh:
        return "one device"
    text = f"data={mesh.get('data')},model={mesh.get('model')}{',fsdp' if mesh.get('fsdp') else ''}"
    if "devices" in mesh:  # a recorded mesh (a requested one has sizes only)
        text += f" on {mesh['devices']} {mesh.get('platform')}"
    return text


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """Left-aligned columns separated by " | ", with a header and a rule."""
    widths = [max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns]

    def line(cells) -> str:
        return " | ".join(str(x).ljust(w) for x, w in zip(cells, widths)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(columns), rule] + [line([r[c] for c in columns]) for r in rows])


# --------------------------------------------------------------------------- manifests
def read_manifest(path: str | pathlib.Path) -> dict:
    """A run's manifest.json; a missing, unreadable or incomplete file is a CodexError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CodexError(f"{path}: manifest not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CodexError(f"{path}: not a JSON manifest ({_one_line(err)})") from None
    if not isinstance(manifest, dict):
        raise CodexError(f"{path}: not a run manifest (expected a JSON object)")
    missing = [k for k in ("seed", "data_source", "environment", "stages") if k not in manifest]
    if missing:
        raise CodexError(f"{path}: manifest lacks key(s) {', '.join(missing)}")
    stages = manifest["stages"]
    if not isinstance(stages, dict) or not stages:
        raise CodexError(f"{path}: manifest 'stages' must be a non-empty object")
    for name, entry in stages.items():
        lacking = [k for k in ("fingerprint", "config_hash", "data_hash")
                   if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise CodexError(f"{path}: manifest stage {name} lacks key(s) {', '.join(lacking)}")
    if not isinstance(manifest["seed"], int) or isinstance(manifest["seed"], bool) or manifest["seed"] < 0:
        raise CodexError(f"{path}: manifest 'seed' must be an integer >= 0, got {manifest['seed']!r}")
    if not isinstance(manifest["data_source"], str) or not manifest["data_source"]:
        raise CodexError(f"{path}: manifest 'data_source' must be 'default' or a directory path")
    if not isinstance(manifest["environment"], dict):
        raise CodexError(f"{path}: manifest 'environment' must be an object")
    return manifest


def recorded_config(manifest_path: pathlib.Path) -> dict:
    """The recorded full config: config.json beside the manifest, else run.json's "config"."""
    run_dir = manifest_path.parent
    tried = []
    for name, pick in (("config.json", lambda obj: obj), ("run.json", lambda obj: obj.get("config"))):
        path = run_dir / name
        tried.append(str(path))
        if not path.is_file():
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise CodexError(f"{path}: not a JSON file ({_one_line(err)})") from None
        config = pick(obj) if isinstance(obj, dict) else None
        if not isinstance(config, dict):
            raise CodexError(f"{path}: no config object recorded")
        return config
    raise CodexError(f"{manifest_path}: no recorded config beside it ({' or '.join(tried)} not found)")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# --------------------------------------------------------------------------- sub-runs
def _run_command(out: pathlib.Path, seed: int, data: str | None, config: str | None,
                 mesh: dict | None = None) -> list[str]:
    from codex_jax.config.mesh import mesh_flags

    cmd = [sys.executable, "-m", "codex_jax.cli", "run", "--quiet", "--out", str(out), "--seed", str(seed)]
    cmd += mesh_flags(mesh)
    if data is not None:
        cmd += ["--data", data]
    if config is not None:
        cmd += ["--config", config]
    return cmd


def run_once(index: int, total: int, out: pathlib.Path, seed: int, data: str | None,
             config: str | None, mesh: dict | None = None) -> dict:
    """One ``codex-jax run`` in a fresh process (on ``mesh``, a manifest "mesh" record,
    or one device); returns its manifest."""
    t0 = time.perf_counter()
    proc = subprocess.run(_run_command(out, seed, data, config, mesh), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    elapsed = time.perf_counter() - t0
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    print(f"[audit] run {index}/{total} seed {seed} ... {elapsed:.1f}s {status}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else "(no error output)"
        raise CodexError(f"audit run {index}/{total} (seed {seed}) failed with exit code "
                         f"{proc.returncode}: {last}")
    return read_manifest(out / "manifest.json")


class Workdir:
    """--workdir (created if needed) or a new temporary directory; cleaned unless keep."""

    def __init__(self, path: str | None, keep: bool):
        self.keep = keep
        if path is None:
            self.path, self.owned = pathlib.Path(tempfile.mkdtemp(prefix="codex-jax-audit-")), True
        else:
            self.path = pathlib.Path(path)
            if self.path.exists() and not self.path.is_dir():
                raise CodexError(f"{self.path}: --workdir is not a directory")
            self.owned = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        self.made: list[pathlib.Path] = []

    def run_dir(self, index: int) -> pathlib.Path:
        path = self.path / f"run_{index}"
        self.made.append(path)
        return path

    def file(self, name: str) -> pathlib.Path:
        path = self.path / name
        self.made.append(path)
        return path

    def __enter__(self) -> "Workdir":
        return self

    def __exit__(self, *exc) -> None:
        if self.keep:
            print(f"[audit] run directories kept in {self.path}", file=sys.stderr)
            return
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for path in self.made:  # a user's --workdir: remove only what the audit made
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
