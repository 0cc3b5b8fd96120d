"""The transformer family against naive recomputation: KV cache, padding, causality,
losses, sampling, reward / value heads and a few training steps."""

import functools

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dot_eqns

from codex_jax.config import LMConfig, OptimConfig, TransformerConfig
from codex_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from codex_jax.errors import ConfigError
from codex_jax.models import generate, registry
from codex_jax.models import transformer as tf
from codex_jax.stages import lm

V = 50
CFG = TransformerConfig(layers=2, d_model=32, heads=4, context_len=32)
LEARNED = TransformerConfig(layers=2, d_model=32, heads=4, context_len=32, positions="learned")
B, P, T = 4, 6, 5  # one set of shapes throughout, so each function compiles once per config

# jitted once per (config, shapes); eager op-by-op dispatch is far slower on CPU
static = functools.partial(jax.jit, static_argnums=(0, 1))
resp_logits, resp_logprobs = static(tf.response_logits), static(tf.response_logprobs)
decode_logits, token_nll = static(generate.decode_logits), static(tf.token_nll)
reward_scores, values_fn = static(tf.reward_token_scores), static(tf.values)
sample_fn = jax.jit(generate.sample, static_argnums=(0, 1, 6))


def _perturb(params, seed, scale=0.3):
    """Init logits are nearly uniform; noise makes attention and outputs non-trivial.
    (NumPy on the host: a jitted per-leaf jax.random would compile for seconds.)"""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), jnp.float32), params)


def _policy(cfg=CFG, seed=0):
    return _perturb(tf.init_policy(cfg, V, jax.random.PRNGKey(seed)), seed + 100)


def _critic(init_fn, seed=0):
    return _perturb(init_fn(CFG, V, jax.random.PRNGKey(seed)), seed + 100)


def _batch(seed=0):
    """Ragged right-padded prompts (real lengths 1, P, 3, 2) and random responses."""
    rng = np.random.default_rng(seed)
    lengths = np.array([1, P, 3, 2])
    pmask = (np.arange(P)[None] < lengths[:, None]).astype(np.float32)
    prompt = np.where(pmask > 0, rng.integers(4, V, (B, P)), PAD_ID).astype(np.int32)
    response = rng.integers(4, V, (B, T)).astype(np.int32)
    return jnp.asarray(prompt), jnp.asarray(pmask), jnp.asarray(response)


