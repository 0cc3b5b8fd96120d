"""Tests of codex_jax.data.tokenizer: vocabulary order, encoding, padding, persistence."""

import dataclasses
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codex_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK,
    UNK_ID,
    EncodedBatch,
    Tokenizer,
    TokenizerConfig,
    pack_ids,
)
from codex_jax.errors import ConfigError, DataError

CORPUS = ["the cat sat .", "the dog sat on the mat .", "a cat !"]


def build(texts=CORPUS, **kw):
    return Tokenizer.build(texts, TokenizerConfig(**kw))


def test_specials_and_hand_computed_order():
    tok = build()
    # counts: the 3, . 2, cat 2, sat 2, ! 1, a 1, dog 1, mat 1, on 1 -> desc count, then token
    # ("." < "cat" < "sat" and "!" < "a" < ... by code point).
    assert tok.tokens == SPECIAL_TOKENS + ("the", ".", "cat", "sat", "!", "a", "dog", "mat", "on")
    assert tok.tokens[:4] == ("<pad>", "<unk>", "<bos>", "<eos>")
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tok.vocab_size == 13
    assert tok.token_id("the") == 4 and tok.token_id("<eos>") == EOS_ID


def test_min_count_and_max_size():
    assert build(min_count=2).tokens[4:] == ("the", ".", "cat", "sat")
    assert build(max_size=6).tokens[4:] == ("the", ".")
    assert build(max_size=6).vocab_size == 6
    with pytest.raises(DataError, match="min_count"):
        build(min_count=4)
    with pytest.raises(DataError):
        build([])
    with pytest.raises(DataError):
        build(["", "   \n"])


def test_document_order_does_not_change_ids():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(50)]
    docs = [" ".join(rng.choices(words, k=rng.randint(1, 20))) for _ in range(200)]
    shuffled = docs[:]
    rng.shuffle(shuffled)
    a, b = build(docs, max_size=30), build(shuffled, max_size=30)
    assert a.tokens == b.tokens and a == b and a.fingerprint() == b.fingerprint()


def test_modes_and_lowercase():
    text = "Hello, World! hello"
    assert build([text]).split(text) == ["Hello", ",", "World", "!", "hello"]
    assert build([text], lowercase=True).split(text) == ["hello", ",", "world", "!", "hello"]
    assert build([text], mode="whitespace").split(text) == ["Hello,", "World!", "hello"]
    lower = build([text], lowercase=True)
    assert lower.tokens[4] == "hello" and "Hello" not in lower.tokens
    assert lower.encode("HELLO") == [lower.token_id("hello")]


def test_literal_special_text_is_not_a_control_token():
    tok = build(["a <eos> b"], mode="whitespace")
    assert tok.tokens.count("<eos>") == 1  # not counted a second time
    assert tok.encode("a <eos>") == [tok.token_id("a"), UNK_ID]


def test_encode_decode_round_trip_and_unknown():
    tok = build()
    text = "the dog sat on the mat ."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [int(i) for i in tok.encode_many([text])[0]] == ids
    assert tok.encode_many([text])[0].dtype == np.int32
    assert tok.encode("the zebra") == [tok.token_id("the"), UNK_ID]
    assert tok.token_id("zebra") == UNK_ID
    assert tok.decode([BOS_ID] + ids + [EOS_ID, PAD_ID]) == text
    assert tok.decode([BOS_ID, UNK_ID], skip_special=False) == f"<bos> {UNK}"
    assert tok.decode([UNK_ID]) == UNK  # UNK stands for a word; it is kept
    with pytest.raises(DataError):
        tok.decode([tok.vocab_size])
    with pytest.raises(DataError):
        tok.decode([-1])


def naive_pack(seqs, max_len=None, bos=False, eos=False, multiple=1):
    rows = [([BOS_ID] if bos else []) + list(s) + ([EOS_ID] if eos else []) for s in seqs]
    if max_len is not None:
        rows = [r[:max_len] for r in rows]
    width = max((len(r) for r in rows), default=0)
    width = -(-width // multiple) * multiple if rows else 0
    ids = [r + [PAD_ID] * (width - len(r)) for r in rows]
    mask = [[j < len(r) for j in range(width)] for r in rows]
    return ids, [len(r) for r in rows], mask, width


def check_against_naive(batch: EncodedBatch, seqs, **kw):
    ids, lengths, mask, width = naive_pack(seqs, **kw)
    assert batch.ids.dtype == np.int32 and batch.lengths.dtype == np.int32 and batch.mask.dtype == bool
    assert batch.ids.shape == (len(seqs), width) == batch.mask.shape
    assert batch.ids.tolist() == ids
    assert batch.lengths.tolist() == lengths
    assert batch.mask.tolist() == mask


@settings(max_examples=200, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(4, 50), max_size=12), max_size=8),
    max_len=st.none() | st.integers(1, 15),
    bos=st.booleans(), eos=st.booleans(), multiple=st.integers(1, 8),
)
def test_pack_matches_naive_reference(seqs, max_len, bos, eos, multiple):
    from codex_jax.data.tokenizer import _pack
    arrays = [np.asarray(s, np.int32) for s in seqs]
    check_against_naive(_pack(arrays, max_len, multiple, bos, eos), seqs,
                        max_len=max_len, bos=bos, eos=eos, multiple=multiple)
    if not bos and not eos:
        check_against_naive(pack_ids(arrays, max_len=max_len, pad_to_multiple=multiple), seqs,
                            max_len=max_len, multiple=multiple)


