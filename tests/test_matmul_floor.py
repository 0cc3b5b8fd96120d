"""benchmarks/bench_matmul_floor.py reads the matmuls a compiled program runs; its floor is
only as good as that walk, so the walk is checked against closed forms and against the
pass-by-pass FLOP count of bench_transformer on a real PPO minibatch gradient."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_matmul_floor as bf  # noqa: E402
import bench_transformer as bt  # noqa: E402

from codex_jax.config import TransformerConfig  # noqa: E402


def _program(x, w, a, b, q, k):
    return (x @ w,  # [5, 7] x [7, 3]
            jnp.einsum("ij,kj->ik", a, b),  # contracts both operands' last axes
            jnp.einsum("bqd,bkd->bqk", q, k))  # batched


def _operands():
    keys = jax.random.split(jax.random.key(0), 6)
    shapes = [(5, 7), (7, 3), (4, 9), (6, 9), (2, 3, 8), (2, 5, 8)]
    return [jax.random.normal(kk, s) for kk, s in zip(keys, shapes)]


def test_hlo_dots_finds_every_matmul_with_its_flops():
    ops = _operands()
    dots = bf.hlo_dots(jax.jit(_program).lower(*ops).compile().as_text())
    want = sorted([2 * 5 * 7 * 3, 2 * 4 * 6 * 9, 2 * 2 * 3 * 5 * 8])
    assert sorted(bf.dot_flops(d) for d in dots) == want


def test_matmul_program_reproduces_the_dots_shapes_and_dtypes():
    ops = _operands()
    dots = bf.hlo_dots(jax.jit(_program).lower(*ops).compile().as_text())
    fn, operands = bf.matmul_program(dots, jax.random.key(1))
    outs = fn(operands)
    got = sorted((tuple(o.shape), o.dtype) for o in outs)
    assert got == sorted((tuple(o.shape), o.dtype) for o in _program(*ops))
    # each replica output is the dot of its own operands (no dimension numbers mixed up)
    for (lhs, rhs), d, out in zip(operands, dots, outs):
        want = jax.lax.dot_general(np.asarray(lhs, np.float64), np.asarray(rhs, np.float64), d["dims"])
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_hlo_dots_refuses_a_module_without_dots():
    with pytest.raises(ValueError, match="no dot"):
        bf.hlo_dots(jax.jit(lambda x: x * 2).lower(jnp.ones(3)).compile().as_text())


def test_hlo_dots_refuses_a_loop():
    f = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: y @ x, x))
    with pytest.raises(ValueError, match="while loop"):
        bf.hlo_dots(f.lower(jnp.ones((4, 4))).compile().as_text())


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_minibatch_gradient_matmuls_match_the_pass_by_pass_count(algorithm):
    """The quick recipe's minibatch gradient: the compiled program's dots add up to
    bench_transformer's counted update FLOPs per minibatch, within 0.1%: the count's one
    matmul XLA runs as a reduction instead is PPO's [N, D] x [D, 1] value head."""
    c = bt.QUICK
    cfg = dataclasses.replace(TransformerConfig(**c["model"]), dtype="float32")
    grad, args, counted, _, steps = bf.minibatch_gradient(algorithm, c, cfg)
    dots = bf.hlo_dots(grad.lower(*args).compile().as_text())
    found = sum(bf.dot_flops(d) for d in dots)
    assert steps == c["epochs"] * c["minibatches"]
    assert found == pytest.approx(counted, rel=1e-3)