def _real(prompt, pmask, b):
    return np.asarray(prompt[b])[np.asarray(pmask[b]) > 0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _naive_jit(cfg, params, ids, scalar_head, last):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    hidden = tf.hidden_states(cfg, V, params, ids, jnp.ones(ids.shape, bool), positions, scalar_head)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return tf._scores(cfg, V, params, h) if scalar_head else tf.lm_logits(cfg, V, params, h)


def _naive(cfg, params, seqs, scalar_head=False):
    """Output at the last token of each UNPADDED sequence: plain positions 0..n-1 and a
    causal mask, every sequence on its own.  (Batched for speed: trailing filler after
    a sequence cannot reach its last token through a causal mask.)"""
    ids = np.full((48, 12), PAD_ID, np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    last = np.array([len(s) - 1 for s in seqs] + [0] * (48 - len(seqs)), np.int32)
    return _naive_jit(cfg, params, jnp.asarray(ids), scalar_head, jnp.asarray(last))[: len(seqs)]


def _prefixes(prompt, pmask, response):
    """[BOS] + real prompt + response[:t] for every (row, t), row-major."""
    return [np.concatenate([[BOS_ID], _real(prompt, pmask, b), response[b, :t]])
            for b in range(B) for t in range(T)]


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("cfg", [CFG, LEARNED], ids=["rotary", "learned"])
def test_kv_cache_decoding_matches_full_recompute(cfg):
    params = _policy(cfg)
    prompt, pmask, response = _batch()
    cached = decode_logits(cfg, V, params, prompt, pmask, response)  # prefill + scan of steps
    full = resp_logits(cfg, V, params, prompt, pmask, response)  # one padded forward pass
    assert float(jnp.std(full)) > 0.5  # non-trivial logits
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)
    naive = _naive(cfg, params, _prefixes(prompt, pmask, response))  # unpadded, per prefix
    np.testing.assert_allclose(cached.reshape(B * T, V), naive, atol=1e-4, rtol=1e-4)


def test_kv_cache_in_bfloat16_stays_close_to_float32():
    cfg = TransformerConfig(layers=2, d_model=32, heads=4, context_len=32, dtype="bfloat16")
    params = _policy()  # the same float32 parameters; only activations change
    prompt, pmask, response = _batch()
    cached = decode_logits(cfg, V, params, prompt, pmask, response)
    assert cached.dtype == jnp.float32
    np.testing.assert_allclose(cached, resp_logits(CFG, V, params, prompt, pmask, response), atol=0.15)


@pytest.mark.parametrize("scalar_head", [False, True], ids=["policy", "critic"])
def test_last_block_on_the_read_rows_only_equals_the_full_pass(scalar_head):
    """read_idx: the last block computes queries / MLP only at the rows read; values and
    gradients equal those of the full pass gathered at the same rows."""
    params = _critic(tf.init_value, 3) if scalar_head else _policy()
    prompt, pmask, response = _batch()
    tokens, valid, positions, out_idx = tf.sequence(prompt, pmask, response)

    def read(p):
        return tf.hidden_states(CFG, V, p, tokens, valid, positions, scalar_head, read_idx=out_idx)

    def full(p):
        hidden = tf.hidden_states(CFG, V, p, tokens, valid, positions, scalar_head)
        return jnp.take_along_axis(hidden, out_idx[..., None], axis=1)
    got, want = jax.jit(read)(params), jax.jit(full)(params)
    assert got.shape == (B, T, CFG.d_model) and float(jnp.std(want)) > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(9), want.shape)
    g_read = jax.jit(jax.grad(lambda p: jnp.sum(w * read(p))))(params)
    g_full = jax.jit(jax.grad(lambda p: jnp.sum(w * full(p))))(params)
    chex.assert_trees_all_close(g_read, g_full, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- padding, causality
def test_prompt_pads_do_not_change_any_output():
    params, rm, critic = _policy(), _critic(tf.init_reward, 1), _critic(tf.init_value, 2)
    prompt, pmask, response = _batch()
    other = jnp.where(pmask > 0, prompt, jax.random.randint(jax.random.PRNGKey(9), prompt.shape, 1, V))
    assert bool(jnp.any(other != prompt))
    rmask = jnp.asarray((np.arange(T)[None] < np.array([[5], [2], [1], [4]])).astype(np.float32))
    for a, b in [(resp_logprobs(CFG, V, params, x, pmask, response, 0.7) for x in (prompt, other)),
                 (reward_scores(CFG, V, rm, x, pmask, response, rmask) for x in (prompt, other)),
                 (values_fn(CFG, V, critic, x, pmask, response) for x in (prompt, other))]:
        assert float(jnp.max(jnp.abs(a))) > 0
        np.testing.assert_allclose(a, b, atol=1e-5)
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(sample_fn(CFG, V, params, key, prompt, pmask, 24, 1.0),
                                  sample_fn(CFG, V, params, key, other, pmask, 24, 1.0))
    # the amount of padding does not matter either: the naive references are unpadded


def test_future_tokens_never_change_earlier_positions():
    params, critic = _policy(), _critic(tf.init_value)
    prompt, pmask, response = _batch()
    lp = resp_logprobs(CFG, V, params, prompt, pmask, response, 1.0)
    val = values_fn(CFG, V, critic, prompt, pmask, response)
    tokens = jnp.concatenate([prompt, response], 1)
    nll = token_nll(CFG, V, params, tokens, 0.0)
    for k in range(T):
        changed = response.at[:, k].set((response[:, k] + 7 - 4) % (V - 4) + 4)
        lp2 = resp_logprobs(CFG, V, params, prompt, pmask, changed, 1.0)
        val2 = values_fn(CFG, V, critic, prompt, pmask, changed)
        np.testing.assert_allclose(lp2[:, :k], lp[:, :k], atol=1e-6)
        assert bool(jnp.all(lp2[:, k] != lp[:, k]))
        np.testing.assert_allclose(val2[:, : k + 1], val[:, : k + 1], atol=1e-6)  # V(state before y_k)
        if k + 1 < T:
            assert bool(jnp.all(val2[:, k + 1] != val[:, k + 1]))
        j = P + k
        nll2 = token_nll(CFG, V, params, tokens.at[:, j].set(changed[:, k]), 0.0)
        np.testing.assert_allclose(nll2[:, :j], nll[:, :j], atol=1e-6)


# --------------------------------------------------------------------------- losses
def test_token_nll_equals_naive_prefix_loop_and_smoothing_formula():
    params = _policy()
    L = P + T
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, L)), jnp.int32)
    logits = _naive(CFG, params, [np.concatenate([[BOS_ID], tokens[b, :t]]) for b in range(B) for t in range(L)])
    logp = np.asarray(jax.nn.log_softmax(logits)).reshape(B, L, V)
    expect = np.array([[-logp[b, t, tokens[b, t]] for t in range(L)] for b in range(B)])
    np.testing.assert_allclose(token_nll(CFG, V, params, tokens, 0.0), expect, atol=1e-5)
    eps = 0.1
    np.testing.assert_allclose(token_nll(CFG, V, params, tokens, eps),
                               (1 - eps) * expect - eps * logp.mean(-1), atol=1e-5)


