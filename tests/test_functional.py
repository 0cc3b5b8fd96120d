"""Functional evaluation of a run's models (``run.functional``, ``codex-jax evaluate --run``).

Sampling is checked with planted families whose ``sample`` returns known ids (so
decoding, the per-row keys and batch-size independence are checked exactly) and with a
tiny random transformer; ``functional_eval`` with a planted family that answers
canonical solutions, ``    pass`` or nothing gives exactly the expected pass@1 and
empty rate; the CLI runs end to end on a tiny run directory made by ``run_pipeline``.
Model-written code runs only through the sandboxed ``Executor``.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax import cli
from codex_jax.config import PipelineConfig, TransformerConfig, default_config, from_dict
from codex_jax.config.tokenizers import BPEConfig, TokenizerConfig
from codex_jax.data.bpe import BPETokenizer
from codex_jax.data.encode import encode_dataset
from codex_jax.data.records import load_dataset
from codex_jax.data.task_families import FAMILY_NAMES
from codex_jax.data.tasks import TaskSetConfig, generate_tasks, write_task_set
from codex_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from codex_jax.execute.passk import mean_pass_at_k
from codex_jax.execute.sandbox import Executor
from codex_jax.models.family import Family
from codex_jax.models.registry import make_family
from codex_jax.run.artifacts import save_params, write_json
from codex_jax.run.functional import (
    encode_prompts,
    functional_eval,
    resolve_problems,
    sample_completions,
)
from codex_jax.run.pipeline import run_pipeline

TASKS = TaskSetConfig(problems_per_family=3, families=FAMILY_NAMES[:4])  # 8 training, 4 held-out problems
TRAIN, HELDOUT = generate_tasks(TASKS)
RUN_CONFIG = {
    "model": "transformer", "checkpoint_every": 0,
    "bpe": {"vocab_size": 300, "min_frequency": 1},
    "transformer": {"layers": 1, "d_model": 32, "heads": 2, "context_len": 64},
    "data": {"context_len": 32, "max_prompt_len": 24, "max_response_len": 16, "heldout_fraction": 0.0},
    "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1},
    "sft": {"steps": 2, "batch_size": 4, "log_every": 1},
    "reward": {"steps": 2, "batch_size": 4, "log_every": 1},
    "ppo": {"iterations": 1, "rollouts": 4, "response_len": 8, "epochs": 1, "minibatches": 1,
            "ptx_batch_size": 2, "log_every": 1},
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(jax_cache_dir):
    """JAX's persistent compilation cache, as ``codex-jax run`` / ``evaluate`` enable it
    (the tiny run's four stages dominate this module's time when compiled cold)."""
    from codex_jax.cli.common import enable_compilation_cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CODEX_JAX_CACHE", str(jax_cache_dir))
        enable_compilation_cache()
    yield


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    """Byte-level BPE trained on the task corpus (as the pipeline would)."""
    return BPETokenizer.build([p["prompt"] + p["canonical_solution"] for p in TRAIN],
                              BPEConfig(vocab_size=300, min_frequency=1))


@pytest.fixture(scope="module")
def executor():
    with Executor(timeout=2.0, workers=2) as ex:
        yield ex


def planted_family(name: str, sample) -> Family:
    """A family whose only real function is ``sample``; the rest are never called."""
    unused = lambda *args, **kwargs: None
    return Family(name=name, vocab_size=300, init_policy=unused, token_nll=unused, response_logprobs=unused,
                  sample=sample, init_reward=unused, reward_token_scores=unused, reward_l2=unused, eos_id=EOS_ID)


# --------------------------------------------------------------------------- sampling
def echo_sample(params, key, prompt, prompt_mask, length, temperature):
    """The prompt's ids, EOS at a position drawn from the key, then junk ids after it."""
    del params, prompt_mask, temperature
    eos_at = jax.random.randint(key, (), 0, length)
    ids = jnp.pad(prompt, ((0, 0), (0, max(length - prompt.shape[1], 0))))[:, :length]
    junk = jnp.full_like(ids, 300 - 1)
    t = jnp.arange(length)[None]
    return jnp.where(t < eos_at, ids, jnp.where(t == eos_at, EOS_ID, junk)).astype(jnp.int32)


ECHO = planted_family("echo", echo_sample)


