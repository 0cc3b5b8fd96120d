"""Held-out corpus documents and demonstrations: chosen by content, never trained on,
and scored exactly (unigram closed form) or shown to generalise (transformer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY_CONFIG

from codex_jax.config import DataConfig, LMConfig, OptimConfig, PipelineConfig, TransformerConfig, from_dict
from codex_jax.data.encode import encode_dataset, heldout_flags
from codex_jax.data.records import Corpus, Dataset, Demos, Prefs
from codex_jax.data.tokenizer import EOS_ID, Tokenizer, TokenizerConfig
from codex_jax.models.registry import make_family
from codex_jax.run import train as loop
from codex_jax.run.pipeline import prepare, run_stages
from codex_jax.stages import lm

TEXTS = [f"def f{i}(x): return x + {i} * y{i % 3}" for i in range(40)]
DEMOS = Demos(prompts=tuple(f"def g{i}(a):" for i in range(20)),
              completions=tuple(f"return a * {i}" for i in range(20)))
DATASET = Dataset(corpus=Corpus(texts=tuple(TEXTS)), demos=DEMOS,
                  prefs=Prefs(prompts=("p",), chosen=("return x",), rejected=("x",)), source="test")


def test_the_split_holds_out_floor_n_fraction_records_chosen_by_content_not_order():
    flags = heldout_flags(TEXTS, 0.25)
    assert flags.sum() == 10 and heldout_flags(TEXTS, 0.0).sum() == 0 and heldout_flags(TEXTS[:3], 0.25).sum() == 0
    order = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = heldout_flags([TEXTS[i] for i in order], 0.25)
    assert {TEXTS[i] for i, f in zip(order, shuffled) if f} == {t for t, f in zip(TEXTS, flags) if f}


def _docs(tokens, mask):
    """The documents of a packed stream (split at EOS)."""
    stream = tokens.ravel()[mask.ravel() > 0].tolist()
    docs, cur = [], []
    for t in stream:
        if t == EOS_ID:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def test_held_out_documents_and_demonstrations_are_never_in_the_training_arrays():
    tok = Tokenizer.build(DATASET.corpus.texts, TokenizerConfig())
    enc = encode_dataset(DATASET, tok, DataConfig(heldout_fraction=0.25))
    train, held = _docs(enc.corpus_tokens, enc.corpus_mask), _docs(enc.heldout_corpus_tokens, enc.heldout_corpus_mask)
    flags = heldout_flags(TEXTS, 0.25)
    assert held == [tuple(tok.encode(t)) for t, f in zip(TEXTS, flags) if f]
    assert train == [tuple(tok.encode(t)) for t, f in zip(TEXTS, flags) if not f]
    assert enc.sft_tokens.shape[0] == 15 and enc.heldout_sft_tokens.shape[0] == 5
    assert enc.prompt.shape[0] == 15  # PPO prompts come from the training demonstrations only
    rows = lambda t: {tuple(r) for r in np.asarray(t).tolist()}
    assert not rows(enc.sft_tokens) & rows(enc.heldout_sft_tokens)
    # no split: nothing held out, and the arrays are exactly the full data
    full = encode_dataset(DATASET, tok, DataConfig(heldout_fraction=0.0))
    assert full.heldout_corpus_tokens is None and full.heldout_sft_tokens is None
    assert len(_docs(full.corpus_tokens, full.corpus_mask)) == len(TEXTS)


def test_unigram_held_out_perplexity_is_the_closed_form_on_held_out_counts():
    cfg = from_dict(PipelineConfig, {**TINY_CONFIG, "data": {**TINY_CONFIG.get("data", {}), "heldout_fraction": 0.25}})
    tokenizer, enc = prepare(DATASET, cfg)
    res = run_stages(enc, tokenizer, cfg)
    V = enc.vocab_size
    a = cfg.pretrain.smoothing
    train = np.bincount(enc.corpus_tokens.ravel(), weights=enc.corpus_mask.ravel(), minlength=V)
    held = np.bincount(enc.heldout_corpus_tokens.ravel(), weights=enc.heldout_corpus_mask.ravel(), minlength=V)
    p = (train + a) / (train.sum() + a * V)
    want = -(held * np.log(p)).sum() / held.sum()
    m0 = res["metrics"]["M0"]
    assert cfg.pretrain.mode == "exact" and m0["heldout_tokens"] == held.sum()
    np.testing.assert_allclose(m0["heldout_nll"], want, rtol=1e-5)
    np.testing.assert_allclose(m0["heldout_perplexity"], np.exp(want), rtol=1e-5)
    m1 = res["metrics"]["M1"]
    assert m1["heldout_demos"] == 5 and np.isfinite(m1["heldout_demo_nll_before"])
    assert m1["heldout_demo_nll_after"] < m1["heldout_demo_nll_before"]


def test_transformer_pretraining_lowers_the_held_out_loss_on_unseen_rows():
    """Rows are phases of one cycle of 7 ids; the held-out rows start at phases never
    trained on, so only a model that learned the cycle (not the rows) scores them well."""
    V, C = 24, 12
    start = np.arange(32)
    rows = ((start[:, None] + np.arange(C)[None]) % 7 + 4).astype(np.int32)
    train_rows, held_rows = rows[start % 7 != 3], rows[start % 7 == 3]
    family = make_family("transformer", V, TransformerConfig(layers=1, d_model=32, heads=2, context_len=C))
    cfg = LMConfig(steps=60, batch_size=8, optim=OptimConfig(lr=3e-3))
    data = lm.make_data(train_rows, np.ones(train_rows.shape), cfg.batch_size)
    held = lm.make_data(held_rows, np.ones(held_rows.shape), 1)
    state = lm.init(jax.random.key(0), cfg, family)
    before = float(lm.evaluate(state.params, family, held)["nll"])
    state, _ = loop.train(state, data, jax.random.key(1), total_steps=cfg.steps, log_every=cfg.steps,
                          step_fn=lm.step, select_fn=lm.select_batch, label="pretrain", progress=False)
    after = float(lm.evaluate(state.params, family, held)["nll"])
    assert before > 2.5 and after < 0.5 * before, (before, after)
    np.testing.assert_allclose(float(lm.evaluate(state.params, family, held)["perplexity"]), np.exp(after), rtol=1e-5)


def test_the_split_is_part_of_the_config_and_validated():
    import pytest

    from codex_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"DataConfig.heldout_fraction must be .* <= 0.5, got 0.7"):
        from_dict(PipelineConfig, {"data": {"heldout_fraction": 0.7}})
    assert jnp.isclose(PipelineConfig().data.heldout_fraction, 0.05)
