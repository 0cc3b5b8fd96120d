"""The host loop shared by every stage: compiled chunks of steps, logging, progress.

``train`` calls ``core.scan.run_steps`` for chunks of ``log_every`` steps, then (once
per chunk, never per step) brings metrics to the host, logs, checks the guards,
checkpoints and updates the progress display (tqdm: rate and ETA).
"""

from __future__ import annotations

import sys
from time import monotonic
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from codex_jax.core.scan import run_steps


class Progress:
    """Progress of one stage on stderr: a tqdm bar with rate, ETA and the latest metrics.

    Off a terminal tqdm redraws at most every ``mininterval`` seconds, so logs stay short.
    """

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, desc=f"{label:>8}", unit="step", disable=not enabled,
                        file=stream or sys.stderr, dynamic_ncols=True, leave=True, mininterval=1.0)
        self.done = initial

    def update(self, done: int, metrics: dict[str, float] | None = None) -> None:
        if metrics:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        self.bar.update(done - self.done)
        self.done = done
        if done >= self.bar.total:
            self.bar.close()


def chunk_length(step: int, total_steps: int, log_every: int, checkpoint_every: int = 0,
                 stop_after: int | None = None) -> int:
    """Steps of the compiled chunk that starts at ``step``: up to the next multiple of
    ``log_every`` (and of ``checkpoint_every``, if set), ``stop_after`` or the end."""
    bounds = [log_every - step % log_every, total_steps - step]
    if checkpoint_every:
        bounds.append(checkpoint_every - step % checkpoint_every)
    if stop_after is not None and stop_after > step:
        bounds.append(stop_after - step)
    return min(bounds)


class StopRequested(Exception):
    """Raised after the checkpoint at ``stop_after`` is written (resume tests, debugging)."""


def train(
    state: Any,
    data: Any,
    key: jax.Array,
    *,
    total_steps: int,
    log_every: int,
    step_fn: Callable,
    select_fn: Callable,
    label: str,
    log: Callable[[dict], None] | None = None,
    show: tuple[str, ...] = ("loss",),
    progress: bool = True,
    checkpoint_every: int = 0,
    checkpoint_min_seconds: float = 0.0,
    on_checkpoint: Callable[[Any], None] | None = None,
    stop_after: int | None = None,
    check: Callable[[list[dict], Any], None] | None = None,
    layout: Any = None,
) -> tuple[Any, list[dict]]:
    """Runs from ``state.step`` up to ``total_steps`` in chunks; returns (state, records).

    Chunks end on multiples of ``log_every`` and ``checkpoint_every`` (absolute steps,
    so a resumed run cuts the same chunks).  After each chunk: metrics come to the
    host once, each record {"stage", "step", **metrics} goes to ``log``, ``check``
    may raise (numerical guards), and ``on_checkpoint(state)`` runs at the end and at
    checkpoint steps at least ``checkpoint_min_seconds`` after the previous save (or the
    start): the chunks, and so the results, never depend on the clock, only which
    boundaries are saved does.  ``stop_after`` saves and raises ``StopRequested``.
    ``layout`` runs the chunks on a device mesh (see ``codex_jax.core.sharding``).
    """
    if layout is not None:  # a no-op for arrays already laid out this way
        state, data = layout.place_state(state), layout.place_data(data)
    step = int(state.step)
    bar = Progress(label, total_steps, enabled=progress, initial=step)
    records: list[dict] = []
    last_save = monotonic()
    while step < total_steps:
        n = chunk_length(step, total_steps, log_every, checkpoint_every, stop_after)
        state, metrics = run_steps(state, data, key, step_fn=step_fn, select_fn=select_fn, num_steps=n,
                                   layout=layout)
        host = jax.device_get(metrics)  # the one sync per chunk
        chunk = []
        for i in range(n):
            rec = {"stage": label, "step": step + i + 1}
            rec.update({k: float(np.asarray(v[i])) for k, v in host.items()})
            chunk.append(rec)
            if log is not None:
                log(rec)
        records.extend(chunk)
        step += n
        if check is not None:
            check(chunk, state)
        due = bool(checkpoint_every) and step % checkpoint_every == 0 and (
            monotonic() - last_save >= checkpoint_min_seconds)
        if on_checkpoint is not None and (step == total_steps or step == stop_after or due):
            on_checkpoint(state)
            last_save = monotonic()
        bar.update(step, {k: chunk[-1][k] for k in show if k in chunk[-1]})
        if step == stop_after:
            raise StopRequested(f"{label} stopped after step {step}")
    return state, records
