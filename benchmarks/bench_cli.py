"""Wall clock of the whole ``codex-jax run`` process on the built-in data, cold and warm,
side by side with a reference measured in the same session; prints ONE JSON line.

    python benchmarks/bench_cli.py [--repeats 3] [--against GIT_REF ...] [--table FILE.md]

Every run is a fresh process (Python start-up, imports, data, every stage, run files):
  * cold: prepared data and record snapshots cached, JAX compilation cache empty
    (the issue's "fresh clone after the data set is cached");
  * warm: everything cached.
Runs alternate between this checkout and the references, so drift of the machine
(10-30% on shared VMs) lands on both sides:
  * ``floor``: ``python -c "import jax; jax.numpy.zeros(1).block_until_ready()"``, the
    part of every run this library cannot remove (interpreter + JAX start-up);
  * ``--against REF`` (repeatable): the same commands on another commit of this repository
    (a git worktree, the same virtual environment), e.g. the commit before a speed change.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from codex_jax.run.manifest import cpu_model  # noqa: E402

FLOOR = [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"]


def run_cmd(out: pathlib.Path) -> list[str]:
    return [sys.executable, "-c", "import sys; from codex_jax.cli import main; sys.exit(main())",
            "run", "--out", str(out), "--quiet"]


def timed(cmd: list[str], env: dict, cwd: pathlib.Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed in {cwd}:\n{proc.stderr[-3000:]}")
    return wall


def env_for(tree: pathlib.Path, cache: pathlib.Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "CODEX_JAX_CACHE": str(cache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's machine: imports use .pyc files
    return env


def measure(tree: pathlib.Path, work: pathlib.Path, results: dict, name: str) -> None:
    """One cold and one warm run of ``tree`` per repeat (its own caches under ``work``)."""
    cache, out = work / f"cache-{name}", work / f"out-{name}"
    env = env_for(tree, cache)
    if not cache.exists():  # data set, snapshots, prepared data; .pyc files of the tree
        timed(run_cmd(out), env, tree)
    shutil.rmtree(cache / "jax", ignore_errors=True)
    results.setdefault(name, {"cold_s": [], "warm_s": []})
    results[name]["cold_s"].append(timed(run_cmd(out), env, tree))
    results[name]["warm_s"].append(timed(run_cmd(out), env, tree))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--against", metavar="GIT_REF", action="append", default=[],
                    help="also time this commit of the repository (repeatable)")
    ap.add_argument("--table", metavar="FILE.md", help="also write a markdown table")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="codex-jax-bench-cli-"))
    trees = {"this": ROOT}
    try:
        for i, ref_name in enumerate(args.against):
            ref = work / f"ref-tree-{i}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref), ref_name],
                           check=True, capture_output=True)
            trees[f"at {ref_name}"] = ref
        results: dict = {}
        floor_env = {**os.environ}
        floor_env.pop("PYTHONDONTWRITEBYTECODE", None)
        floor = []
        for i in range(args.repeats):
            for name, tree in trees.items():
                measure(tree, work, results, name)
                print(f"[bench_cli] repeat {i + 1}/{args.repeats} {name}: cold {results[name]['cold_s'][-1]:.2f} s, "
                      f"warm {results[name]['warm_s'][-1]:.2f} s", file=sys.stderr)
            floor.append(timed(FLOOR, floor_env, ROOT))
        record = {"cpu": cpu_model(), "cores": os.cpu_count(), "repeats": args.repeats,
                  "floor_python_jax_s": {"median": statistics.median(floor), "all": floor}}
        for name, r in results.items():
            record[name] = {k: {"median": statistics.median(v), "min": min(v), "all": v} for k, v in r.items()}
        print(json.dumps(record))
        if args.table:
            rows = ["| code | cold s (median, min) | warm s (median, min) |", "|---|---:|---:|"]
            for name in results:
                c, w = record[name]["cold_s"], record[name]["warm_s"]
                rows.append(f"| {name} | {c['median']:.2f}, {c['min']:.2f} | {w['median']:.2f}, {w['min']:.2f} |")
            rows.append(f"| floor: `import jax` + one op | | {record['floor_python_jax_s']['median']:.2f} |")
            pathlib.Path(args.table).write_text(
                f"CPU: {record['cpu']} ({record['cores']} cores), {args.repeats} alternating repeats\n\n"
                + "\n".join(rows) + "\n")
    finally:
        for i in range(len(args.against)):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / f"ref-tree-{i}")],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
