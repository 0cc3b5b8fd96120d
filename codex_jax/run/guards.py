"""Numerical guards checked by the host once per chunk of steps (never per step).

A stage stops with ``GuardError`` after ``max_consecutive_skips`` updates in a row
with non-finite gradients, and an RL stage (``kl_guard = "stop"``) when the sampled
KL to its reference exceeds ``max_kl``; ``kl_guard = "skip"`` acts inside the step.
"""

from __future__ import annotations

from typing import Any, Callable

from codex_jax.errors import CodexError


class GuardError(CodexError):
    """A numerical guard stopped the run (non-finite updates in a row, KL bound)."""


def make_guard(label: str, max_consecutive_skips: int, stage_cfg: Any) -> Callable[[list[dict], Any], None]:
    """A check over each chunk's records; it keeps the skip streak across chunks."""
    max_kl = getattr(stage_cfg, "max_kl", None)
    stop_on_kl = max_kl is not None and getattr(stage_cfg, "kl_guard", "stop") == "stop"
    streak = 0

    def check(chunk: list[dict], state: Any) -> None:
        nonlocal streak
        for rec in chunk:
            streak = streak + 1 if rec.get("skipped", 0) > 0 else 0
            if streak >= max_consecutive_skips:
                raise GuardError(f"{label} step {rec['step']}: {streak} consecutive updates had "
                                 f"non-finite gradients or rewards (max_consecutive_skips={max_consecutive_skips})")
            if stop_on_kl and rec.get("kl", 0.0) > max_kl:
                raise GuardError(f"{label} iteration {rec['step']}: KL to the reference {rec['kl']:.4g} "
                                 f"exceeds {label}.max_kl={max_kl}")

    return check
