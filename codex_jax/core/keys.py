"""Key splits and host-to-device copies for host code (drivers, stage set-up), each
as at most one compiled program.

Outside ``jit`` every JAX operation is a program of its own, traced, lowered and looked
up in the compilation cache the first time a process meets its shapes (20-40 ms each
with the cache warm, 0.1-0.2 s cold): ``a, b = jax.random.split(key)`` is two (the
split, then the unstack that unpacking does) and ``jnp.asarray(numpy_array)`` one per
shape.  The symbolic pipeline met about thirty of these per run.  The values are the
same bits as the eager operations (the same threefry programs, the same copies).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np


@functools.partial(jax.jit, static_argnums=1)
def split(key: jax.Array, num: int = 2) -> tuple[jax.Array, ...]:
    """``tuple(jax.random.split(key, num))`` as one program (per ``num``)."""
    return tuple(jax.random.split(key, num))


@functools.partial(jax.jit, static_argnums=(0, 1))
def split_seed(seed: int, num: int) -> tuple[jax.Array, ...]:
    """``tuple(jax.random.split(jax.random.key(seed), num))`` as one program: a run's
    root key, split by purpose (the seed is static: the key is a constant of it)."""
    return tuple(jax.random.split(jax.random.key(seed), num))


@functools.partial(jax.jit, static_argnums=1)
def permutation(key: jax.Array, num: int) -> jax.Array:
    """``jax.random.permutation(key, num)`` as one program (eagerly: two).  -> int32 [num]"""
    return jax.random.permutation(key, num)


def to_device(tree: Any, dtype: Any = None) -> Any:
    """Host arrays (numpy, Python scalars) of ``tree`` as device arrays, with ``dtype``
    if given, else numpy's dtype; a copy, like ``jnp.asarray``, without its program."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x, dtype)), tree)
