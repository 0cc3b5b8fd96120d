"""Numerical kernels shared by every stage: counting, masked statistics, log-probs,
GAE, the PPO clipped surrogate and minibatch selection.

All reductions are in float32; masks are float32 or bool and broadcast against data.
Each kernel has a naive NumPy / Python-loop reference in ``tests/test_kernels.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-8


# --------------------------------------------------------------------------- counting
def count_tokens(ids: jax.Array, mask: jax.Array, vocab_size: int) -> jax.Array:
    """Token frequencies of one id sequence.  ids, mask: [L] -> counts float32 [V]."""
    return jax.ops.segment_sum(
        mask.astype(jnp.float32), ids, num_segments=vocab_size, indices_are_sorted=False
    )


def batch_count_tokens(ids: jax.Array, mask: jax.Array, vocab_size: int) -> jax.Array:
    """Summed frequencies of a padded batch: one masked segment-sum over the flattened
    ids.  ids, mask: [B, L] -> float32 [V].

    Per-example counts are ``jax.vmap(count_tokens)``; for the corpus total, one flat
    scatter-add matches ``jnp.bincount`` (benchmarks/bench_pipeline.py), while vmapping the
    per-row kernel (a batched scatter) or a [B, V] intermediate is slower.
    """
    return count_tokens(ids.reshape(-1), mask.reshape(-1), vocab_size)


# --------------------------------------------------------------------------- masked stats
def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x.astype(jnp.float32) * mask.astype(jnp.float32))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask == 1 (float32); 0 when the mask is empty."""
    mask = mask.astype(jnp.float32)
    return masked_sum(x, mask) / jnp.maximum(mask.sum(), EPS)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance of x over the mask."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x.astype(jnp.float32) - mean), mask)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / std over the mask; padded entries come out 0."""
    x = x.astype(jnp.float32)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + EPS)
    if not shift_mean:
        out = out + mean
    return out * mask.astype(jnp.float32)


# --------------------------------------------------------------------------- log-probs
def gather_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[tokens].  logits [..., V], tokens [...] -> float32 [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


@jax.custom_vjp
def tied_head_nll(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
                  label_smoothing: jax.Array) -> jax.Array:
    """Label-smoothed NLL of a tied LM head, fused with its gradient.

    hidden [N, D], embedding [V, D], targets int [N], label_smoothing [] -> float32 [N]
        = (1 - eps) * (-log p[target]) + eps * mean_v(-log p[v]),  p = softmax(hidden @ E^T)

    Autodiff of ``log_softmax(logits)`` keeps the [N, V] logits and walks several
    elementwise passes over them backwards; here the backward pass recomputes the
    logits (one matmul) and forms d logits = g * (p - eps / V - (1 - eps) onehot)
    in one pass, keeping only [N] log-normalisers between the passes (O(N) memory
    instead of O(N V)); the README's speed table compares it with autodiff.
    """
    return _tied_head_fwd(hidden, embedding, targets, label_smoothing)[0]


def _tied_logits(hidden, embedding):
    return jnp.einsum("nd,vd->nv", hidden, embedding.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _tied_head_fwd(hidden, embedding, targets, label_smoothing):
    logits = _tied_logits(hidden, embedding)  # f32 [N, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    eps = label_smoothing.astype(jnp.float32)
    nll = lse - (1.0 - eps) * target_logit - eps * jnp.mean(logits, axis=-1)
    return nll, (hidden, embedding, targets, label_smoothing, lse)


def _tied_head_bwd(res, g):
    hidden, embedding, targets, label_smoothing, lse = res
    vocab = embedding.shape[0]
    eps = label_smoothing.astype(jnp.float32)
    logits = _tied_logits(hidden, embedding)
    d = jnp.exp(logits - lse[:, None]) - eps / vocab - (1.0 - eps) * jax.nn.one_hot(targets, vocab, dtype=jnp.float32)
    d = d * g[:, None].astype(jnp.float32)  # d loss / d logits [N, V], formed in float32
    # the two backward matmuls run in the compute dtype with float32 accumulation, like
    # the forward one: in bfloat16 they are 2/3 of the head's work (bf16 hardware)
    dt = hidden.dtype
    d_hidden = jnp.einsum("nv,vd->nd", d.astype(dt), embedding.astype(dt),
                          preferred_element_type=jnp.float32).astype(dt)
    if dt == jnp.bfloat16:  # d E^T = hidden^T d in XLA CPU's bf16 form; the barrier keeps the .T out of the dot
        d_embedding = jax.lax.optimization_barrier(_weight_grad(hidden, d.astype(dt))).T
    else:
        d_embedding = jnp.einsum("nv,nd->vd", d, hidden, preferred_element_type=jnp.float32)
    d_embedding = d_embedding.astype(embedding.dtype)
    return d_hidden, d_embedding, None, jnp.zeros_like(label_smoothing)


tied_head_nll.defvjp(_tied_head_fwd, _tied_head_bwd)


@jax.custom_vjp
def mixed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] -> float32 [M, N] from bf16 operands, the backward's two
    matmuls (dx = g w^T, dw = x^T g) in bf16 with float32 accumulation too.

    XLA CPU runs a bf16 matmul on bf16 instructions (AVX-512 BF16, AMX) only as
    [M, K] x [K, N] -> float32 over row-major operands; autodiff's backward matmuls
    contract a transposed operand, which XLA folds into the dot and then computes in
    float32.  So the backward here hands it physically transposed copies (``_row_major_t``).
    """
    return _mixed_matmul_fwd(x, w)[0]


def _row_major_t(a: jax.Array) -> jax.Array:
    """a.T as a row-major copy that XLA cannot fold back into the consuming dot: the
    multiply by an opaque 1 takes the layout of its first operand (row-major) and the
    barrier keeps the simplifier from moving the transpose past it."""
    one = jax.lax.optimization_barrier(jnp.ones((), a.dtype))
    return jax.lax.optimization_barrier(one * a.T)


def _mixed_matmul_fwd(x, w):
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # residuals must be arrays
    return jnp.dot(x16, w16, preferred_element_type=jnp.float32), (x16, w16, dtypes)


def _mixed_matmul_bwd(res, g):
    x16, w16, (x_like, w_like) = res
    g16 = g.astype(jnp.bfloat16)
    dx = jnp.dot(g16, _row_major_t(w16), preferred_element_type=jnp.float32)  # [M, K]
    if x16.shape[1] <= g16.shape[1]:  # copy the smaller of x [M, K] and g [M, N] transposed
        dw = _weight_grad(x16, g16)  # [K, N]
    else:  # dw^T = g^T x, its transpose left to the consumer (the barrier keeps the dot as is)
        dw = jax.lax.optimization_barrier(_weight_grad(g16, x16)).T
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


def _weight_grad(x16: jax.Array, g16: jax.Array) -> jax.Array:
    """x^T g from a row-major copy of x^T: bf16 [M, K], [M, N] -> float32 [K, N]."""
    return jnp.dot(_row_major_t(x16), g16, preferred_element_type=jnp.float32)


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def categorical_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """Exact KL(p || q) over the last axis.  [..., V] -> [...]."""
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


# --------------------------------------------------------------------------- RL
def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over one response, right to left.

    rewards, values, mask: [T] (vmap for [B, T]).  The value after the last valid
    token is 0 (the episode ends there).  Returns (advantages [T], returns [T]).
    """
    mask = mask.astype(jnp.float32)
    next_values = jnp.concatenate([values[1:], jnp.zeros((1,), values.dtype)]) * jnp.concatenate(
        [mask[1:], jnp.zeros((1,), jnp.float32)]
    )
    deltas = (rewards + gamma * next_values - values) * mask

    def backward(carry, inputs):
        delta, m, m_next = inputs
        adv = delta + gamma * lam * carry * m_next
        return adv * m, adv * m

    m_next = jnp.concatenate([mask[1:], jnp.zeros((1,), jnp.float32)])
    _, adv = jax.lax.scan(backward, jnp.zeros((), jnp.float32), (deltas, mask, m_next), reverse=True)
    return adv, (adv + values) * mask


def clipped_surrogate(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, clip: float
) -> tuple[jax.Array, dict]:
    """PPO clipped policy loss (to minimise) and its diagnostics.  All inputs [B, T]."""
    old_logp = jax.lax.stop_gradient(old_logp)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = -masked_mean(jnp.minimum(unclipped, clipped), mask)
    metrics = {
        "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32), mask),
        # k3 estimator of KL(old || new): unbiased, non-negative (Schulman 2020)
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
    }
    return loss, metrics


# --------------------------------------------------------------------------- batching
def chunked_map(fn, tree, chunk: int):
    """``fn`` over the leading axis of ``tree`` in chunks of ``chunk`` rows (``lax.map``),
    so evaluating a whole data set never holds more than one chunk's activations
    (a transformer's [N, L, V] logits over a corpus would not fit).  -> fn's outputs, [N, ...]."""
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    padded = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]).reshape(
            (chunks, chunk) + x.shape[1:]), tree)
    out = jax.lax.map(fn, padded)
    return jax.tree_util.tree_map(lambda y: y.reshape((chunks * chunk,) + y.shape[2:])[:n], out)