def test_response_logprobs_is_token_nll_of_the_concatenated_row():
    """SFT trains token_nll on [prompt, response] rows; PPO scores the same conditional."""
    params = _policy()
    prompt, pmask, response = _batch()
    lp = resp_logprobs(CFG, V, params, prompt, pmask, response, 1.0)
    rows = np.zeros((B, P + T), np.int32)  # left-aligned, right-padded
    for b in range(B):
        real = _real(prompt, pmask, b)
        rows[b, : len(real) + T] = np.concatenate([real, response[b]])
    nll = token_nll(CFG, V, params, jnp.asarray(rows), 0.0)
    for b in range(B):
        n = int(pmask[b].sum())
        np.testing.assert_allclose(lp[b], -nll[b, n: n + T], atol=1e-5)


def test_response_logprobs_temperature_and_jit_agree():
    params = _policy()
    prompt, pmask, response = _batch()
    fam = registry.transformer(V, CFG)
    eager = fam.response_logprobs(params, prompt, pmask, response, 0.5)
    jitted = resp_logprobs(CFG, V, params, prompt, pmask, response, 0.5)
    np.testing.assert_allclose(eager, jitted, atol=1e-5)
    logits = resp_logits(CFG, V, params, prompt, pmask, response)
    expect = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.5), response[..., None], -1)[..., 0]
    np.testing.assert_allclose(eager, expect, atol=1e-5)


# --------------------------------------------------------------------------- sampling
def test_sample_is_deterministic_per_key_and_pads_after_eos():
    params = _policy(seed=4)
    prompt, pmask, _ = _batch()
    a = sample_fn(CFG, V, params, jax.random.PRNGKey(0), prompt, pmask, 24, 1.0)
    assert a.shape == (B, 24) and a.dtype == jnp.int32
    np.testing.assert_array_equal(a, sample_fn(CFG, V, params, jax.random.PRNGKey(0), prompt, pmask, 24, 1.0))
    eos_rows = 0
    for seed in range(1, 6):
        b = np.asarray(sample_fn(CFG, V, params, jax.random.PRNGKey(seed), prompt, pmask, 24, 1.0))
        assert np.any(b != np.asarray(a))
        for row in b:
            hits = np.flatnonzero(row == EOS_ID)
            if hits.size:
                eos_rows += 1
                assert np.all(row[hits[0] + 1:] == PAD_ID)
    assert eos_rows > 0


