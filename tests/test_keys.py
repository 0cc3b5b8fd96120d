"""core/keys.py: each helper is one compiled program with the same bits as the eager
JAX operations it replaces."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.core import keys


def _bits(k):
    return np.asarray(jax.random.key_data(k))


@pytest.mark.parametrize("num", [2, 3, 5])
def test_split_is_the_eager_split_unstacked(num):
    key = jax.random.key(11)
    got, want = keys.split(key, num), tuple(jax.random.split(key, num))
    assert len(got) == num
    for a, b in zip(got, want):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**31 + 5, 2**32 - 1])
def test_split_seed_is_the_eager_root_key_split(seed):
    got, want = keys.split_seed(seed, 4), tuple(jax.random.split(jax.random.key(seed), 4))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_permutation_is_the_eager_permutation():
    key = jax.random.key(3)
    got = np.asarray(keys.permutation(key, 37))
    np.testing.assert_array_equal(got, np.asarray(jax.random.permutation(key, 37)))
    assert sorted(got.tolist()) == list(range(37))


def test_to_device_matches_jnp_asarray_in_value_dtype_and_weak_type():
    tree = {"ids": np.arange(6, dtype=np.int64).reshape(2, 3), "mask": np.ones((2, 3), np.float32)}
    got = keys.to_device(tree)
    for name, x in tree.items():
        want = jnp.asarray(x)
        assert isinstance(got[name], jax.Array)
        assert got[name].dtype == want.dtype and got[name].weak_type == want.weak_type
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want))
    scalar = keys.to_device(0.1, np.float32)  # a Python float, cast once, like jnp.asarray(x, f32)
    want = jnp.asarray(0.1, jnp.float32)
    assert scalar.dtype == want.dtype and not scalar.weak_type and float(scalar) == float(want)


def test_each_helper_is_one_program(caplog):
    """The reason the module exists: eagerly, split + unpack is two programs."""
    key = jax.random.key(5)
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        keys.split(key, 12)  # sizes no other test uses: nothing compiled yet
        keys.permutation(key, 43)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert len(compiled) == 2, compiled
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        tuple(jax.random.split(key, 13))
    assert sum(r.getMessage().startswith("Compiling") for r in caplog.records) == 2  # split, then unstack
