"""Built-in task set (codex_jax.data.tasks): split, determinism, tests vs. canonical
bodies and hard negatives, config validation, atomic writing.

Programs run only in fresh ``python -I`` subprocesses (never ``exec`` in pytest):
every problem of every family's whole parameter space, with its canonical body
and each hard-negative kind, in two subprocesses (one per half), each program in
its own namespace.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

from codex_jax.data import tasks
from codex_jax.data.records import CORPUS_FIELDS, DEMO_FIELDS, PREF_FIELDS, read_jsonl
from codex_jax.data.task_families import FAMILIES, FAMILY_NAMES
from codex_jax.data.tasks import (
    NEGATIVE_KINDS,
    PROBLEM_FIELDS,
    TASK_FILES,
    TaskSetConfig,
    generate_tasks,
    hard_negative,
    make_problem,
    problem_instance,
    program,
    task_demos,
    task_hard_negative_prefs,
    task_records,
    write_task_set,
)
from codex_jax.errors import ConfigError, DataError

# Reads a JSON list of programs on stdin; prints a JSON list: did each run without error?
RUNNER = r"""
import json, sys
ok = []
for src in json.load(sys.stdin):
    try:
        exec(compile(src, "<task>", "exec"), {"__name__": "__task__", "__builtins__": __builtins__})
        ok.append(True)
    except (Exception, SystemExit):
        ok.append(False)
print(json.dumps(ok))
"""


def run_programs(sources: list[str]) -> list[bool]:
    """Runs the programs in two parallel fresh interpreters (2 cores); one bool each."""
    half = (len(sources) + 1) // 2
    procs = [subprocess.Popen([sys.executable, "-I", "-c", RUNNER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(json.dumps(chunk), timeout=120)
            for p, chunk in zip(procs, (sources[:half], sources[half:]))]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [r for out, _ in outs for r in json.loads(out)]


@pytest.fixture(scope="module")
def default_split():
    return generate_tasks(TaskSetConfig())


@pytest.fixture(scope="module")
def all_problems():
    """Every (family, parameters) instance there is, not only the default split's."""
    return [make_problem(f, p) for f in FAMILIES for p in f.params]


def instance_key(problem):
    family, params = problem_instance(problem)
    return family.name, params


# ------------------------------------------------------------------- split
def test_default_sizes(default_split):
    train, held = default_split
    cfg = TaskSetConfig()
    assert (len(train), len(held)) == (cfg.num_train, cfg.num_heldout) == (405, 105)
    per_family = collections.Counter(instance_key(p)[0] for p in train + held)
    assert per_family == {name: cfg.problems_per_family for name in FAMILY_NAMES}


@pytest.mark.parametrize("n, fraction, families", [
    (34, 0.2, FAMILY_NAMES), (2, 0.5, ("add_k",)), (40, 0.1, ("rotate_k", "suffix_w")), (10, 0.75, FAMILY_NAMES),
])
def test_split_disjoint_and_sized(n, fraction, families):
    cfg = TaskSetConfig(problems_per_family=n, heldout_fraction=fraction, families=families)
    train, held = generate_tasks(cfg)
    n_held = math.floor(n * fraction + 0.5)
    assert len(held) == n_held * len(families) == cfg.num_heldout
    assert len(train) == (n - n_held) * len(families) == cfg.num_train
    train_keys, held_keys = {instance_key(p) for p in train}, {instance_key(p) for p in held}
    assert len(train_keys) == len(train) and len(held_keys) == len(held)
    assert not train_keys & held_keys
    assert not {p["task_id"] for p in train} & {p["task_id"] for p in held}
    assert {k[0] for k in train_keys} == {k[0] for k in held_keys} == set(families)


