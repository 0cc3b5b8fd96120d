"""The compiled part of every stage's training loop: a ``lax.scan`` over steps.

``run_steps`` is the compiled part: ``lax.scan`` over ``num_steps`` steps (``scan_steps``,
jitted with the compiler options of the state's family: ``core.compile``), each with
a batch chosen by ``select_batch(state, data, key_data_i)`` and a step key
``key_step_i``, where ``key_*_i = fold_in(key_*, state.step)``.  Keys depend on the
absolute step only, so k steps + (N - k) steps equals N steps exactly.

The host loop that calls it chunk by chunk is ``codex_jax.run.train``.
"""

from __future__ import annotations

from typing import Callable

import jax

from codex_jax.core.compile import jit_for
from codex_jax.core.sharding import shard_rows

STATIC = ("step_fn", "select_fn", "num_steps", "layout")


def run_steps(state, data, key, *, step_fn: Callable, select_fn: Callable, num_steps: int, layout=None):
    """``num_steps`` steps of a stage in one compiled call.  -> (state, metrics [num_steps]).

    ``layout`` (a ``sharding.Layout``) pins each batch to the data axis and the carried
    state to its parameter rule; None is the single-device program."""
    return steps_program(state, data, key)(state, data, key, step_fn=step_fn, select_fn=select_fn,
                                           num_steps=num_steps, layout=layout)


def steps_program(state, data=None, key=None) -> Callable:
    """The jitted ``scan_steps`` that ``run_steps`` calls with these arguments (the
    compiler options of the state's family: ``core.compile.jit_for``); ``.lower(...)`` of it
    compiles ahead (``run.precompile``)."""
    return jit_for(scan_steps, getattr(state, "family", None), (state, data, key), static_argnames=STATIC)


def scan_steps(state, data, key, *, step_fn: Callable, select_fn: Callable, num_steps: int, layout=None):
    """The traced body of ``run_steps`` (see there)."""
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
