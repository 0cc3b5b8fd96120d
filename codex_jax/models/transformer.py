"""The transformer family: a small decoder-only LM, a reward model and a critic.

Model: token embedding (+ learned positions, or rotary in every attention layer),
``layers`` pre-LayerNorm blocks (causal multi-head self-attention, GELU MLP of width
``mlp_ratio * d_model``), a final LayerNorm and a head.  The LM head is TIED to the
token embedding (logits = h @ E^T, computed in float32); reward and value models
are separate transformers of the same config with a scalar head ``score_head``
(Dense(1)) on the final hidden state.  Parameters are float32.  Under
``cfg.dtype = "bfloat16"`` every matmul of a dense layer takes bf16 operands and
accumulates and returns float32 (``mixed_dot``), so the residual stream, attention (and
the KV cache), LayerNorm statistics, softmaxes and log-probs stay float32; only the
matmul inputs (and, in the backward pass, the output gradients) are rounded to bf16.  On
XLA CPU this is also what runs fast: a bf16 dot with a bf16 result, or one whose operand
is transposed, is computed in float32 there after converting both operands, while
bf16 x bf16 -> float32 in the plain [M, K] x [K, N] form runs on bf16 instructions
(AVX-512 BF16 / AMX); ``kernels.mixed_matmul`` puts the backward's matmuls in that form.

How a prompt is read.  Prompts arrive right-padded (prompt_mask is a prefix of
ones).  Every function reads the sequence

    [BOS] + prompt + response          (array length 1 + P + T)

with a key-validity mask ``valid = [1] + prompt_mask + response_mask``: positions are
``cumsum(valid) - 1`` (so the n real prompt tokens sit at positions 1..n and response
token t at n + 1 + t whatever the padding) and a query attends to the keys
``j <= i`` with ``valid[j]``.  Prompt pads are thus invisible.  This is exactly the
conditional that ``token_nll`` trains, which feeds ``[BOS] + tokens[:, :-1]``: a row
``tokens = prompt_real + response`` gets the same log-probs from both functions (a
test checks it).  So the SFT rows ``[BOS] prompt completion [EOS]`` of
``encode.sft_rows`` match PPO prompts that also start with BOS.

Output index of response token t: it is produced by the hidden state at array index
``n`` (the last real prompt token) for t = 0 and ``P + t`` for t >= 1.  Log-probs,
values (the critic's estimate at the state that PRODUCES response_t) and the KV-cache
decoder (``codex_jax.models.generate``) all use it.  ``response_logprobs`` is the tempered
softmax WITHOUT the sampler's top-k / top-p truncation.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config import TransformerConfig
from codex_jax.config.tokenizers import BOS_ID
from codex_jax.core import kernels
from codex_jax.errors import ConfigError

NEG_INF = -1e30  # masked attention logit (float32; every query sees >= 1 key: BOS)


# --------------------------------------------------------------------------- model
def _dtype(cfg: TransformerConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def mixed_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """flax's ``Dense(dot_general=...)`` hook for the bf16 path: bf16 operands, float32
    accumulation and result, forward and backward (``kernels.mixed_matmul``).  A dense
    layer contracts the input's trailing axes with the kernel's leading ones, so the
    product is one [M, K] x [K, N] matmul between reshapes."""
    del precision, preferred_element_type, kwargs
    (lhs_axes, rhs_axes), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_axes)
    if lhs_batch or rhs_batch or tuple(lhs_axes) != tuple(range(lhs.ndim - n, lhs.ndim)) \
            or tuple(rhs_axes) != tuple(range(n)):
        raise ValueError(f"mixed_dot: not a dense layer's contraction: {dimension_numbers}")
    k = math.prod(rhs.shape[:n])
    out = kernels.mixed_matmul(lhs.reshape(-1, k), rhs.reshape(k, -1))  # f32 [M, N]
    return out.reshape(lhs.shape[: lhs.ndim - n] + rhs.shape[n:])


def _dense_kwargs(cfg: TransformerConfig) -> dict:
    """Dense-layer options: flax's float32 layer, and under bf16 ``mixed_dot`` rounding the
    matmul's operands only (flax's bf16 layer would also convert the kernel and round the
    input's and kernel's gradients to bf16 on the way back)."""
    return {"dtype": jnp.float32, **({"dot_general": mixed_dot} if cfg.dtype == "bfloat16" else {})}


@functools.lru_cache(maxsize=64)
def _angle_table(length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position p times frequency i, float32 [length, hd/2] (computed in float64)."""
    half = head_dim // 2
    freqs = 10000.0 ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.arange(length, dtype=np.float64)[:, None] * freqs
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotary_tables(positions: jax.Array, head_dim: int, length: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, each float32 [B, 1, L, hd/2], for positions
    [B, L] in [0, length): rows of a constant table, gathered once per pass and shared by
    every layer's q and k.  (Computing cos / sin from the positions in the graph let XLA
    fuse them into every consumer, evaluated again per head, layer and backward use.)"""
    cos, sin = _angle_table(length, head_dim)
    return jnp.asarray(cos)[positions][:, None], jnp.asarray(sin)[positions][:, None]


def rotary(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary position embedding ("rotate half" form).  x [B, H, L, hd], tables of ``rotary_tables``."""
    cos, sin = tables
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x + attn(ln(x)); x + mlp(ln(x))."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, rot, attn_mask, cache=None, slot=0, read_idx=None):
        """x [B, L, D], rot the pass's ``rotary_tables`` (None with learned positions),
        attn_mask bool [B, L, K].

        Without a cache K = L (the keys are this call's tokens).  With a cache
        (k, v each [B, H, S, hd]) this call's keys/values are written at slots
        ``slot .. slot + L - 1`` and the queries attend over all S slots (K = S).
        ``read_idx`` int [B, Q]: only these rows' outputs are wanted (the last block of a
        pass whose caller reads a few positions): keys and values still come from every
        row, but queries, the attention output and the MLP run on the Q rows only.
        -> [B, Q, D] then, else [B, L, D].
        """
        cfg, dense = self.cfg, _dense_kwargs(self.cfg)
        h = nn.LayerNorm(dtype=jnp.float32, name="ln_attn")(x)  # float32: only the matmuls round
        qkv = nn.DenseGeneral((3, cfg.heads, cfg.head_dim), name="qkv", **dense)(h)  # f32
        q, k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in range(3))  # [B, H, L, hd]
        if rot is not None:
            q, k = rotary(q, rot), rotary(k, rot)
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, slot, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, slot, 0))
            cache = (k, v)
        if read_idx is not None:
            q = jnp.take_along_axis(q, read_idx[:, None, :, None], axis=2)  # [B, H, Q, hd]
            attn_mask = jnp.take_along_axis(attn_mask, read_idx[:, :, None], axis=1)  # [B, Q, K]
            x = jnp.take_along_axis(x, read_idx[..., None], axis=1)  # [B, Q, D]
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(attn_mask[:, None], scores / math.sqrt(cfg.head_dim), NEG_INF)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)
        x = x + nn.DenseGeneral(cfg.d_model, axis=(-2, -1), name="attn_out", **dense)(out)
        h = nn.LayerNorm(dtype=jnp.float32, name="ln_mlp")(x)
        h = nn.gelu(nn.Dense(cfg.mlp_ratio * cfg.d_model, name="mlp_in", **dense)(h))
        return x + nn.Dense(cfg.d_model, name="mlp_out", **dense)(h), cache