def test_same_config_same_output_across_processes(default_split):
    digest = hashlib.sha256(json.dumps(default_split).encode()).hexdigest()
    code = ("import hashlib, json; from codex_jax.data.tasks import TaskSetConfig, generate_tasks; "
            "print(hashlib.sha256(json.dumps(generate_tasks(TaskSetConfig())).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == digest
    assert generate_tasks(TaskSetConfig()) == default_split


def test_default_set_is_pinned(default_split):
    """The benchmark must not drift: a change here must be deliberate (update the digest)."""
    assert [p["task_id"] for p in default_split[1][:3]] == [
        "codex-jax/add_k/15", "codex-jax/add_k/35", "codex-jax/add_k/47"]
    digest = hashlib.sha256(json.dumps(default_split).encode()).hexdigest()
    assert digest == "68874fd19ff467a2f4ad3039049ea421a15430ff8bd38f6c934e2cf1e6c5d1ef"


def test_seed_changes_split_not_problems(default_split):
    train1, held1 = generate_tasks(TaskSetConfig(seed=1))
    train0, held0 = default_split
    assert {p["task_id"] for p in held1} != {p["task_id"] for p in held0}
    by_id = {p["task_id"]: p for p in train0 + held0}
    shared = [p for p in train1 + held1 if p["task_id"] in by_id]
    assert shared and all(p == by_id[p["task_id"]] for p in shared)  # text depends on (family, params) only


def test_problem_format(all_problems):
    for p in all_problems:
        assert tuple(p) == PROBLEM_FIELDS and all(isinstance(p[f], str) and p[f].strip() for f in PROBLEM_FIELDS)
        family, params = problem_instance(p)
        assert p["task_id"] == f"codex-jax/{family.name}/{'_'.join(map(str, params))}"
        assert p["prompt"].startswith(f"def {p['entry_point']}({family.arg}):\n    \"\"\"")
        assert p["prompt"].endswith('"""\n') and p["prompt"].count("\n") == 2
        assert all(str(v) in p["entry_point"] and str(v) in p["prompt"].split("\n")[1] for v in params)
        body = p["canonical_solution"]
        assert body.startswith("    return ") and body.endswith("\n") and body.count("\n") == 1
        assert len(p["prompt"]) <= 90 and len(body) <= 40
        lines = p["test"].splitlines()
        assert lines[0] == "def check(candidate):" and 4 <= len(lines) - 1 <= 6
        assert all(line.startswith("    assert candidate(") and " == " in line for line in lines[1:])


def test_program_is_humaneval_concatenation():
    p = make_problem(FAMILIES[0], (7,))
    assert program(p, "    return x + 7\n") == (
        'def add_7(x):\n    """Return x plus 7."""\n    return x + 7\n\n' + p["test"] + "\ncheck(add_7)\n")


# ----------------------------------------------- canonical passes, negatives fail
def test_canonical_passes_and_every_hard_negative_fails(all_problems):
    sources, expect = [], []
    for p in all_problems:
        sources.append(program(p, p["canonical_solution"]))
        expect.append(True)
        for kind in NEGATIVE_KINDS:
            sources.append(program(p, hard_negative(p, kind)))
            expect.append(False)
    results = run_programs(sources)
    wrong = [s for s, r, e in zip(sources, results, expect) if r != e]
    assert not wrong, f"{len(wrong)} programs with an unexpected outcome, e.g.:\n{wrong[0]}"


# ------------------------------------------------------ demos and preferences
def test_demos_and_prefs(default_split):
    train, _ = default_split
    demos = task_demos(train)
    assert demos == [{"prompt": p["prompt"], "completion": p["canonical_solution"]} for p in train]
    prefs = task_hard_negative_prefs(train, 0)
    assert prefs == task_hard_negative_prefs(train, 0)
    assert [tuple(r) for r in prefs] == [PREF_FIELDS] * len(train)
    kinds = collections.Counter()
    for p, r in zip(train, prefs):
        assert r["prompt"] == p["prompt"] and r["chosen"] == p["canonical_solution"]
        assert r["rejected"].strip() and r["rejected"] != r["chosen"]
        kinds[next(k for k in NEGATIVE_KINDS if hard_negative(p, k) == r["rejected"])] += 1
    assert set(kinds) == set(NEGATIVE_KINDS) and min(kinds.values()) > len(train) // 8
    assert task_hard_negative_prefs(train, 1) != prefs


def test_hard_negative_examples():
    add7 = make_problem(FAMILIES[0], (7,))
    assert [hard_negative(add7, k) for k in NEGATIVE_KINDS] == [
        "    ...\n", "    return x +\n", "    pass\n", "    return x + 6\n"]
    keep0 = make_problem(next(f for f in FAMILIES if f.name == "keep_gt_k"), (0,))
    assert hard_negative(keep0, "wrong_param") == "    return [v for v in xs if v > 1]\n"


def test_foreign_problems_and_bad_arguments_rejected():
    p = make_problem(FAMILIES[0], (7,))
    for bad in ({**p, "task_id": "codex-jax/add_k/100"}, {**p, "task_id": "other/add_k/7"},
                {**p, "canonical_solution": "    return x + 8\n"}, {"task_id": 3}, "not a dict"):
        with pytest.raises(DataError, match="task_id"):
            hard_negative(bad, "pass")
    with pytest.raises(ConfigError, match="kind"):
        hard_negative(p, "nope")
    for seed in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="seed"):
            task_hard_negative_prefs([p], seed)