def test_prompts_are_encoded_as_the_pipeline_encodes_demonstration_prompts(tmp_path, tokenizer):
    dataset = load_dataset(write_task_set(tmp_path / "tasks", TASKS))
    data_cfg = from_dict(PipelineConfig, {"data": {"max_prompt_len": 9, "heldout_fraction": 0.0}}).data
    enc = encode_dataset(dataset, tokenizer, data_cfg)
    ids, mask = encode_prompts(tokenizer, list(dataset.demos.prompts), 9)
    width = enc.prompt.shape[1]
    assert ids.shape == mask.shape == (len(dataset.demos.prompts), 9) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[:, :width], enc.prompt)
    np.testing.assert_array_equal(mask[:, :width], enc.prompt_mask)
    assert (ids[:, width:] == PAD_ID).all() and (mask[:, width:] == 0).all()


def test_decoding_stops_at_eos_with_keys_per_prompt_and_sample(tokenizer):
    prompts = [p["prompt"] for p in HELDOUT] + ["", "x"]
    key, n, length = jax.random.key(3), 3, 12
    got = sample_completions(ECHO, tokenizer, {}, prompts, n=n, temperature=1.0, key=key, max_prompt_len=10,
                             response_len=length, batch_size=4)
    ids, mask = encode_prompts(tokenizer, prompts, 10)
    for i, row in enumerate(got):
        assert len(row) == n
        for j, text in enumerate(row):
            row_key = jax.random.fold_in(jax.random.fold_in(key, i), j)
            eos_at = int(jax.random.randint(row_key, (), 0, length))
            real = ids[i][: min(eos_at, 10)][mask[i][: min(eos_at, 10)] > 0]
            assert text == tokenizer.decode(real.tolist()), (i, j)
    assert got[len(HELDOUT)] == ["", "", ""]  # an empty prompt echoes nothing
    assert len({t for row in got[:len(HELDOUT)] for t in row}) > n  # the keys differ by row


def test_planted_samples_do_not_depend_on_batch_size_or_n(tokenizer):
    prompts = [p["prompt"] for p in HELDOUT]
    common = dict(temperature=1.0, key=jax.random.key(0), max_prompt_len=24, response_len=16)
    by_batch = [sample_completions(ECHO, tokenizer, {}, prompts, n=5, batch_size=b, **common) for b in (1, 3, 64)]
    assert by_batch[0] == by_batch[1] == by_batch[2]
    fewer = sample_completions(ECHO, tokenizer, {}, prompts, n=2, batch_size=3, **common)
    assert fewer == [row[:2] for row in by_batch[0]]  # sample j of prompt i does not depend on n


def test_transformer_sampling_is_deterministic_and_batch_size_independent(tokenizer):
    family = make_family("transformer", tokenizer.vocab_size,
                         TransformerConfig(layers=1, d_model=32, heads=2, context_len=64))
    params = family.init_policy(jax.random.key(1))
    prompts = [p["prompt"] for p in HELDOUT]
    # the shapes of the CLI test's run (prompt 24, response 16, batch 64): one compilation less
    run = lambda key, batch: sample_completions(family, tokenizer, params, prompts, n=3, temperature=1.0,
                                                key=jax.random.key(key), max_prompt_len=24, response_len=16,
                                                batch_size=batch)
    first = run(0, 5)
    assert [len(row) for row in first] == [3] * len(prompts)
    assert run(0, 5) == first and run(0, 64) == first
    assert run(1, 5) != first


@pytest.mark.parametrize("options", [{"n": 0}, {"temperature": 0.0}, {"temperature": math.nan},
                                     {"batch_size": 0}])
def test_bad_sampling_options_are_config_errors(tokenizer, options):
    from codex_jax.errors import ConfigError

    kwargs = {**dict(n=2, temperature=1.0, key=jax.random.key(0), max_prompt_len=8, response_len=4), **options}
    with pytest.raises(ConfigError):
        sample_completions(ECHO, tokenizer, {}, ["x"], **kwargs)


# --------------------------------------------------------------------------- functional_eval
class Answers(NamedTuple):
    prompts: jax.Array  # int32 [N, P]: the encoded prompts
    answers: jax.Array  # int32 [N, T]: the planted response of each


def answer_sample(params, key, prompt, prompt_mask, length, temperature):
    """The planted answer of the params' prompt equal to ``prompt`` (ignores the key)."""
    del key, prompt_mask, temperature
    row = jnp.argmax((params.prompts[None] == prompt[:, None]).all(-1), axis=1)
    return params.answers[row, :length]