sample_logp_fn = jax.jit(generate.sample_with_logprobs, static_argnums=(0, 1, 6))


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 3)])
def test_sampling_log_probs_equal_a_teacher_forced_pass(temperature, top_k):
    """The old log-probs a rollout reads off the sampler are response_logprobs of the
    sampled tokens (tempered, untruncated even under top-k), and the tokens are sample's."""
    cfg = TransformerConfig(layers=2, d_model=32, heads=4, context_len=32, top_k=top_k)
    params, (prompt, pmask, _) = _policy(), _batch()
    key = jax.random.PRNGKey(3)
    tokens, logp = sample_logp_fn(cfg, V, params, key, prompt, pmask, T, temperature)
    np.testing.assert_array_equal(tokens, sample_fn(cfg, V, params, key, prompt, pmask, T, temperature))
    assert logp.dtype == jnp.float32 and logp.shape == (B, T)
    forced = resp_logprobs(cfg, V, params, prompt, pmask, tokens, temperature)
    assert float(jnp.std(forced)) > 0.1  # non-trivial
    np.testing.assert_allclose(logp, forced, atol=2e-5, rtol=1e-5)


def test_bfloat16_ppo_log_probs_and_policy_gradient_stay_within_tolerance_of_float32():
    """The bf16 compute path (bf16 matmuls, f32 master weights, f32 softmax / log-probs):
    per-token log-probs within 0.1 nats of float32 (half of log(1 + clip) at clip 0.2, so
    PPO's importance ratios stay well inside the trust region), from the sampler as from a
    teacher-forced pass, and a policy gradient within 5% (relative L2) of float32's."""
    bf16 = TransformerConfig(layers=2, d_model=32, heads=4, context_len=32, dtype="bfloat16")
    params, (prompt, pmask, _) = _policy(), _batch()
    tokens, sampled = sample_logp_fn(bf16, V, params, jax.random.PRNGKey(3), prompt, pmask, T, 1.0)
    assert sampled.dtype == jnp.float32
    exact = resp_logprobs(CFG, V, params, prompt, pmask, tokens, 1.0)
    for got in (sampled, resp_logprobs(bf16, V, params, prompt, pmask, tokens, 1.0)):
        assert float(jnp.max(jnp.abs(got - exact))) < 0.1
    adv = jax.random.normal(jax.random.PRNGKey(4), tokens.shape)

    def policy_gradient(cfg):
        g = jax.grad(lambda p: jnp.sum(adv * tf.response_logprobs(cfg, V, p, prompt, pmask, tokens, 1.0)))(params)
        return jax.flatten_util.ravel_pytree(g)[0]
    g32, g16 = policy_gradient(CFG), policy_gradient(bf16)
    assert float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32)) < 0.05


@pytest.mark.parametrize("scalar_head", [False, True], ids=["policy", "critic"])
def test_bfloat16_dense_matmuls_take_bf16_operands_and_return_float32(scalar_head):
    """Under dtype = "bfloat16" each block's four dense matmuls (qkv, attention output,
    MLP in and out) round their operands to bf16 and accumulate and return float32: the
    form XLA CPU runs on bf16 instructions (a bf16 result is computed in float32 there).
    Attention stays float32.  Under float32 every matmul is float32."""
    bf16 = TransformerConfig(layers=2, d_model=32, heads=4, context_len=32, dtype="bfloat16")
    params = _critic(tf.init_value, 3) if scalar_head else _policy()
    prompt, pmask, response = _batch()
    tokens, valid, positions, _ = tf.sequence(prompt, pmask, response)
    for cfg in (bf16, CFG):
        jaxpr = jax.make_jaxpr(lambda p: tf.hidden_states(cfg, V, p, tokens, valid, positions, scalar_head))(params)
        dots = list(dot_eqns(jaxpr.jaxpr))
        operand_dtypes = [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in dots]
        assert all(str(eqn.outvars[0].aval.dtype) == "float32" for eqn in dots)
        want_bf16 = 4 * cfg.layers if cfg.dtype == "bfloat16" else 0
        assert operand_dtypes.count(("bfloat16", "bfloat16")) == want_bf16
        assert len(dots) == 6 * cfg.layers  # 4 dense + 2 attention einsums per block
        assert operand_dtypes.count(("float32", "float32")) == len(dots) - want_bf16


