"""Compiling later stages' training loops in a background thread while earlier stages run.

A cold run of the symbolic pipeline spends most of its time in XLA compilation, one
program at a time: the PPO loop alone takes ~3 s, the reward model's
~1.4 s.  XLA compiles without holding Python's GIL, so a second thread can compile the
loops of later stages while the main thread compiles and runs the earlier ones.  (XLA
already keeps ~1.4 of 2 cores busy compiling one program, so on 2 cores this buys ~1 s
of a 15 s cold run, not half; see the README's Speed section.)

The thread needs only each loop's argument shapes, not its values: it runs each
stage's ``setup`` on stand-in parameters of the stages before it (their set-up
states, which have the shapes of their trained ones), then ``steps_program(state).lower(...)
.compile()`` for the first chunk the host loop will call.  When the main thread comes
to a stage it ``claim``s it: it waits for that compilation if it has started, else
the thread skips the stage (never two compilations of one program at once).  JAX
keeps the compiled program, in memory and in the persistent cache, under the same key
the main thread's call looks up, so the call finds it; a guess that does not match
(another chunk length after a resume, say) costs only the thread's time, never a
result: what runs is always what the call itself would have compiled.

A main thread that comes to a stage while the thread is still compiling its loop does
not wait idle: ``meanwhile`` runs what the stage needs after its loop (its report, and
the samples after the last stage) on the thread's stand-ins, compiling those programs
for the real calls, and throws the numbers away.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax

from codex_jax.core.scan import steps_program
from codex_jax.run.train import chunk_length
from codex_jax.stages.table import pipeline_stages

log = logging.getLogger(__name__)


class Precompiler:
    """Compiles the training loops of ``ctx``'s stages ahead, in one background thread."""

    def __init__(self, ctx: Any, keys: dict[str, jax.Array], *, checkpoint_every: int = 0,
                 stop_after: tuple[str, int] | None = None):
        """``keys``: the stage keys as arrays of the thread's own (``driver.stage_keys``
        called again), never the run's: the thread's set-ups consume them, and JAX's
        key-reuse checker would see a key the run splits split twice."""
        self._ctx, self._keys = ctx, keys
        self._checkpoint_every, self._stop_after = checkpoint_every, stop_after
        self._lock = threading.Lock()
        self._claimed: set[str] = set()
        self._started: dict[str, threading.Event] = {}  # set when the stage's compilation has ended
        self._standins: dict[str, tuple] = {}  # label -> (context, set-up) on stand-in parameters
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompile")
        self._done = self._pool.submit(self._ahead)

    def claim(self, label: str) -> None:
        """The main thread is about to run stage ``label``: wait for its compilation if
        it has started, else make sure it never starts."""
        with self._lock:
            self._claimed.add(label)
            started = self._started.get(label)
        if started is not None:
            started.wait()

    def meanwhile(self, label: str, work) -> None:
        """If stage ``label``'s loop is compiling in the thread right now, runs
        ``work(ctx, setup)`` on the thread's stand-ins for that stage in the calling thread:
        the main thread, which would otherwise wait for the loop, compiles what the stage
        needs after it (its report; the samples after the last stage) on arguments of the
        same shapes, so its later calls find those programs compiled.  Errors are only
        logged: the main thread's own calls meet them."""
        with self._lock:
            started, standin = self._started.get(label), self._standins.get(label)
        if started is None or started.is_set() or standin is None:
            return
        try:
            work(*standin)
        except Exception as err:  # noqa: BLE001
            log.debug("precompile: %s work meanwhile failed: %r", label, err)

    def wait(self) -> None:
        """Until the thread has been through every stage (tests, benchmarks)."""
        self._done.result()

    def close(self) -> None:
        """Stops after the compilation in progress (if any) and waits for it."""
        with self._lock:
            self._closed = True
        self._done.result()
        self._pool.shutdown()

    def _ahead(self) -> None:
        params: dict[str, Any] = {}
        stages = pipeline_stages(self._ctx.cfg)
        # ``ctx.cache`` is shared with the main thread: data only, the same arrays
        # whichever thread builds them
        for stage in stages:
            with self._lock:
                if self._closed:
                    return
            try:
                ctx = dataclasses.replace(self._ctx, params=dict(params))
                setup = stage.module.setup(ctx, self._keys[stage.label])
            except Exception as err:  # noqa: BLE001 - the main thread meets (and reports) it itself
                log.debug("precompile: %s set-up failed: %r", stage.label, err)
                return
            params[stage.name] = stage.module.export(setup.state)  # stand-ins (same shapes) for later stages
            if setup.total == 0:
                continue
            with self._lock:
                if self._closed or stage.label in self._claimed:
                    continue
                started = self._started[stage.label] = threading.Event()
                self._standins[stage.label] = (ctx, setup)
            try:
                stop = self._stop_after[1] if self._stop_after and self._stop_after[0] == stage.label else None
                n = chunk_length(0, setup.total, setup.log_every, self._checkpoint_every, stop)
                args = (setup.state, setup.data, setup.key)
                steps_program(*args).lower(*args, step_fn=stage.module.step, select_fn=stage.module.select_batch,
                                           num_steps=n, layout=None).compile()
            except Exception as err:  # noqa: BLE001 - as above: the main thread's own call raises it
                log.debug("precompile: %s loop failed: %r", stage.label, err)
            finally:
                started.set()


def wanted(ctx: Any, layout: Any) -> bool:
    """Where compiling ahead pays and is known to match the main thread's calls: the
    symbolic family (a family with closed forms: seconds of compute against ~10 s of
    compiling), one process, one device (no mesh placement to reproduce) and no host
    reward (a sandbox per set-up).  Not the transformer: its run computes for minutes,
    and the stand-in states of all its stages at once raised the default run's peak RSS
    from 1.92 to 2.69 GB.  ``CODEX_JAX_PRECOMPILE=0`` turns it off (to measure it, or to
    debug a stage)."""
    return (os.environ.get("CODEX_JAX_PRECOMPILE", "1") != "0" and ctx.family.exact_objective is not None
            and layout is None and jax.process_count() == 1 and ctx.host_reward is None)