ANSWER = planted_family("answer", answer_sample)


def planted_answers(tokenizer, problems, bodies, width=24) -> Answers:
    answers = np.full((len(problems), width), PAD_ID, np.int32)
    for i, body in enumerate(bodies):
        ids = tokenizer.encode(body) + [EOS_ID]
        answers[i, : len(ids)] = ids
    return Answers(jnp.asarray(encode_prompts(tokenizer, [p["prompt"] for p in problems], 48)[0]),
                   jnp.asarray(answers))


def test_functional_eval_on_planted_answers(tokenizer, executor):
    canonical = [p["canonical_solution"] for p in HELDOUT]
    m1 = planted_answers(tokenizer, HELDOUT, [canonical[0], canonical[1], "    pass\n", ""])
    m2 = planted_answers(tokenizer, HELDOUT, canonical)
    key = jax.random.key(0)
    report = functional_eval(ANSWER, tokenizer, {"M1": m1, "M2": m2}, HELDOUT, n=2, temperature=0.8, key=key,
                             ks=(1, 2, 10), executor=executor, max_prompt_len=48, response_len=24)
    assert report["completions"]["M2"] == [[c, c] for c in canonical]  # decoding is exact
    s1, s2 = report["stages"]["M1"], report["stages"]["M2"]
    assert (s1["pass@1"], s1["pass@2"], s1["empty_rate"]) == (0.5, 0.5, 0.25)
    assert (s2["pass@1"], s2["pass@2"], s2["empty_rate"]) == (1.0, 1.0, 0.0)
    assert "pass@10" not in s1 and set(s1["pass@k_omitted"]) == {"10"}  # n < 10
    assert s1["outcomes"]["passed"] == 4 and s1["outcomes"]["failed"] == 4
    assert (s1["samples"], s1["problems"], s1["programs"]) == (2, 4, 8)
    assert report["difference"] == {"M2 - M1": {"pass@1": 0.5, "pass@2": 0.5, "empty_rate": -0.25}}
    assert report["key_data"] == np.asarray(jax.random.key_data(key)).ravel().tolist()
    assert report["prompts_truncated"] == 0
    assert [r["passed"] for r in report["results"]["M1"]] == [True, True, True, True, False, False, False, False]


def test_task_splits_follow_the_runs_tasks_section():
    recorded = from_dict(PipelineConfig, {"tasks": {"problems_per_family": 3, "families": list(FAMILY_NAMES[:4])}})
    assert list(resolve_problems("tasks-heldout", recorded)) == [p["task_id"] for p in HELDOUT]
    assert list(resolve_problems("tasks-train", recorded)) == [p["task_id"] for p in TRAIN]
    default = resolve_problems("tasks-heldout", PipelineConfig())  # a run without a [tasks] section
    assert list(default) == [p["task_id"] for p in generate_tasks(TaskSetConfig())[1]]


# --------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny transformer run on the task set (a few steps per stage)."""
    root = tmp_path_factory.mktemp("functional")
    data = write_task_set(root / "tasks", TASKS)
    cfg = from_dict(PipelineConfig, RUN_CONFIG, base=default_config("transformer"))
    run_pipeline(load_dataset(data), cfg, root / "run", progress=False)
    return root / "run"


