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

from codex_jax.sharding import shard_rows


@functools.partial(jax.jit, static_argnames=("step_fn", "select_fn", "num_steps", "layout"))
def run_steps(state, data, key, *, step_fn: Callable, select_fn: Callable, num_steps: int, layout=None):
    """``num_steps`` steps of a stage in one compiled call.  -> (state, metrics [num_steps]).

    ``layout`` (a ``sharding.Layout``) pins each batch to the data axis and the carried
    state to its parameter rule; None is the single-device program."""
    # fold_in, not split: the stage key is passed again for every chunk, and fold_in
    # does not consume it (the key-reuse checker agrees)
    key_data, key_step = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

    def body(state, _):
        batch = select_fn(state, data, jax.random.fold_in(key_data, state.step))
        if layout is not None:
            batch = shard_rows(batch)
        state, metrics = step_fn(state, batch, jax.random.fold_in(key_step, state.step))
        if layout is not None:
            state = layout.constrain_state(state)
        return state, metrics

    if layout is None:
        return jax.lax.scan(body, state, None, length=num_steps)
    # the mesh as tracing context, for batches a step builds itself (sharding.shard_rows)
    with jax.sharding.use_abstract_mesh(layout.mesh.abstract_mesh):
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
    on_checkpoint: Callable[[Any], None] | None = None,
    stop_after: int | None = None,
    check: Callable[[list[dict], Any], None] | None = None,
    layout: Any = None,
) -> tuple[Any, list[dict]]:
    """Runs from ``state.step`` up to ``total_steps`` in chunks; returns (state, records).

    Chunks end on multiples of ``log_every`` and ``checkpoint_every`` (absolute steps,
    so a resumed run cuts the same chunks).  After each chunk: metrics come to the
    host once, each record {"stage", "step", **metrics} goes to ``log``, ``check``
    may raise (numerical guards), and ``on_checkpoint(state)`` runs at checkpoint
    steps and at the end.  ``stop_after`` saves and raises ``StopRequested``.
    ``layout`` runs the chunks on a device mesh (see ``codex_jax.sharding``).
    """
    if layout is not None:  # a no-op for arrays already laid out this way
        state, data = layout.place_state(state), layout.place_data(data)
    step = int(state.step)
    bar = Progress(label, total_steps, enabled=progress)
    records: list[dict] = []
    while step < total_steps:
        bounds = [log_every - step % log_every, total_steps - step]
        if checkpoint_every:
            bounds.append(checkpoint_every - step % checkpoint_every)
        if stop_after is not None and stop_after > step:
            bounds.append(stop_after - step)
        n = min(bounds)
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
        at_checkpoint = step == total_steps or (checkpoint_every and step % checkpoint_every == 0)
        if on_checkpoint is not None and (at_checkpoint or step == stop_after):
            on_checkpoint(state)
        bar.update(step, {k: chunk[-1][k] for k in show if k in chunk[-1]})
        if step == stop_after:
            raise StopRequested(f"{label} stopped after step {step}")
    return state, records
