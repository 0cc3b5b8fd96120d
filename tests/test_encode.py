"""Records -> token arrays: packing, SFT masks, and host-side id validation."""

import numpy as np
import pytest

from codex_jax.config import DataConfig
from codex_jax.data.encode import check_ids, encode_dataset, pack_stream
from codex_jax.data.records import Corpus, Dataset, Demos, Prefs
from codex_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, TokenizerConfig
from codex_jax.errors import DataError


def test_out_of_range_ids_are_rejected_on_the_host():
    """A gather in JAX clamps out-of-range ids silently, so they must never reach one."""
    check_ids("ok", np.array([[0, 5, 9]]), 10)
    with pytest.raises(DataError, match=r"demos: token id 10 is outside the vocabulary \[0, 10\)"):
        check_ids("demos", np.array([[0, 10]]), 10)
    with pytest.raises(DataError, match="token id -1"):
        check_ids("corpus", np.array([3, -1]), 10)


def test_pack_stream_is_the_documents_joined_by_eos():
    docs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    tokens, mask = pack_stream(docs, 4)
    flat = tokens.ravel()[mask.ravel() > 0]
    np.testing.assert_array_equal(flat, [5, 6, 7, EOS_ID, 8, EOS_ID, 9, 10, EOS_ID])
    assert tokens.shape == (3, 4) and np.all(tokens.ravel()[mask.ravel() == 0] == PAD_ID)


def test_sft_rows_mask_exactly_the_completion_and_eos():
    ds = Dataset(corpus=Corpus(texts=("def f ( x ) : return x",)),
                 demos=Demos(prompts=("def f ( x ) :", "def g"), completions=("return x", "x")),
                 prefs=Prefs(prompts=("p",), chosen=("return x",), rejected=("x",)), source="test")
    tok = Tokenizer.build(ds.corpus.texts, TokenizerConfig())
    enc = encode_dataset(ds, tok, DataConfig(max_prompt_len=3, max_response_len=8))
    for row, mask, prompt, completion in zip(enc.sft_tokens, enc.sft_mask, ds.demos.prompts, ds.demos.completions):
        p = tok.encode(prompt)[:3]
        c = tok.encode(completion)
        n = len(p) + len(c) + 1
        np.testing.assert_array_equal(row[:n], p + c + [EOS_ID])
        np.testing.assert_array_equal(mask[:n], [0] * len(p) + [1] * (len(c) + 1))
        assert not mask[n:].any()