@pytest.mark.parametrize("block", [128, 7])
def test_inverse_cdf_draw_follows_the_softmax_and_never_draws_a_filtered_id(block):
    """The sampler's draw over 300 ids (blocks of 128 with a padded tail, or of 7): frequencies
    over 40,000 draws per row within 5 standard errors of softmax(logits), no -inf id ever
    drawn (one row has a whole block of them), and at the ends of [0, 1) the first and the
    last id with mass (rounding at the top cannot reach a filtered tail)."""
    v, n = 300, 40_000
    logits = 1.5 * jax.random.normal(jax.random.PRNGKey(8), (2, v))
    logits = logits.at[0, 128:256].set(-jnp.inf).at[0, :3].set(-jnp.inf).at[1, 290:].set(-jnp.inf)
    logits = logits.at[1, ::5].set(-jnp.inf)
    u = jax.random.uniform(jax.random.PRNGKey(9), (n, 2))
    draw = jax.jit(jax.vmap(lambda u, lg: generate.inverse_cdf_draw(u, lg, block), in_axes=(0, None)))
    ids = np.asarray(draw(u, logits))  # [n, 2]
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    for row in range(2):
        freq = np.bincount(ids[:, row], minlength=v) / n
        assert np.all(freq[probs[row] == 0] == 0)
        np.testing.assert_array_less(np.abs(freq - probs[row]), 5 * np.sqrt(probs[row] * (1 - probs[row]) / n) + 1e-12)
    np.testing.assert_array_equal(generate.inverse_cdf_draw(jnp.zeros(2), logits, block), [3, 1])
    np.testing.assert_array_equal(generate.inverse_cdf_draw(jnp.ones(2), logits, block), [299, 289])


def test_top_k_one_is_greedy_decoding():
    cfg = TransformerConfig(layers=2, d_model=32, heads=4, context_len=32, top_k=1)
    params = _policy(CFG)
    prompt, pmask, _ = _batch()
    out = sample_fn(cfg, V, params, jax.random.PRNGKey(5), prompt, pmask, T, 1.0)
    greedy = np.zeros((B, T), np.int32)  # full recompute each step; later slots cannot leak back
    done = np.zeros(B, bool)
    for t in range(T):
        nxt = np.asarray(jnp.argmax(resp_logits(CFG, V, params, prompt, pmask, jnp.asarray(greedy))[:, t], -1))
        greedy[:, t] = np.where(done, PAD_ID, nxt)
        done |= greedy[:, t] == EOS_ID
    np.testing.assert_array_equal(out, greedy)


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
    keep = lambda f: np.isfinite(np.asarray(f))[0].tolist()  # noqa: E731
    assert keep(generate.filter_logits(logits, 2, 1.0)) == [True, False, True, False]
    assert keep(generate.filter_logits(logits, 0, 0.5)) == [True, False, False, False]
    assert keep(generate.filter_logits(logits, 0, 0.79)) == [True, False, True, False]
    assert keep(generate.filter_logits(logits, 0, 0.81)) == [True, False, True, True]
    # nucleus after top-k renormalises: 0.8 / 0.95 = 0.84 of the mass precedes id 3
    assert keep(generate.filter_logits(logits, 3, 0.83)) == [True, False, True, False]
    assert keep(generate.filter_logits(logits, 3, 0.85)) == [True, False, True, True]