def test_encode_batch_examples():
    tok = build()
    texts = ["the cat sat .", "a", "the dog sat on the mat ."]
    seqs = [tok.encode(t) for t in texts]
    b = tok.encode_batch(texts, add_bos=True, add_eos=True)
    check_against_naive(b, seqs, bos=True, eos=True)
    assert b.ids[1, :3].tolist() == [BOS_ID, tok.token_id("a"), EOS_ID]
    # Truncation keeps BOS and drops the tail, EOS included.
    b = tok.encode_batch(texts, max_len=4, add_bos=True, add_eos=True, pad_to_multiple=8)
    assert b.ids.shape == (3, 8)
    assert b.ids[0, :4].tolist() == [BOS_ID] + seqs[0][:3]
    assert b.lengths.tolist() == [4, 3, 4]
    assert EOS_ID not in b.ids[2].tolist()
    check_against_naive(b, seqs, max_len=4, bos=True, eos=True, multiple=8)
    empty = tok.encode_batch([])
    assert empty.ids.shape == (0, 0) and empty.lengths.shape == (0,)


def test_pack_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="max_len"):
        pack_ids([np.arange(3)], max_len=0)
    with pytest.raises(ConfigError, match="pad_to_multiple"):
        pack_ids([np.arange(3)], pad_to_multiple=0)
    with pytest.raises(DataError):
        pack_ids([np.array([0.5])])
    with pytest.raises(DataError):
        pack_ids([np.array([-1])])
    with pytest.raises(DataError):
        pack_ids([np.zeros((2, 2), np.int32), np.arange(3)])
    with pytest.raises(TypeError):
        build().encode_batch("the cat")


def test_save_load_round_trip_and_fingerprint(tmp_path):
    tok = build(lowercase=True, max_size=10)
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded == tok and loaded.tokens == tok.tokens and loaded.config == tok.config
    assert loaded.fingerprint() == tok.fingerprint() == build(lowercase=True, max_size=10).fingerprint()
    assert len(tok.fingerprint()) == 64
    assert build(max_size=10).fingerprint() != tok.fingerprint()  # config is part of it
    assert Tokenizer.from_json(json.loads(json.dumps(tok.to_json()))) == tok
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temp file left
    with pytest.raises(DataError, match="no such file"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


@pytest.mark.parametrize("field,value", [
    ("mode", "bpe"), ("mode", 3), ("lowercase", 1), ("lowercase", "yes"),
    ("min_count", 0), ("min_count", True), ("min_count", 1.5),
    ("max_size", 4), ("max_size", True), ("max_size", "100"),
])
def test_bad_config_raises_config_error_naming_field(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        TokenizerConfig(**{field: value})
    assert repr(value) in str(info.value)


def _mutations():
    good = build(max_size=8).to_json()

    def edit(fn):
        obj = json.loads(json.dumps(good))
        fn(obj)
        return obj

    return [
        [], "text",
        edit(lambda o: o.pop("tokens")),
        edit(lambda o: o.update(extra=1)),
        edit(lambda o: o.update(format="other")),
        edit(lambda o: o.update(version=2)),
        edit(lambda o: o.update(tokens="the")),
        edit(lambda o: o["tokens"].reverse()),
        edit(lambda o: o["tokens"].append(o["tokens"][5])),  # duplicate
        edit(lambda o: o["tokens"].append(7)),
        edit(lambda o: o["tokens"].append("")),
        edit(lambda o: o["tokens"].append("two words")),
        edit(lambda o: o.update(tokens=list(SPECIAL_TOKENS))),  # nothing but specials
        edit(lambda o: o["tokens"].extend(["x", "y", "z"])),  # more than max_size=8
        edit(lambda o: o["config"].update(max_size=3)),
        edit(lambda o: o["config"].update(mode="bpe")),
        edit(lambda o: o["config"].pop("lowercase")),
        edit(lambda o: o["config"].update(junk=True)),
        edit(lambda o: o.update(config=None)),
    ]


@pytest.mark.parametrize("obj", _mutations())
def test_from_json_rejects_bad_content(obj):
    with pytest.raises(DataError):
        Tokenizer.from_json(obj)


def test_tokenizer_is_frozen_and_validates():
    tok = build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tok.tokens = ()
    with pytest.raises(DataError):
        Tokenizer(TokenizerConfig(), ("a",) + SPECIAL_TOKENS)
    with pytest.raises(ConfigError):
        Tokenizer({"mode": "regex"}, SPECIAL_TOKENS + ("a",))
