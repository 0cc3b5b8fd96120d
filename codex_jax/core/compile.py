"""XLA compiler options a model family asks for, given to each program of its math.

``Family.compile_options`` (pairs of XLA debug-option name and value) go to
``jax.jit(fn, compiler_options=...)`` of the programs that run the family's math (the
training loops, the reports' evaluations, the samples), on the CPU backend only.  Per
program rather than through ``XLA_FLAGS``: the process, and the user's own programs in it,
keep XLA's defaults, and the library and the command line compile the same programs, so
they give the same bits.  The options are part of JAX's compilation-cache key.

Why a family would ask: XLA CPU's fusion emitters generate loop fusions through MLIR, which
costs ~0.1-0.2 s of compilation per small program more than the older emitters; the symbolic
family's programs are many, small and run for a second, so its runs are mostly compilation
(README "Speed").  The transformer asks for nothing: with the older emitters its PPO
iteration ran 18% slower and compiled 66% slower (``benchmarks/bench_xla_flags.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

# XLA CPU's older loop-fusion code generation: compiles faster, other rounding in fusions
LEGACY_FUSION_EMITTERS = (("xla_cpu_use_fusion_emitters", False),)


def family_options(family: Any) -> tuple:
    """The family's compiler options where they apply (the CPU backend), else ()."""
    options = tuple(getattr(family, "compile_options", ()) or ())
    return options if options and jax.default_backend() == "cpu" else ()


def jit_for(fn: Callable, family: Any, args: Any = (), **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` with ``family``'s compiler options; the same jitted
    object for the same (fn, options, kwargs), so its in-memory cache is shared.

    ``args``: the arguments it will be called with.  Called under a trace (a leaf is a
    Tracer: inside another ``jit``, ``vmap``, a sweep) it is a nested program, which JAX
    compiles with the enclosing one's options and refuses options of its own: none then."""
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args))
    return _jit(fn, () if traced else family_options(family), tuple(sorted(jit_kwargs.items())))


@functools.cache
def _jit(fn: Callable, options: tuple, jit_items: tuple) -> Callable:
    return jax.jit(fn, compiler_options=dict(options) or None, **dict(jit_items))
