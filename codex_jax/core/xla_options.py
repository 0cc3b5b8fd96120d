"""XLA CPU options the library sets for itself, measured by benchmarks/bench_xla_flags.py.

XLA reads ``XLA_FLAGS`` once, when its CPU backend starts, so ``apply()`` runs when
``codex_jax`` is imported (before any computation).  It only ADDS an option the user
has not set in ``XLA_FLAGS`` themselves, and ``CODEX_JAX_XLA_DEFAULTS=0`` turns it off.
What was applied is recorded in every run's manifest (``applied()``).
"""

from __future__ import annotations

import os

# option -> value.  Each entry is here because it measured faster on the PPO / GRPO
# iteration of the reference recipe (README "Speed"); an option that did not help is
# left out, with its figure in the README.
DEFAULTS: dict[str, str] = {}

_applied: list[str] = []


def apply() -> list[str]:
    """Adds DEFAULTS to ``XLA_FLAGS`` unless switched off or already set.  -> options added."""
    if os.environ.get("CODEX_JAX_XLA_DEFAULTS", "1") == "0":
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in DEFAULTS.items() if f"--{name}=" not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
        _applied.extend(added)
    return added


def applied() -> list[str]:
    """The options this process added to ``XLA_FLAGS`` (empty: none, or switched off)."""
    return list(_applied)
