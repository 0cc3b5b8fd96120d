"""``codex-jax audit``: is a run reproducible bit for bit?

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

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from codex_jax.errors import CodexError

STAGES = ("M0", "M1", "RM", "M2")  # codex_jax.pipeline.STAGES (not imported: it pulls in JAX)
DEFAULT_RUNS = 2
SHORT = 16  # hex digits shown of a fingerprint or hash

YES, NO = "yes", "no"
CLOSED_FORM = "n/a (closed form)"
NOT_CHECKED = "not checked"
RUN_COLUMNS = ("stage", "fingerprint", "equal across runs", "changes with seed")
AGAINST_COLUMNS = ("stage", "field", "recorded", "new", "equal")


# --------------------------------------------------------------------------- comparisons
def _short(value: Any) -> str:
    if value is None:
        return "(missing)"
    return str(value)[:SHORT]


def _stage_names(manifests: list[dict]) -> list[str]:
    """The pipeline's stages in order, then any other stage a manifest has."""
    seen = {name for m in manifests for name in (m.get("stages") or {})}
    return [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))


def _fingerprint(manifest: dict | None, stage: str) -> str | None:
    if not manifest:
        return None
    entry = (manifest.get("stages") or {}).get(stage)
    return entry.get("fingerprint") if isinstance(entry, dict) else None


