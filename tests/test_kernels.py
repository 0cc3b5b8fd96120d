"""Every kernel against a naive NumPy / Python-loop reference, jit and non-jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dot_eqns

from codex_jax.core import kernels
from codex_jax.core.optim import apply_gradients

RNG = np.random.default_rng(1234)


def _padded_ids(b=6, length=11, v=13):
    ids = RNG.integers(0, v, size=(b, length)).astype(np.int32)
    mask = RNG.random((b, length)) < 0.7
    return ids, mask


@pytest.mark.parametrize("jit", [False, True])
def test_batch_count_tokens_matches_loop(jit):
    ids, mask = _padded_ids()
    expect = np.zeros(13)
    for row_ids, row_mask in zip(ids, mask):
        for i, m in zip(row_ids, row_mask):
            expect[i] += m
    fn = jax.jit(kernels.batch_count_tokens, static_argnums=2) if jit else kernels.batch_count_tokens
    np.testing.assert_array_equal(np.asarray(fn(ids, mask, 13)), expect)
    # per-example counts: the per-row kernel, vmapped, against the same loop
    rows = jax.vmap(kernels.count_tokens, in_axes=(0, 0, None))(ids, mask, 13)
    for r, (row_ids, row_mask) in enumerate(zip(ids, mask)):
        np.testing.assert_array_equal(rows[r], np.bincount(row_ids, weights=row_mask, minlength=13))


def test_count_tokens_equals_bincount_on_large_stream():
    ids = RNG.integers(0, 5000, size=(8, 4096)).astype(np.int32)
    mask = np.ones_like(ids, dtype=bool)
    got = kernels.batch_count_tokens(jnp.asarray(ids), jnp.asarray(mask), 5000)
    np.testing.assert_array_equal(np.asarray(got), np.bincount(ids.ravel(), minlength=5000))


def test_masked_stats_match_numpy_and_ignore_padding():
    x = RNG.normal(size=(5, 9)).astype(np.float32)
    mask = (RNG.random((5, 9)) < 0.6).astype(np.float32)
    sel = x[mask > 0]
    np.testing.assert_allclose(kernels.masked_mean(x, mask), sel.mean(), rtol=1e-5)
    np.testing.assert_allclose(kernels.masked_var(x, mask), sel.var(), rtol=1e-4)
    white = np.asarray(kernels.masked_whiten(x, mask))
    np.testing.assert_allclose(white[mask > 0], (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8), rtol=1e-4, atol=1e-5)
    assert np.all(white[mask == 0] == 0)
    # changing padded entries never changes a masked statistic
    x2 = np.where(mask > 0, x, 1e6).astype(np.float32)
    np.testing.assert_allclose(kernels.masked_mean(x2, mask), kernels.masked_mean(x, mask), rtol=1e-6)
    np.testing.assert_allclose(kernels.masked_whiten(x2, mask), white, rtol=1e-5, atol=1e-6)
    assert float(kernels.masked_mean(x, np.zeros_like(mask))) == 0.0


def test_gather_logprobs_and_kl_match_loops():
    logits = RNG.normal(size=(4, 3, 7)).astype(np.float32)
    tokens = RNG.integers(0, 7, size=(4, 3))
    got = np.asarray(kernels.gather_logprobs(logits, tokens))
    for i in range(4):
        for j in range(3):
            row = logits[i, j].astype(np.float64)
            logz = np.log(np.exp(row - row.max()).sum()) + row.max()
            assert abs(got[i, j] - (row[tokens[i, j]] - logz)) < 1e-5
    p, q = RNG.normal(size=7), RNG.normal(size=7)
    pp, qq = np.exp(p) / np.exp(p).sum(), np.exp(q) / np.exp(q).sum()
    np.testing.assert_allclose(kernels.categorical_kl(p, q), np.sum(pp * np.log(pp / qq)), rtol=1e-5)


def _gae_loop(r, v, m, gamma, lam):
    T = len(r)
    adv = np.zeros(T)
    last = 0.0
    for t in reversed(range(T)):
        if not m[t]:
            last = 0.0
            continue
        nv = v[t + 1] if t + 1 < T and m[t + 1] else 0.0
        delta = r[t] + gamma * nv - v[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, (adv + v) * m


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 1.0), (0.9, 0.0)])
@pytest.mark.parametrize("jit", [False, True])
def test_gae_matches_python_loop(gamma, lam, jit):
    r = RNG.normal(size=(5, 10)).astype(np.float32)
    v = RNG.normal(size=(5, 10)).astype(np.float32)
    lengths = RNG.integers(1, 11, size=5)
    m = (np.arange(10)[None] < lengths[:, None]).astype(np.float32)
    fn = jax.vmap(kernels.gae, in_axes=(0, 0, 0, None, None))
    if jit:
        fn = jax.jit(fn, static_argnums=(3, 4))
    adv, ret = fn(r, v, m, gamma, lam)
    for b in range(5):
        ea, er = _gae_loop(r[b], v[b], m[b], gamma, lam)
        np.testing.assert_allclose(adv[b], ea, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[b], er, rtol=1e-5, atol=1e-5)


def test_clipped_surrogate_matches_numpy_and_gradient_respects_clip():
    logp = RNG.normal(size=(3, 6)).astype(np.float32) * 0.3
    old = RNG.normal(size=(3, 6)).astype(np.float32) * 0.3
    adv = RNG.normal(size=(3, 6)).astype(np.float32)
    mask = (RNG.random((3, 6)) < 0.8).astype(np.float32)
    clip = 0.2
    loss, metrics = kernels.clipped_surrogate(logp, old, adv, mask, clip)
    ratio = np.exp(logp - old)
    obj = np.minimum(ratio * adv, np.clip(ratio, 1 - clip, 1 + clip) * adv)
    np.testing.assert_allclose(loss, -(obj * mask).sum() / mask.sum(), rtol=1e-5)
    frac = ((np.abs(ratio - 1) > clip) * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["clip_fraction"], frac, rtol=1e-6)
    # gradient is zero exactly where the clipped branch is active and binding
    g = np.asarray(jax.grad(lambda lp: kernels.clipped_surrogate(lp, old, adv, mask, clip)[0])(logp))
    binding = ((adv > 0) & (ratio > 1 + clip)) | ((adv < 0) & (ratio < 1 - clip)) | (mask == 0)
    assert np.all(g[binding] == 0)
    assert np.all(g[~binding] != 0)


def test_epoch_batch_indices_cover_each_epoch_without_replacement():
    key = jax.random.PRNGKey(7)
    n, b = 23, 5  # 4 batches per epoch, 3 items dropped
    fn = jax.jit(kernels.epoch_batch_indices, static_argnums=(2, 3))
    for epoch in range(3):
        idx = np.concatenate([np.asarray(fn(key, jnp.int32(epoch * 4 + i), n, b)) for i in range(4)])
        assert len(set(idx.tolist())) == 20 and idx.min() >= 0 and idx.max() < n
    e0 = np.asarray(fn(key, jnp.int32(0), n, b))
    e1 = np.asarray(fn(key, jnp.int32(4), n, b))
    assert not np.array_equal(e0, e1)  # a new permutation each epoch
    chex.assert_trees_all_equal(fn(key, jnp.int32(2), n, b), kernels.epoch_batch_indices(key, jnp.int32(2), n, b))


def test_apply_gradients_skips_non_finite_updates():
    tx = optax.adam(0.1)
    params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
    state = tx.init(params)
    bad = {"w": jnp.array([0.0, jnp.nan, 1.0]), "b": jnp.ones(())}
    new_p, new_s, ok = jax.jit(apply_gradients, static_argnums=0)(tx, params, state, bad)
    assert not bool(ok)
    chex.assert_trees_all_equal(new_p, params)
    chex.assert_trees_all_equal(new_s, state)
    good = {"w": jnp.ones(3), "b": jnp.ones(())}
    new_p, _, ok = apply_gradients(tx, params, state, good)
    assert bool(ok)
    np.testing.assert_allclose(new_p["w"], params["w"] - 0.1, rtol=1e-5)


def test_response_mask_ends_at_the_first_eos():
    from codex_jax.stages.ppo import response_mask

    response = RNG.integers(0, 6, size=(7, 9)).astype(np.int32)
    got = np.asarray(response_mask(response, 3))
    for row, m in zip(response, got):
        expect, seen = [], False
        for tok in row:
            expect.append(0.0 if seen else 1.0)
            seen = seen or tok == 3
        np.testing.assert_array_equal(m, expect)
    assert np.all(np.asarray(response_mask(response, None)) == 1)


def test_chunked_map_equals_the_unchunked_function():
    x = jnp.asarray(RNG.normal(size=(23, 5)).astype(np.float32))
    y = jnp.asarray(RNG.integers(0, 9, size=(23,)))
    fn = lambda t: (t[0] * 2.0).sum(-1) + t[1]  # noqa: E731
    for chunk in (1, 4, 23, 64):
        np.testing.assert_allclose(kernels.chunked_map(fn, (x, y), chunk), fn((x, y)), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 5907])
def test_keyed_permutation_is_a_bijection_and_looks_uniform(n):
    key = jax.random.key(n)
    perm = np.asarray(kernels.keyed_permutation(key, jnp.arange(n), n))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    if n == 7:  # where item 0 lands, over many keys: close to uniform (chi-square)
        first = jax.vmap(lambda k: kernels.keyed_permutation(k, jnp.arange(7), 7)[0])
        counts = np.bincount(np.asarray(first(jax.random.split(key, 2100))), minlength=7)
        chi2 = ((counts - 300.0) ** 2 / 300.0).sum()
        assert chi2 < 22.5, counts  # p ~ 0.001 at 6 degrees of freedom


# --------------------------------------------------------------------------- fused tied head
def _head_reference(hidden, embedding, targets, eps):
    """The unfused definition: log_softmax of the tied head, autodiff for the gradient."""
    logits = jnp.einsum("nd,vd->nv", hidden, embedding, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return (1.0 - eps) * nll - eps * jnp.mean(logp, axis=-1)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_tied_head_matches_autodiff_of_log_softmax(eps):
    key = jax.random.key(11)
    n, d, v = 24, 8, 37
    hidden = jax.random.normal(key, (n, d))
    embedding = jax.random.normal(jax.random.fold_in(key, 1), (v, d)) * 0.5
    targets = jax.random.randint(jax.random.fold_in(key, 2), (n,), 0, v)
    weights = jax.random.uniform(jax.random.fold_in(key, 3), (n,))
    eps = jnp.float32(eps)

    def loss(fn):
        return lambda h, e: jnp.sum(weights * fn(h, e, targets, eps))

    want, want_grads = jax.value_and_grad(loss(_head_reference), argnums=(0, 1))(hidden, embedding)
    for got_fn in (jax.value_and_grad(loss(kernels.tied_head_nll), argnums=(0, 1)),
                   jax.jit(jax.value_and_grad(loss(kernels.tied_head_nll), argnums=(0, 1)))):
        got, got_grads = got_fn(hidden, embedding)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            chex.assert_trees_all_close(g, w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(kernels.tied_head_nll(hidden, embedding, targets, eps),
                               _head_reference(hidden, embedding, targets, eps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_fused_tied_head_keeps_bfloat16_gradients_in_bfloat16(jit):
    key = jax.random.key(12)
    hidden = jax.random.normal(key, (6, 8), jnp.bfloat16)
    embedding = jax.random.normal(jax.random.fold_in(key, 1), (11, 8), jnp.float32)
    targets = jnp.arange(6) % 11
    f = lambda h, e: jnp.sum(kernels.tied_head_nll(h, e, targets, jnp.float32(0.0)))
    grad = jax.grad(f, argnums=(0, 1))
    gh, ge = (jax.jit(grad) if jit else grad)(hidden, embedding)
    assert gh.dtype == jnp.bfloat16 and ge.dtype == jnp.float32
    ref = jax.grad(lambda e: jnp.sum(_head_reference(hidden.astype(jnp.float32), e, targets, 0.0)))(embedding)
    chex.assert_trees_all_close(ge, ref, rtol=5e-2, atol=5e-2)


def test_fused_tied_head_runs_every_bfloat16_matmul_in_bfloat16():
    """bf16 compute path: forward and both backward matmuls take bf16 operands and
    accumulate in float32 (a float32 operand would run at the float32 rate)."""
    hidden = jnp.ones((6, 8), jnp.bfloat16)
    embedding = jnp.ones((11, 8), jnp.float32)
    f = lambda h, e: jnp.sum(kernels.tied_head_nll(h, e, jnp.arange(6) % 11, jnp.float32(0.0)))
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, embedding)
    found = list(dot_eqns(jaxpr.jaxpr))
    assert len(found) == 4  # forward logits, backward recompute, d_hidden, d_embedding
    for eqn in found:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn
    # the two backward products contract [M, K] x [K, N] (XLA CPU's bf16 form; d_embedding
    # from a transposed copy of hidden), the logits h E^T the embedding's rows
    forms = sorted(tuple(map(tuple, eqn.params["dimension_numbers"][0])) for eqn in found)
    assert forms == [((1,), (0,))] * 2 + [((1,), (1,))] * 2


# --------------------------------------------------------------------------- bf16 matmul
def _bf16_round(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("k, n", [(24, 19), (19, 24)], ids=["dw-transposed", "x-transposed"])
def test_mixed_matmul_forward_and_backward_are_bf16_products_accumulated_in_float32(jit, k, n):
    """kernels.mixed_matmul: y = bf16(x) bf16(w), dx = bf16(g) bf16(w)^T, dw = bf16(x)^T bf16(g),
    each accumulated in float32 (against float64 products of the rounded operands), the
    backward's operands handed over as transposed copies (values unchanged)."""
    key = jax.random.key(21)
    x = jax.random.normal(key, (37, k), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.float32)
    g = jax.random.normal(jax.random.fold_in(key, 2), (37, n), jnp.float32)
    fwd = jax.jit(kernels.mixed_matmul) if jit else kernels.mixed_matmul
    y, vjp = jax.vjp(fwd, x, w)
    dx, dw = (jax.jit(vjp) if jit else vjp)(g)
    chex.assert_trees_all_equal_dtypes((y, dx, dw), (x, x, w))
    xr, wr, gr = _bf16_round(x), _bf16_round(w), _bf16_round(g)
    np.testing.assert_allclose(y, xr @ wr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gr @ wr.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, xr.T @ gr, rtol=1e-5, atol=1e-5)


def test_mixed_matmul_runs_all_three_matmuls_on_bf16_operands():
    x, w = jnp.ones((8, 4), jnp.bfloat16), jnp.ones((4, 6), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(kernels.mixed_matmul(x, w)), (0, 1)))(x, w)
    dots = list(dot_eqns(jaxpr.jaxpr))
    assert len(dots) == 3
    for eqn in dots:
        assert [str(v.aval.dtype) for v in eqn.invars] == ["bfloat16", "bfloat16"]
        assert str(eqn.outvars[0].aval.dtype) == "float32"
        (lhs_axes, rhs_axes), _ = eqn.params["dimension_numbers"]
        assert (tuple(lhs_axes), tuple(rhs_axes)) == ((1,), (0,))  # [M, K] x [K, N]: no transpose folded in