def evaluate(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # the tiny run compiles all four stages: ~15 s with a warm compilation cache, ~2 min cold
def test_cli_evaluates_m1_and_m2_of_a_run(run_dir, tmp_path, capsys):
    problems = run_dir.parent / "tasks" / "problems_heldout.jsonl"
    out = tmp_path / "eval"
    rc, stdout, _ = evaluate(capsys, "--run", str(run_dir), "--problems", str(problems), "--n", "3",
                             "--k", "1,2,10", "--temperature", "0.8", "--out", str(out), "--workers", "2")
    assert rc == 0
    assert "M2-M1" in stdout and "pass@10 omitted" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["M1", "M2"] and summary["n"] == 3 and summary["warnings"] == []
    lengths = [len(BPETokenizer.load(run_dir / "vocab.json").encode(p["prompt"])) for p in HELDOUT]
    assert summary["prompts_truncated"] == sum(n > RUN_CONFIG["data"]["max_prompt_len"] for n in lengths)
    assert sorted(p.name for p in out.iterdir()) == ["results_M1.jsonl", "results_M2.jsonl", "samples_M1.jsonl",
                                                     "samples_M2.jsonl", "summary.json"]
    for stage, rec in summary["stages"].items():
        results = read_jsonl(out / f"results_{stage}.jsonl")
        assert [{"task_id": r["task_id"], "completion": r["completion"]} for r in results] \
            == read_jsonl(out / f"samples_{stage}.jsonl")
        assert [r["task_id"] for r in results] == [p["task_id"] for p in HELDOUT for _ in range(3)]
        counts = {}
        for r in results:
            n, c = counts.get(r["task_id"], (0, 0))
            counts[r["task_id"]] = (n + 1, c + r["passed"])
        expected, omitted = mean_pass_at_k(list(counts.values()), (1, 2, 10))
        assert omitted == [10] and "pass@10" not in rec
        for k, value in expected.items():
            assert 0.0 <= rec[f"pass@{k}"] <= 1.0 and rec[f"pass@{k}"] == value
        empty = sum(not r["completion"].strip() for r in results) / len(results)
        assert rec["empty_rate"] == empty and rec["programs"] == len(results) == sum(rec["outcomes"].values())
    diff = summary["difference"]["M2 - M1"]
    assert diff["pass@1"] == summary["stages"]["M2"]["pass@1"] - summary["stages"]["M1"]["pass@1"]


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory) -> pathlib.Path:
    """A unigram run directory (config, vocabulary, uniform M1 and M2) made by hand: cheap,
    and enough for the argument checks, which fail before any sampling."""
    path = tmp_path_factory.mktemp("unigram-run")
    tokenizer = Tokenizer.build([p["prompt"] + p["canonical_solution"] for p in TRAIN], TokenizerConfig())
    write_json(path / "config.json", PipelineConfig().to_dict())
    tokenizer.save(path / "vocab.json")
    for stage in ("M1", "M2"):
        save_params(path / "params" / f"{stage}.npz", {"logits": np.zeros(tokenizer.vocab_size, np.float32)})
    return path


def test_cli_warns_that_a_unigram_cannot_write_programs(unigram_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc, stdout, err = evaluate(capsys, "--run", str(unigram_dir), "--problems", "tasks-heldout", "--n", "1",
                               "--k", "1", "--out", str(out), "--workers", "2")
    assert rc == 0 and "warning" in err and "context-free" in err and "M2-M1" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "unigram" and summary["warnings"] and summary["stages"]["M1"]["pass@1"] == 0.0
    assert summary["stages"]["M1"]["problems"] == TaskSetConfig().num_heldout


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be an integer >= 1"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--k", "0,10"], "--k must be comma-separated positive integers"),
    (["--stages", "M1,RM"], "--stages must be comma-separated names"),
    (["--seed", "-1"], "--seed must be an integer"),
    (["--timeout", "0"], "--timeout must be a finite number > 0"),
    (["--problems", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_arguments_exit_2_and_write_nothing(unigram_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = ["--run", str(unigram_dir), "--problems", "tasks-heldout", "--out", str(out), *args]
    rc, stdout, err = evaluate(capsys, *argv)
    assert rc == 2 and stdout == "" and err.startswith("codex-jax: error: ") and err.count("\n") == 1
    assert message in err and not out.exists()


def test_missing_run_or_params_exit_2_and_write_nothing(unigram_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = evaluate(capsys, "--run", str(tmp_path / "nope"), "--problems", "tasks-heldout", "--out", str(out))
    assert rc == 2 and "no such run directory" in err and not out.exists()
    broken = tmp_path / "broken"
    shutil.copytree(unigram_dir, broken)
    (broken / "params" / "M2.npz").unlink()
    rc, _, err = evaluate(capsys, "--run", str(broken), "--problems", "tasks-heldout")
    assert rc == 2 and "M2.npz: parameter file not found" in err and not (broken / "functional").exists()


def test_run_and_samples_are_mutually_exclusive(unigram_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--run", str(unigram_dir), "--samples", "canonical", "--problems", "humaneval",
                  "--out", str(out)])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    cases = ((["--problems", "humaneval", "--out", str(out), "--n", "3"], "--n only apply with --run"),
             (["--problems", "tasks-heldout", "--out", str(out)], "needs --run"),
             (["--problems", "humaneval"], "--out is required"))
    for argv, message in cases:
        rc, _, err = evaluate(capsys, "--samples", "canonical", *argv)
        assert rc == 2 and message in err and not out.exists()
