"""The host driver shared by every stage: compiled chunks of steps, logging, progress.

``run_steps`` is the compiled part: ``lax.scan`` over ``num_steps`` steps, each with
a batch chosen by ``select_batch(state, data, key_data_i)`` and a step key
``key_step_i``, where ``key_*_i = fold_in(key_*, state.step)``.  Keys depend on the
absolute step only, so k steps + (N - k) steps equals N steps exactly.

``train`` is the host loop: it calls ``run_steps`` for chunks of ``log_every`` steps,
then (once per chunk, never per step) brings metrics to the host, logs and shows
progress.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable

import jax
import numpy as np


@functools.partial(jax.jit, static_argnames=("step_fn", "select_fn", "num_steps"))
def run_steps(state, data, key, *, step_fn: Callable, select_fn: Callable, num_steps: int):
    """``num_steps`` steps of a stage in one compiled call.  -> (state, metrics [num_steps])."""
    key_data, key_step = jax.random.split(key)

    def body(state, _):
        batch = select_fn(state, data, jax.random.fold_in(key_data, state.step))
        return step_fn(state, batch, jax.random.fold_in(key_step, state.step))

    return jax.lax.scan(body, state, None, length=num_steps)


class Progress:
    """A one-line progress display on stderr (redrawn on a TTY, periodic lines otherwise)."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, metrics: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        shown = " ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items())
        elapsed = time.perf_counter() - self.start
        line = f"[{self.label:>8}] {bar} {done}/{self.total} {elapsed:6.1f}s {shown}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def train(
    state: Any,
    data: Any,
    key: jax.Array,
    *,
    num_steps: int,
    log_every: int,
    step_fn: Callable,
    select_fn: Callable,
    label: str,
    log: Callable[[dict], None] | None = None,
    show: tuple[str, ...] = ("loss",),
    progress: bool = True,
) -> tuple[Any, list[dict]]:
    """Runs ``num_steps`` steps from ``state.step`` in chunks; returns (state, records).

    Each record is {"stage": label, "step": i, **metrics} with host floats; ``log``
    receives every record (the pipeline writes them to metrics.jsonl).
    """
    bar = Progress(label, num_steps, enabled=progress)
    records: list[dict] = []
    done = 0
    start_step = int(state.step)
    while done < num_steps:
        n = min(log_every, num_steps - done)
        state, metrics = run_steps(state, data, key, step_fn=step_fn, select_fn=select_fn, num_steps=n)
        host = jax.device_get(metrics)  # the one sync per chunk
        for i in range(n):
            rec = {"stage": label, "step": start_step + done + i + 1}
            rec.update({k: float(np.asarray(v[i])) for k, v in host.items()})
            records.append(rec)
            if log is not None:
                log(rec)
        done += n
        bar.update(done, {k: records[-1][k] for k in show if k in records[-1]})
    return state, records