class Transformer(nn.Module):
    """Decoder-only trunk with a tied LM head (``scalar_head=False``) or a scalar head."""

    cfg: TransformerConfig
    vocab_size: int
    scalar_head: bool = False

    def setup(self):
        cfg, dt = self.cfg, _dtype(self.cfg)
        init = nn.initializers.normal(0.02)
        # float32 rows into the float32 residual stream (a bf16 Embed would also convert
        # the whole [V, D] table at every pass); the final norm hands the head the
        # compute dtype, which picks the head's matmul dtype
        self.embed = nn.Embed(self.vocab_size, cfg.d_model, embedding_init=init, dtype=jnp.float32)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embed(cfg.context_len, cfg.d_model, embedding_init=init, dtype=jnp.float32)
        self.blocks = [Block(cfg) for _ in range(cfg.layers)]
        self.final_norm = nn.LayerNorm(dtype=dt)
        if self.scalar_head:
            self.score_head = nn.Dense(1, dtype=jnp.float32)

    def _trunk(self, tokens, positions, attn_mask, cache, slot, read_idx=None):
        x = self.embed(tokens)
        if self.cfg.positions == "learned":
            x = x + self.pos_embed(positions)
        # positions < the keys' length: this call's tokens, or the cache's slots
        length = tokens.shape[1] if cache is None else cache[0][0].shape[2]
        rot = rotary_tables(positions, self.cfg.head_dim, length) if self.cfg.positions == "rotary" else None
        new_cache = []
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, c = block(x, rot, attn_mask, None if cache is None else cache[i], slot,
                         read_idx if last else None)
            new_cache.append(c)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))

    def __call__(self, tokens, positions, attn_mask, read_idx=None):
        """tokens, positions int32 [B, L], attn_mask bool [B, L, L] -> hidden [B, L, D]
        (or [B, Q, D] at the rows ``read_idx`` int [B, Q], computed only there in the last block)."""
        return self._trunk(tokens, positions, attn_mask, None, 0, read_idx)[0]

    def decode(self, tokens, positions, attn_mask, cache, slot):
        """Incremental path: tokens [B, L] written at cache slots slot.. ; attn_mask
        [B, L, S] over all cache slots.  -> (hidden [B, L, D], new cache)."""
        return self._trunk(tokens, positions, attn_mask, cache, slot)

    def logits(self, hidden):
        """Tied LM head, float32.  [..., D] -> [..., V]."""
        if self.scalar_head:
            raise ValueError("a scalar-head model has no LM head")
        emb = self.embed.embedding
        return jnp.einsum("...d,vd->...v", hidden, emb.astype(hidden.dtype),
                          preferred_element_type=jnp.float32)

    def score(self, hidden):
        """Scalar head, float32.  [..., D] -> [...]."""
        return self.score_head(hidden.astype(jnp.float32))[..., 0]

    def init_all(self, tokens, positions, attn_mask):
        h = self(tokens, positions, attn_mask)
        return self.score(h) if self.scalar_head else self.logits(h)