def _mix32(x: jax.Array, k: jax.Array) -> jax.Array:
    """A uint32 hash of x keyed by k (the murmur3 finaliser)."""
    x = x ^ k
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keyed_permutation(key: jax.Array, positions: jax.Array, n: int, rounds: int = 4) -> jax.Array:
    """perm(positions) for a pseudo-random permutation of [0, n) chosen by ``key``.

    A balanced Feistel network over the smallest even number of bits covering n, with
    cycle-walking back into [0, n): a bijection computed element-wise, so a batch of B
    indices costs O(B) instead of the O(n log n) sort of ``jax.random.permutation``
    (which dominated the reward-model step on CPU).  positions int [B] -> int32 [B].
    """
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = bits // 2
    low = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.bits(key, (rounds,), jnp.uint32)

    def encrypt(x):
        left, right = x >> half, x & low
        for i in range(rounds):
            left, right = right, left ^ (_mix32(right, round_keys[i]) & low)
        return (left << half) | right

    x = encrypt(positions.astype(jnp.uint32))
    # cycle-walk: values >= n are encrypted again until they land in [0, n)
    x = jax.lax.while_loop(lambda x: jnp.any(x >= n), lambda x: jnp.where(x >= n, encrypt(x), x), x)
    return x.astype(jnp.int32)


def epoch_batch_indices(key: jax.Array, step: jax.Array, num_items: int, batch_size: int) -> jax.Array:
    """Indices of minibatch ``step`` in an epoch-wise shuffle without replacement.

    The order is a pure function of (key, step): epoch e uses the keyed permutation
    ``fold_in(key, e)``, so a resumed run sees exactly the same batches.  The
    remainder of each epoch (num_items % batch_size items) is dropped.  -> int32 [batch].
    """
    per_epoch = num_items // batch_size
    epoch, within = step // per_epoch, step % per_epoch
    positions = within * batch_size + jnp.arange(batch_size)
    return keyed_permutation(jax.random.fold_in(key, epoch), positions, num_items)