# ------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value", [
    ("problems_per_family", 1), ("problems_per_family", 41), ("problems_per_family", True),
    ("problems_per_family", 34.0), ("problems_per_family", "34"),
    ("heldout_fraction", 0.0), ("heldout_fraction", 1.0), ("heldout_fraction", -0.1),
    ("heldout_fraction", math.nan), ("heldout_fraction", math.inf), ("heldout_fraction", True),
    ("heldout_fraction", "0.2"), ("heldout_fraction", 0.01), ("heldout_fraction", 0.99),
    ("seed", -1), ("seed", 1.5), ("seed", True), ("seed", None),
    ("families", ()), ("families", ["add_k"]), ("families", ("add_k", "add_k")),
    ("families", ("nope",)), ("families", "add_k"),
])
def test_bad_config_names_field(field, value):
    with pytest.raises(ConfigError, match=rf"TaskSetConfig\.{field} ") as err:
        TaskSetConfig(**{field: value})
    assert str(err.value).endswith(f"got {value!r}")


def test_config_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        TaskSetConfig(34)
    with pytest.raises(AttributeError):
        TaskSetConfig().seed = 1
    # a family with a larger parameter space allows more problems
    assert TaskSetConfig(problems_per_family=90, families=("add_k",)).num_train == 72


# ------------------------------------------------------------------- writing
def read_lines(path):
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_write_task_set_round_trip(tmp_path):
    cfg = TaskSetConfig(problems_per_family=6, heldout_fraction=0.5, seed=3)
    out = write_task_set(tmp_path / "tasks", cfg)
    assert sorted(os.listdir(out)) == sorted(TASK_FILES)
    records = task_records(cfg)
    for name in TASK_FILES:
        assert read_lines(out / name) == records[name]
    train = records["problems_train.jsonl"]
    assert records["corpus.jsonl"] == [{"text": p["prompt"] + p["canonical_solution"]} for p in train]
    # the project's reader accepts the training files
    for name, fields in (("corpus.jsonl", CORPUS_FIELDS), ("demos.jsonl", DEMO_FIELDS), ("prefs.jsonl", PREF_FIELDS)):
        assert read_jsonl(out / name, fields) == records[name]
    assert read_jsonl(out / "problems_heldout.jsonl", PROBLEM_FIELDS) == records["problems_heldout.jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["tasks"]  # no temp dir left
    # a rerun replaces the set
    write_task_set(out, TaskSetConfig(problems_per_family=6, heldout_fraction=0.5, seed=4))
    assert read_lines(out / "problems_heldout.jsonl") != records["problems_heldout.jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["tasks"]


def test_write_nothing_on_bad_config_or_target(tmp_path):
    with pytest.raises(ConfigError, match="seed"):
        write_task_set(tmp_path / "a", TaskSetConfig(seed=-1))
    with pytest.raises(ConfigError, match="TaskSetConfig"):
        write_task_set(tmp_path / "a", {"seed": 0})
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        write_task_set(tmp_path / "file", TaskSetConfig())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="notes.txt"):
        write_task_set(tmp_path / "mine", TaskSetConfig())
    assert sorted(os.listdir(tmp_path)) == ["file", "mine"]
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_write_failure_leaves_old_set(tmp_path, monkeypatch):
    cfg = TaskSetConfig(problems_per_family=4, heldout_fraction=0.25)
    out = write_task_set(tmp_path / "tasks", cfg)
    before = {name: (out / name).read_bytes() for name in TASK_FILES}
    original, calls = tasks.jsonl_bytes, []

    def failing(records):  # the third file fails
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(records)

    monkeypatch.setattr(tasks, "jsonl_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        write_task_set(out, TaskSetConfig(problems_per_family=4, heldout_fraction=0.25, seed=9))
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        write_task_set(tmp_path / "new", cfg)
    assert sorted(os.listdir(tmp_path)) == ["tasks"]
    assert {name: (out / name).read_bytes() for name in TASK_FILES} == before