@functools.lru_cache(maxsize=None)
def make_model(cfg: TransformerConfig, vocab_size: int, scalar_head: bool = False) -> Transformer:
    return Transformer(cfg, vocab_size, scalar_head)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def init_params(cfg: TransformerConfig, vocab_size: int, key: jax.Array, scalar_head: bool = False):
    """Jitted: flax's eager init dispatches (and compiles) op by op, which is slow."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    positions = jnp.arange(2, dtype=jnp.int32)[None]
    mask = causal_mask(jnp.ones((1, 2), bool))
    return make_model(cfg, vocab_size, scalar_head).init(key, tokens, positions, mask,
                                                         method=Transformer.init_all)


def empty_cache(cfg: TransformerConfig, batch: int, length: int):
    """Zeroed KV cache: one (k, v) pair of [B, heads, length, head_dim] per layer."""
    shape = (batch, cfg.heads, length, cfg.head_dim)  # float32: attention runs in float32
    return tuple((jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
                 for _ in range(cfg.layers))


def num_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------- sequences
def causal_mask(valid: jax.Array) -> jax.Array:
    """Query i sees key j iff j <= i and valid[j].  valid bool [B, L] -> [B, L, L]."""
    length = valid.shape[1]
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    return causal[None] & valid[:, None, :]


def check_length(cfg: TransformerConfig, length: int) -> None:
    """Learned positions have a table of ``context_len`` rows; a longer sequence
    would silently clamp in the gather, so it is refused at trace time."""
    if cfg.positions == "learned" and length > cfg.context_len:
        raise ConfigError(f"sequence of {length} tokens exceeds TransformerConfig.context_len="
                          f"{cfg.context_len} (learned positions)")


def sequence(prompt, prompt_mask, response, response_mask=None):
    """[BOS] + prompt + response, its validity, positions and the output indices.

    -> tokens [B, 1+P+T], valid bool [B, 1+P+T], positions [B, 1+P+T],
       out_idx [B, T]: index of the hidden state that produces response token t.
    """
    b, p = prompt.shape
    t = response.shape[1]
    if response_mask is None:
        response_mask = jnp.ones(response.shape, bool)
    tokens = jnp.concatenate([jnp.full((b, 1), BOS_ID, jnp.int32), prompt.astype(jnp.int32),
                              response.astype(jnp.int32)], 1)
    valid = jnp.concatenate([jnp.ones((b, 1), bool), prompt_mask > 0, response_mask > 0], 1)
    positions = jnp.cumsum(valid, 1, dtype=jnp.int32) - 1
    n = 1 + jnp.sum(prompt_mask > 0, 1, dtype=jnp.int32)  # BOS + real prompt tokens
    later = jnp.broadcast_to(p + jnp.arange(1, max(t, 1)), (b, max(t - 1, 0)))
    out_idx = jnp.concatenate([(n - 1)[:, None], later], 1)[:, :t]
    return tokens, valid, positions, out_idx


def hidden_states(cfg, vocab_size, params, tokens, valid, positions, scalar_head=False, read_idx=None):
    """Final hidden states [B, L, D]; with ``read_idx`` int [B, Q] only those rows, [B, Q, D]
    (the last block then skips the rows nobody reads: ~10/12 of its per-token work)."""
    check_length(cfg, tokens.shape[1])
    model = make_model(cfg, vocab_size, scalar_head)
    return model.apply(params, tokens, positions, causal_mask(valid), read_idx)


# --------------------------------------------------------------------------- policy
def init_policy(cfg: TransformerConfig, vocab_size: int, key: jax.Array):
    return init_params(cfg, vocab_size, key)


def lm_logits(cfg, vocab_size, params, hidden):
    return make_model(cfg, vocab_size).apply(params, hidden, method=Transformer.logits)


def token_nll(cfg, vocab_size, params, tokens, label_smoothing):
    """Smoothed NLL of tokens[t] given [BOS] + tokens[<t].  tokens [B, L] -> f32 [B, L]."""
    b, length = tokens.shape
    inputs = jnp.concatenate([jnp.full((b, 1), BOS_ID, jnp.int32), tokens[:, :-1].astype(jnp.int32)], 1)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    hidden = hidden_states(cfg, vocab_size, params, inputs, jnp.ones((b, length), bool), positions)
    # the tied head and its loss fused (kernels.tied_head_nll): same values as
    # log_softmax(lm_logits(...)), a cheaper backward pass
    nll = kernels.tied_head_nll(hidden.reshape(b * length, -1), params["params"]["embed"]["embedding"],
                                tokens.reshape(-1).astype(jnp.int32), jnp.asarray(label_smoothing, jnp.float32))
    return nll.reshape(b, length)


def response_logits(cfg, vocab_size, params, prompt, prompt_mask, response):
    """Teacher-forced logits that produce each response token.  -> f32 [B, T, V]."""
    tokens, valid, positions, out_idx = sequence(prompt, prompt_mask, response)
    hidden = hidden_states(cfg, vocab_size, params, tokens, valid, positions, read_idx=out_idx)
    return lm_logits(cfg, vocab_size, params, hidden)


def response_logprobs(cfg, vocab_size, params, prompt, prompt_mask, response, temperature=1.0):
    """log softmax(logits / temperature)[response_t], one full forward pass.  -> f32 [B, T].

    logits / T = (hidden / T) E^T, so this is the fused tied-head NLL of hidden / T
    (``kernels.tied_head_nll``), whose backward pass PPO's updates run."""
    tokens, valid, positions, out_idx = sequence(prompt, prompt_mask, response)
    hidden = hidden_states(cfg, vocab_size, params, tokens, valid, positions, read_idx=out_idx)  # [B, T, D]
    b, t, d = hidden.shape
    scaled = (hidden.astype(jnp.float32) / temperature).astype(hidden.dtype).reshape(b * t, d)
    nll = kernels.tied_head_nll(scaled, params["params"]["embed"]["embedding"],
                                response.reshape(-1).astype(jnp.int32), jnp.zeros((), jnp.float32))
    return -nll.reshape(b, t)