# --------------------------------------------------------------------------- reward / value
def test_reward_scores_sit_on_the_last_valid_token_only():
    rm = _critic(tf.init_reward)
    prompt, pmask, response = _batch()
    lengths = [5, 2, 1, 0]
    rmask = jnp.asarray((np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.float32))
    scores = reward_scores(CFG, V, rm, prompt, pmask, response, rmask)
    junk = jnp.where(rmask > 0, response, 9)  # tokens after the mask do not matter
    np.testing.assert_allclose(scores, reward_scores(CFG, V, rm, prompt, pmask, junk, rmask), atol=1e-5)
    seqs = [np.concatenate([[BOS_ID], _real(prompt, pmask, b), response[b, :n]]) for b, n in enumerate(lengths)]
    naive = _naive(CFG, rm, seqs, scalar_head=True)
    for b, n in enumerate(lengths):
        nonzero = np.flatnonzero(np.asarray(scores[b]))
        assert nonzero.tolist() == ([n - 1] if n else [])
        if n:
            np.testing.assert_allclose(scores[b, n - 1], naive[b], atol=1e-5)
    kernel = rm["params"]["score_head"]["kernel"]
    np.testing.assert_allclose(tf.reward_l2(rm), 0.5 * jnp.sum(kernel ** 2), rtol=1e-6)


def test_values_read_the_state_that_produces_each_token():
    fam = registry.transformer(V, CFG)
    init_value, values = fam.init_value, fam.values
    assert registry.transformer(V, CFG) is fam
    critic = _perturb(init_value(jax.random.PRNGKey(0)), 1)
    prompt, pmask, response = _batch()
    val = values_fn(CFG, V, critic, prompt, pmask, response)
    assert values.func is tf.values and values.args == (CFG, V)  # the same function, bound
    naive = _naive(CFG, critic, _prefixes(prompt, pmask, response), scalar_head=True)
    np.testing.assert_allclose(val.reshape(-1), naive, atol=1e-5)


# --------------------------------------------------------------------------- family, training
def test_family_is_cached_and_learned_positions_refuse_long_inputs():
    fam = registry.transformer(V, CFG)
    assert fam is registry.transformer(V, TransformerConfig(layers=2, d_model=32, heads=4, context_len=32))
    hash(fam)
    assert fam.name == "transformer" and fam.fit_exact is None and fam.exact_objective is None
    with pytest.raises(ConfigError, match="context_len"):
        jax.eval_shape(functools.partial(tf.token_nll, LEARNED, V), tf.init_policy(LEARNED, V, jax.random.PRNGKey(0)),
                       jnp.zeros((1, 33), jnp.int32), 0.0)


def test_count_flops_matches_the_parameter_tree():
    params = tf.init_policy(CFG, V, jax.random.PRNGKey(0))
    kernels = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                  if "kernel" in jax.tree_util.keystr(path))
    fwd = tf.count_flops(CFG, V, batch=2, seq_len=8)
    assert fwd == 2 * (kernels + V * CFG.d_model) * 16 + 4 * CFG.layers * CFG.d_model * 64 * 2
    assert tf.count_flops(CFG, V, 2, 8, kind="train") == 3 * fwd


def test_adam_steps_lower_the_loss_on_a_repetitive_corpus():
    fam = registry.transformer(V, CFG)
    tokens = np.stack([np.roll(np.tile(np.arange(4, 12), 2), r) for r in range(8)]).astype(np.int32)
    cfg = LMConfig(steps=30, batch_size=8, optim=OptimConfig(lr=0.01))
    data = lm.make_data(tokens, np.ones_like(tokens, np.float32), 8)
    state = lm.init(jax.random.PRNGKey(0), cfg, fam)
    step, losses = jax.jit(lm.step), []
    for _ in range(30):  # the whole corpus is one batch; "loss" is that of the params going in
        state, metrics = step(state, data, jax.random.PRNGKey(0))
        losses.append(float(metrics["loss"]))
    before, after = losses[0], losses[-1]
    assert before > 3.5 and after < 0.5 * before, (before, after)
