"""Parameterised families of one-line Python functions, the building blocks of the
built-in task set (:mod:`codex_jax.data.tasks`).

A problem is a (family, parameters) pair, e.g. ``add_k`` with ``(7,)``: function
``add_7(x)``, docstring "Return x plus 7.", body ``    return x + 7``. The name and
the docstring both state the parameter, so a model can copy it from the prompt into
the body; bodies are one short line so a tiny transformer learns them on a CPU.

Each family carries its reference semantics (``ref``), which compute the expected
test values at generation time, and a test-input generator chosen so that the
tests tell the parameter from its neighbour ``wrong(params)`` (the hard negative
"wrong parameter" body): ``add_7`` is tested on inputs where ``x + 6 != x + 7``,
``keep_gt_7`` on lists holding 7 and 8, ``mod_7`` on 8 (8 % 7 != 8 % 6), etc.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable

import numpy as np

LETTERS = string.ascii_lowercase
NUM_TESTS = 5  # asserts per problem


@dataclasses.dataclass(frozen=True)
class Family:
    """One template. ``params`` is the whole parameter space in a fixed order."""

    name: str  # family id in task ids, e.g. "add_k"
    arg: str  # the one argument: x (int), s (str) or xs (list of int)
    params: tuple[tuple, ...]
    func: Callable[[tuple], str]  # params -> function name, e.g. "add_7"
    doc: Callable[[tuple], str]  # params -> one-sentence docstring
    expr: Callable[[tuple], str]  # params -> the returned expression
    ref: Callable[[tuple, object], object]  # (params, argument) -> expected value
    inputs: Callable[[tuple, np.random.Generator], list]  # NUM_TESTS arguments
    wrong: Callable[[tuple], tuple]  # a neighbouring parameter the tests reject

    def body(self, params: tuple) -> str:
        return f"    return {self.expr(params)}\n"

    def param_text(self, params: tuple) -> str:
        return "_".join(str(v) for v in params)


# ----------------------------------------------------------------- input helpers
def word(rng: np.random.Generator, n: int) -> str:
    return "".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), n))


def distinct_ints(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    """n distinct ints in [lo, hi], in random order."""
    return [int(v) for v in rng.choice(np.arange(lo, hi + 1), n, replace=False)]


def int_space(lo: int, hi: int) -> tuple[tuple[int], ...]:
    return tuple((k,) for k in range(lo, hi + 1))


def neighbour(lo: int) -> Callable[[tuple], tuple]:
    """k -> k - 1, or k + 1 where k - 1 is below the family's smallest k."""
    return lambda p: (p[0] - 1,) if p[0] - 1 >= lo else (p[0] + 1,)


def next_letter(c: str, avoid: str = "") -> str:
    i = LETTERS.index(c)
    for step in range(1, len(LETTERS)):
        d = LETTERS[(i + step) % len(LETTERS)]
        if d not in avoid:
            return d
    raise AssertionError("unreachable: the alphabet has more than two letters")


def x_inputs(p, rng):
    return distinct_ints(rng, NUM_TESTS, -50, 100)


def mod_inputs(p, rng):
    k = p[0]
    return [k + 1] + distinct_ints(rng, NUM_TESTS - 1, 0, 10 * k + 10)


def short_words(p, rng):
    return [""] + [word(rng, int(n)) for n in rng.integers(1, 7, NUM_TESTS - 1)]


def prefix_words(p, rng):
    k = p[0]
    return [word(rng, n) for n in (k + 2, k + 5, k + 1, max(k - 2, 1), 1)]