# --------------------------------------------------------------------------- reward / value
def init_reward(cfg: TransformerConfig, vocab_size: int, key: jax.Array):
    """A separate transformer with a scalar head (not initialised from the policy)."""
    return init_params(cfg, vocab_size, key, scalar_head=True)


def _scores(cfg, vocab_size, params, hidden):
    return make_model(cfg, vocab_size, True).apply(params, hidden, method=Transformer.score)


def reward_token_scores(cfg, vocab_size, params, prompt, prompt_mask, response, response_mask):
    """The scalar head at the last position where response_mask is 1, placed there;
    zeros elsewhere (and an all-zero row for an empty response mask).  -> f32 [B, T]."""
    t = response.shape[1]
    rmask = response_mask > 0
    tokens, valid, positions, _ = sequence(prompt, prompt_mask, response, rmask)
    last = t - 1 - jnp.argmax(rmask[:, ::-1], axis=1)  # [B]
    idx = (1 + prompt.shape[1] + last)[:, None]
    hidden = hidden_states(cfg, vocab_size, params, tokens, valid, positions, scalar_head=True, read_idx=idx)
    score = _scores(cfg, vocab_size, params, hidden)  # [B, 1]
    at_last = (jnp.arange(t)[None] == last[:, None]) & jnp.any(rmask, 1, keepdims=True)
    return jnp.where(at_last, score, 0.0).astype(jnp.float32)


