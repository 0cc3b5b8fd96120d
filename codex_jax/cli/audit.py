"""``codex-jax audit``: K same-seed runs in fresh processes must agree bit for bit and
a run with seed+1 must change every stage that uses the seed; ``--against`` re-runs a
recorded run and compares with its manifest.  Exit 0: all match; 1: a mismatch."""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from codex_jax.errors import CodexError
from codex_jax.run.audit import (
    AGAINST_COLUMNS,
    DEFAULT_RUNS,
    NO,
    RUN_COLUMNS,
    Workdir,
    audit_runs,
    compare_against,
    fingerprint,
    format_table,
    mesh_text,
    read_manifest,
    recorded_config,
    run_once,
    short,
)


def mesh_arg(args: argparse.Namespace) -> dict | None:
    from codex_jax.config.mesh import parse_mesh

    if args.fsdp and args.mesh is None:
        raise CodexError("--fsdp shards parameters over the data axis of a mesh; give --mesh data=N too")
    if args.mesh is None:
        return None
    return {**parse_mesh(args.mesh), "fsdp": bool(args.fsdp)}


def _audit_runs_cmd(args: argparse.Namespace) -> int:
    from codex_jax.config import load_config

    runs = DEFAULT_RUNS if args.runs is None else args.runs
    if runs < 2:
        raise CodexError(f"--runs must be >= 2 (runs to compare), got {runs}")
    if args.data is not None and args.data != "default" and not pathlib.Path(args.data).is_dir():
        raise CodexError(f"{args.data}: --data is not a directory")
    cfg = load_config(args.config, seed=args.seed)  # config errors surface before any run
    mesh = mesh_arg(args)
    seed = cfg.seed
    total = runs + 1
    with Workdir(args.workdir, args.keep) as work:
        manifests = [run_once(i, total, work.run_dir(i), seed, args.data, args.config, mesh)
                     for i in range(1, runs + 1)]
        other = run_once(total, total, work.run_dir(total), seed + 1, args.data, args.config, mesh)
    rows, ok = audit_runs(manifests, other)
    where = f" on mesh {mesh_text(mesh)}" if mesh else ""
    print(f"determinism audit: {runs} runs with seed {seed}, 1 run with seed {seed + 1}{where}")
    print(format_table(rows, RUN_COLUMNS))
    for row in rows:
        if row["equal across runs"] == NO:
            prints = ", ".join(short(fingerprint(m, row["stage"])) for m in manifests)
            print(f"{row['stage']}: fingerprints per run: {prints}")
    unequal = [r["stage"] for r in rows if r["equal across runs"] == NO]
    unchanged = [r["stage"] for r in rows if r["changes with seed"] == NO]
    wrong = [r["stage"] for r in rows if r["changes with seed"].endswith(": wrong)")]
    if ok:
        free = [f"{r['stage']} {r['changes with seed']}" for r in rows
                if r["changes with seed"].startswith("seed-independent")]
        note = f" ({'; '.join(free)})" if free else ""
        print(f"verdict: PASS - all {len(rows)} stages identical across {runs} runs; "
              f"seed {seed + 1} changes every seeded stage{note}")
        return 0
    problems = []
    if unequal:
        problems.append(f"not reproducible: {', '.join(unequal)}")
    if unchanged:
        problems.append(f"unchanged by seed {seed + 1}: {', '.join(unchanged)}")
    if wrong:
        problems.append(f"declared seed-independent but changed by seed {seed + 1}: {', '.join(wrong)}")
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
    if source not in ("default", "tasks"):  # "tasks": the recorded config rebuilds it
        if not pathlib.Path(source).is_dir():
            raise CodexError(f"{path}: the recorded data source {source} is not a directory")
        data = source
    with Workdir(args.workdir, args.keep) as work:
        config_path = work.file("recorded_config.json")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        # the same mesh as the recorded run: results on another mesh agree only to rounding
        new = run_once(1, 1, work.run_dir(1), recorded["seed"], data, str(config_path), recorded.get("mesh"))
    rows, ok = compare_against(recorded, new)
    print(f"audit against {path}: seed {recorded['seed']}, data {source}, mesh {mesh_text(recorded.get('mesh'))}")
    print(format_table(rows, AGAINST_COLUMNS))
    if ok:
        print(f"verdict: PASS - the new run reproduces all {len(rows)} recorded values")
        return 0
    from codex_jax.run.manifest import environment_differences  # imports JAX

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