def audit_runs(manifests: list[dict], other_seed: dict | None,
               closed_form: set[str] | frozenset[str] = frozenset()) -> tuple[list[dict], bool]:
    """Compares same-seed run manifests, and each against a run with another seed.

    Returns ``(rows, ok)``: one row per stage, a dict keyed by ``RUN_COLUMNS``
    ("stage", "fingerprint" (first 16 hex of the first run's), "equal across runs"
    ("yes"/"no"), "changes with seed" ("yes"/"no", "n/a (closed form)" for a stage in
    ``closed_form``, "not checked" when ``other_seed`` is None)).  ``ok`` is False when
    a stage's fingerprint differs between the runs or is missing from one of them, or
    when the other seed leaves a stage outside ``closed_form`` unchanged.
    """
    if not manifests:
        raise CodexError("audit: no run manifests to compare")
    rows, ok = [], True
    for stage in _stage_names(manifests + ([other_seed] if other_seed else [])):
        prints = [_fingerprint(m, stage) for m in manifests]
        equal = prints[0] is not None and all(p == prints[0] for p in prints)
        if other_seed is None:
            changes = NOT_CHECKED
        elif stage in closed_form:
            changes = CLOSED_FORM
        else:
            other = _fingerprint(other_seed, stage)
            changed = other is not None and prints[0] is not None and other != prints[0]
            changes = YES if changed else NO
            ok = ok and changed
        ok = ok and equal
        rows.append({"stage": stage, "fingerprint": _short(prints[0]),
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
        rows.append({"stage": stage, "field": field, "recorded": _short(old), "new": _short(cur),
                     "equal": YES if equal else NO})

    for field in ("config_hash", "tokenizer_fingerprint"):
        if field in recorded:
            add("run", field, recorded.get(field), new.get(field))
    if recorded.get("mesh") or new.get("mesh"):  # a run on a mesh is reproduced on the same mesh
        add("run", "mesh", _mesh_text(recorded.get("mesh")), _mesh_text(new.get("mesh")))
    for stage in _stage_names([recorded, new]):
        old_fields, new_fields = _stage_fields(recorded, stage), _stage_fields(new, stage)
        for field in list(old_fields) + [f for f in new_fields if f not in old_fields]:
            add(stage, field, old_fields.get(field), new_fields.get(field))
    return rows, ok


def _mesh_text(mesh: dict | None) -> str:
    if not mesh:
        return "one device"
    text = f"data={mesh.get('data')},model={mesh.get('model')}{',fsdp' if mesh.get('fsdp') else ''}"
    if "devices" in mesh:  # a recorded mesh (a requested one has sizes only)
        text += f" on {mesh['devices']} {mesh.get('platform')}"
    return text


def _mesh_arg(args: argparse.Namespace) -> dict | None:
    from codex_jax.config import parse_mesh

    if args.fsdp and args.mesh is None:
        raise CodexError("--fsdp shards parameters over the data axis of a mesh; give --mesh data=N too")
    if args.mesh is None:
        return None
    return {**parse_mesh(args.mesh), "fsdp": bool(args.fsdp)}


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
    except (OSError, UnicodeDecodeError, ValueError) as err:
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
        except (OSError, UnicodeDecodeError, ValueError) as err:
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
    from codex_jax.config import mesh_flags

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


class _Workdir:
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

    def __enter__(self) -> "_Workdir":
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


# --------------------------------------------------------------------------- command
def _audit_runs_cmd(args: argparse.Namespace) -> int:
    from codex_jax.config import load_config

    runs = DEFAULT_RUNS if args.runs is None else args.runs
    if runs < 2:
        raise CodexError(f"--runs must be >= 2 (runs to compare), got {runs}")
    if args.data is not None and args.data != "default" and not pathlib.Path(args.data).is_dir():
        raise CodexError(f"{args.data}: --data is not a directory")
    cfg = load_config(args.config, seed=args.seed)  # config errors surface before any run
    mesh = _mesh_arg(args)
    seed = cfg.seed
    closed_form = {"M0"} if cfg.pretrain.mode == "exact" else set()
    total = runs + 1
    with _Workdir(args.workdir, args.keep) as work:
        manifests = [run_once(i, total, work.run_dir(i), seed, args.data, args.config, mesh)
                     for i in range(1, runs + 1)]
        other = run_once(total, total, work.run_dir(total), seed + 1, args.data, args.config, mesh)
    rows, ok = audit_runs(manifests, other, closed_form)
    where = f" on mesh {_mesh_text(mesh)}" if mesh else ""
    print(f"determinism audit: {runs} runs with seed {seed}, 1 run with seed {seed + 1}{where}")
    print(format_table(rows, RUN_COLUMNS))
    for row in rows:
        if row["equal across runs"] == NO:
            prints = ", ".join(_short(_fingerprint(m, row["stage"])) for m in manifests)
            print(f"{row['stage']}: fingerprints per run: {prints}")
    unequal = [r["stage"] for r in rows if r["equal across runs"] == NO]
    unchanged = [r["stage"] for r in rows if r["changes with seed"] == NO]
    if ok:
        note = f" ({', '.join(sorted(closed_form))} closed form)" if closed_form else ""
        print(f"verdict: PASS - all {len(rows)} stages identical across {runs} runs; "
              f"seed {seed + 1} changes every seeded stage{note}")
        return 0
    problems = []
    if unequal:
        problems.append(f"not reproducible: {', '.join(unequal)}")
    if unchanged:
        problems.append(f"unchanged by seed {seed + 1}: {', '.join(unchanged)}")
    print(f"verdict: FAIL - {'; '.join(problems)}")
    return 1


def _audit_against_cmd(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--data", args.data), ("--seed", args.seed), ("--config", args.config),
                                      ("--runs", args.runs), ("--mesh", args.mesh)) if value is not None]
    if args.fsdp:
        given.append("--fsdp")
    if given:
        raise CodexError(f"--against takes the recorded config, data, seed and mesh; "
                         f"do not pass {'/'.join(given)} with it")
    path = pathlib.Path(args.against)
    if path.is_dir():
        path = path / "manifest.json"
    recorded = read_manifest(path)
    config = recorded_config(path)
    source = recorded["data_source"]
    data = None
    if source != "default":
        if not pathlib.Path(source).is_dir():
            raise CodexError(f"{path}: the recorded data source {source} is not a directory")
        data = source
    with _Workdir(args.workdir, args.keep) as work:
        config_path = work.file("recorded_config.json")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        # the same mesh as the recorded run: results on another mesh agree only to rounding
        new = run_once(1, 1, work.run_dir(1), recorded["seed"], data, str(config_path), recorded.get("mesh"))
    rows, ok = compare_against(recorded, new)
    print(f"audit against {path}: seed {recorded['seed']}, data {source}, mesh {_mesh_text(recorded.get('mesh'))}")
    print(format_table(rows, AGAINST_COLUMNS))
    if ok:
        print(f"verdict: PASS - the new run reproduces all {len(rows)} recorded values")
        return 0
    from codex_jax.manifest import environment_differences  # imports JAX

    diffs = environment_differences(recorded["environment"], new.get("environment") or {})
    if diffs:
        print("environment differences (recorded -> new):")
        for line in diffs:
            print(f"  {line}")
    else:
        print("environments identical")
    bad = [f"{r['stage']} {r['field']}" for r in rows if r["equal"] == NO]
    print(f"verdict: FAIL - {len(bad)} value(s) differ from the recorded run: {', '.join(bad)}")
    return 1


def cmd_audit(args: argparse.Namespace) -> int:
    """Entry point of ``codex-jax audit``; returns the exit status (0 pass, 1 mismatch)."""
    if args.against is not None:
        return _audit_against_cmd(args)
    return _audit_runs_cmd(args)


def add_parser(subparsers: Any) -> None:
    """Registers ``audit`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser(
        "audit", help="check that runs are reproducible bit for bit (or reproduce a recorded run)",
        description="Re-runs the pipeline in fresh processes and compares every stage's parameter "
                    "fingerprint: K runs with the same seed must agree, a run with seed+1 must differ. "
                    "With --against, re-runs a recorded run and compares with its manifest. "
                    "Exit 0: all match; 1: a mismatch.")
    p.add_argument("--data", help="data directory, as for `run` (default: the built-in data)")
    p.add_argument("--seed", type=int, default=None, help="root PRNG seed (default: the config's)")
    p.add_argument("--runs", type=int, default=None,
                   help=f"same-seed runs to compare (default {DEFAULT_RUNS}; one more runs with seed+1)")
    p.add_argument("--config", help="TOML or JSON pipeline config, as for `run`")
    p.add_argument("--against", metavar="MANIFEST",
                   help="a recorded OUT/manifest.json (or OUT): re-run it once and compare")
    p.add_argument("--mesh", metavar="data=N[,model=M]", help="run every sub-run on this device mesh, as for `run`")
    p.add_argument("--fsdp", action="store_true", help="with --mesh: FSDP parameter sharding, as for `run`")
    p.add_argument("--workdir", help="where the sub-runs write (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the sub-runs' directories")
    p.set_defaults(func=cmd_audit)