def replace_words(p, rng):
    out = [word(rng, 5)]
    for n in (3, 5, 7, 9):
        chars = list(word(rng, n))
        for i in rng.choice(n, 1 + n // 4, replace=False):
            chars[int(i)] = p[0]
        out.append("".join(chars))
    return out


def short_lists(p, rng):
    return [[]] + [distinct_ints(rng, int(n), -20, 50) for n in rng.integers(1, 6, NUM_TESTS - 1)]


def positive_lists(p, rng):
    return [distinct_ints(rng, int(n), 1, 30) for n in rng.integers(1, 6, NUM_TESTS)]


def around_lists(p, rng):
    """Lists holding k and k + 1, so both k - 1 and k + 1 change the result."""
    k = p[0]
    return [[k + 1, k], [k - 3, k, k + 1, k + 4]] + [distinct_ints(rng, n, k - 10, k + 10) for n in (3, 5, 6)]


def long_lists(p, rng):
    """Distinct values, longer than k, so k and its neighbour give different results."""
    k = p[0]
    return [distinct_ints(rng, n, 0, 99) for n in (k + 1, k + 2, k + 3, k + 5, 2 * k + 1)]


# -------------------------------------------------------------------- families
FAMILIES: tuple[Family, ...] = (
    # arithmetic on an int x
    Family("add_k", "x", int_space(1, 99), lambda p: f"add_{p[0]}",
           lambda p: f"Return x plus {p[0]}.", lambda p: f"x + {p[0]}",
           lambda p, x: x + p[0], x_inputs, neighbour(1)),
    Family("sub_k", "x", int_space(1, 99), lambda p: f"sub_{p[0]}",
           lambda p: f"Return x minus {p[0]}.", lambda p: f"x - {p[0]}",
           lambda p, x: x - p[0], x_inputs, neighbour(1)),
    Family("mul_k", "x", int_space(2, 99), lambda p: f"mul_{p[0]}",
           lambda p: f"Return x times {p[0]}.", lambda p: f"x * {p[0]}",
           lambda p, x: x * p[0], x_inputs, neighbour(2)),
    Family("mod_k", "x", int_space(2, 99), lambda p: f"mod_{p[0]}",
           lambda p: f"Return x modulo {p[0]}.", lambda p: f"x % {p[0]}",
           lambda p, x: x % p[0], mod_inputs, neighbour(2)),
    Family("affine_a_b", "x", tuple((a, b) for a in range(2, 10) for b in range(1, 10)),
           lambda p: f"affine_{p[0]}_{p[1]}", lambda p: f"Return {p[0]} times x plus {p[1]}.",
           lambda p: f"{p[0]} * x + {p[1]}", lambda p, x: p[0] * x + p[1], x_inputs,
           lambda p: (p[0], p[1] - 1) if p[1] > 1 else (p[0], p[1] + 1)),
    # strings s
    Family("repeat_k", "s", int_space(2, 60), lambda p: f"repeat_{p[0]}",
           lambda p: f"Return s repeated {p[0]} times.", lambda p: f"s * {p[0]}",
           lambda p, s: s * p[0], short_words, neighbour(2)),
    Family("suffix_w", "s", tuple((a + b,) for a in LETTERS for b in LETTERS),
           lambda p: f"suffix_{p[0]}", lambda p: f"Return s followed by {p[0]!r}.",
           lambda p: f"s + {p[0]!r}", lambda p, s: s + p[0], short_words,
           lambda p: (p[0][0] + next_letter(p[0][1]),)),
    Family("first_k", "s", int_space(1, 40), lambda p: f"first_{p[0]}",
           lambda p: f"Return the first {p[0]} characters of s.", lambda p: f"s[:{p[0]}]",
           lambda p, s: s[: p[0]], prefix_words, neighbour(1)),
    Family("upper_k", "s", int_space(1, 40), lambda p: f"upper_{p[0]}",
           lambda p: f"Return s with its first {p[0]} characters in upper case.",
           lambda p: f"s[:{p[0]}].upper() + s[{p[0]}:]",
           lambda p, s: s[: p[0]].upper() + s[p[0]:], prefix_words, neighbour(1)),
    Family("replace_c_d", "s", tuple((a, b) for a in LETTERS for b in LETTERS if a != b),
           lambda p: f"replace_{p[0]}_{p[1]}",
           lambda p: f"Return s with every {p[0]!r} replaced by {p[1]!r}.",
           lambda p: f"s.replace({p[0]!r}, {p[1]!r})", lambda p, s: s.replace(p[0], p[1]),
           replace_words, lambda p: (p[0], next_letter(p[1], avoid=p[0]))),
    # lists xs of ints
    Family("add_each_k", "xs", int_space(1, 99), lambda p: f"add_each_{p[0]}",
           lambda p: f"Return xs with {p[0]} added to each element.",
           lambda p: f"[v + {p[0]} for v in xs]", lambda p, xs: [v + p[0] for v in xs],
           short_lists, neighbour(1)),
    Family("keep_gt_k", "xs", int_space(0, 99), lambda p: f"keep_gt_{p[0]}",
           lambda p: f"Return the elements of xs greater than {p[0]}.",
           lambda p: f"[v for v in xs if v > {p[0]}]", lambda p, xs: [v for v in xs if v > p[0]],
           around_lists, neighbour(0)),
    Family("sum_times_k", "xs", int_space(2, 99), lambda p: f"sum_times_{p[0]}",
           lambda p: f"Return the sum of xs times {p[0]}.", lambda p: f"sum(xs) * {p[0]}",
           lambda p, xs: sum(xs) * p[0], positive_lists, neighbour(2)),
    Family("take_k", "xs", int_space(1, 40), lambda p: f"take_{p[0]}",
           lambda p: f"Return the first {p[0]} elements of xs.", lambda p: f"xs[:{p[0]}]",
           lambda p, xs: xs[: p[0]], long_lists, neighbour(1)),
    Family("rotate_k", "xs", int_space(1, 40), lambda p: f"rotate_{p[0]}",
           lambda p: f"Return xs rotated left by {p[0]} places.",
           lambda p: f"xs[{p[0]}:] + xs[:{p[0]}]", lambda p, xs: xs[p[0]:] + xs[: p[0]],
           long_lists, neighbour(1)),
)
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
FAMILY_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