def reward_l2(params) -> jax.Array:
    """0.5 * ||score_head kernel||^2 (the trunk is not decayed by this term)."""
    kernel = params["params"]["score_head"]["kernel"]
    return 0.5 * jnp.sum(jnp.square(kernel.astype(jnp.float32)))


def init_value(cfg: TransformerConfig, vocab_size: int, key: jax.Array):
    """The critic: a separate transformer of the same config with a scalar head."""
    return init_params(cfg, vocab_size, key, scalar_head=True)


def values(cfg, vocab_size, params, prompt, prompt_mask, response):
    """values[:, t] = critic head at the hidden state that produces response_t (the
    last real prompt token for t = 0, response_{t-1} after), i.e. V(prompt, response_<t).
    -> f32 [B, T]."""
    tokens, valid, positions, out_idx = sequence(prompt, prompt_mask, response)
    hidden = hidden_states(cfg, vocab_size, params, tokens, valid, positions, scalar_head=True, read_idx=out_idx)
    return _scores(cfg, vocab_size, params, hidden)


# --------------------------------------------------------------------------- cost model
def count_flops(cfg: TransformerConfig, vocab_size: int, batch: int, seq_len: int,
                kind: str = "forward", head: str = "lm") -> float:
    """Matmul FLOPs (multiply-add = 2) of the model on ``batch`` rows of ``seq_len``.

    Per token: 2 * N with N = layers * (4 d^2 + 2 mlp_ratio d^2) matmul weights, plus
    the head (d V for "lm", d for "scalar"); per layer and sequence, attention
    scores and mixing cost 4 L^2 d (counted over the full L x L square, as the dense
    implementation computes it).  Embedding gathers, norms and softmaxes are not
    counted.  kind:
      "forward" - one teacher-forced pass;
      "train"   - forward + backward = 3 x forward;
      "decode"  - ``seq_len`` single-token steps with a KV cache of ``seq_len`` slots
                  (the implementation attends over the whole cache every step),
                  i.e. the sampling cost: per step 2 N + layers * 4 d seq_len.
    """
    d, layers = cfg.d_model, cfg.layers
    n = layers * (4 + 2 * cfg.mlp_ratio) * d * d + (d * vocab_size if head == "lm" else d)
    dense = 2.0 * n * batch * seq_len
    attention = 4.0 * layers * d * seq_len * seq_len * batch
    if kind not in ("forward", "train", "decode"):
        raise ValueError(f"kind must be forward|train|decode, got {kind!r}")
    total = dense + attention
    return 3.0 * total if kind == "train" else total
