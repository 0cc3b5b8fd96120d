"""Tests of codex_jax.data.bpe: byte-level round trip, specials, determinism, persistence."""

import dataclasses
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codex_jax.data.bpe import BYTE_ALPHABET, MIN_VOCAB_SIZE, BPEConfig, BPETokenizer
from codex_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, EncodedBatch
from codex_jax.errors import ConfigError, DataError

tokenizers = pytest.importorskip("tokenizers")


def _corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Code-like documents with indentation, tabs, trailing spaces and some non-ASCII."""
    rng = random.Random(seed)
    names = ["x", "y", "value", "items", "total", "self", "key", "result", "data", "i"]
    docs = []
    for d in range(n_docs):
        lines = [f"def func_{d}({rng.choice(names)}, {rng.choice(names)}=None):"]
        for _ in range(rng.randint(2, 8)):
            a, b = rng.choice(names), rng.choice(names)
            lines.append(rng.choice([
                f"    {a} = {b} + {rng.randint(0, 99)}",
                f"    for {a} in {b}:\n        total += {a}  ",
                f"    if {a} is not None:\n\treturn {b}[{rng.randint(0, 9)}]",
                f"    # naïve café — {a} ≤ {b} 🐍",
                f"    return {a}.get('{b}', {rng.randint(0, 9)})",
                f'    """Docstring for {a}: 日本語のテキスト."""',
            ]))
        docs.append("\n".join(lines) + "\n")
    return docs


CORPUS = _corpus()


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.build(CORPUS, BPEConfig(vocab_size=400))


# Run in a fresh interpreter: reads the corpus from a JSON file, prints the fingerprint.
_CHILD = """
import json, random, sys
from codex_jax.data.bpe import BPEConfig, BPETokenizer
texts = json.load(open(sys.argv[1], encoding="utf-8"))
random.Random(int(sys.argv[2])).shuffle(texts)
cfg = BPEConfig(vocab_size=int(sys.argv[3]), min_frequency=int(sys.argv[4]))
print(BPETokenizer.build(texts, cfg).fingerprint())
"""

ROUND_TRIP = [
    "",
    "x",
    "def f(a, b):\n    return a + b\n",
    "class A:\n\tdef m(self):\t# tab-indented\n\t\tpass\n",
    "trailing spaces   \nand tabs\t\t\n",
    "   leading spaces",
    "\n\n\n",
    " ",
    "\t",
    "\r\n\r\nwindows\r\n",
    "a  b   c    d",
    "naïve café — ≤ ≥ ∑ 🐍 🇫🇷 👩‍👩‍👧 日本語 עברית",
    "e\u0301 combining, \u200b zero width, \u00a0 nbsp, \u2028 line sep, \ufeff bom",
    "\x00 nul \x01 \x1c\x1d\x1e\x1f \x7f control",
    "<pad> <unk> <bos> <eos> <eos><eos>",
    "x = '<eos>'  # literal special text",
    "'s 't 're 've 'm 'll 'd it's we're",
    "1234567890 3.14159 1e-9 0xFF",
    "\U0010FFFF \uFFFD \uFFFE",
    "never seen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ ꙮ",
]


# --------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("vocab_size", 259), ("vocab_size", 0), ("vocab_size", -5), ("vocab_size", True),
    ("vocab_size", 8192.0), ("vocab_size", "8192"), ("vocab_size", None), ("vocab_size", 2**31),
    ("min_frequency", 0), ("min_frequency", -1), ("min_frequency", True), ("min_frequency", 1.5),
    ("min_frequency", "2"),
])
def test_bad_config_names_field_and_value(field, value):
    with pytest.raises(ConfigError, match=field) as e:
        BPEConfig(**{field: value})
    assert repr(value) in str(e.value)


def test_config_defaults_and_bounds():
    c = BPEConfig()
    assert (c.vocab_size, c.min_frequency) == (8192, 2)
    assert MIN_VOCAB_SIZE == 260
    BPEConfig(vocab_size=260, min_frequency=1)
    c = BPEConfig(vocab_size=np.int64(300))
    assert type(c.vocab_size) is int and c == BPEConfig(vocab_size=300)
    with pytest.raises(TypeError):
        BPEConfig(300)  # keyword-only
    with pytest.raises(ConfigError, match="BPEConfig"):
        BPETokenizer.build(CORPUS, {"vocab_size": 300})


def test_empty_corpus_and_bad_texts():
    for texts in ([], ["", ""], iter([])):
        with pytest.raises(DataError, match="empty corpus"):
            BPETokenizer.build(texts, BPEConfig())
    with pytest.raises(TypeError):
        BPETokenizer.build("a single string", BPEConfig())
    with pytest.raises(DataError, match="text 1"):
        BPETokenizer.build(["ok", b"bytes"], BPEConfig())
    with pytest.raises(DataError, match="text 1 .*surrogate"):
        BPETokenizer.build(["ok", "bad \ud800"], BPEConfig())


# --------------------------------------------------------------------- layout
def test_specials_bytes_and_vocab_size(tok):
    assert tok.tokens[:4] == SPECIAL_TOKENS == ("<pad>", "<unk>", "<bos>", "<eos>")
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, UNK_ID, BOS_ID, EOS_ID] == [0, 1, 2, 3]
    assert tok.tokens[4:260] == BYTE_ALPHABET
    assert BYTE_ALPHABET == tuple(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    assert tok.vocab_size == len(tok.tokens) == 400 == 260 + len(tok.merges)
    assert tok.token_id("no such token") == UNK_ID
    for a, b in tok.merges:  # merges are in the order their results got ids
        assert tok.token_id(a + b) >= 260


def test_vocab_size_is_an_upper_bound():
    assert BPETokenizer.build(CORPUS, BPEConfig(vocab_size=260)).vocab_size == 260
    small = BPETokenizer.build(["abc abc"], BPEConfig(vocab_size=8192, min_frequency=1))
    assert 260 < small.vocab_size < 8192  # merges run out before the bound
    big = BPETokenizer.build(CORPUS, BPEConfig(vocab_size=333))
    assert big.vocab_size == 333


def test_min_frequency():
    # The pre-token "ab" occurs once: its pair is merged only with min_frequency=1.
    assert BPETokenizer.build(["ab"], BPEConfig(min_frequency=2)).vocab_size == 260
    once = BPETokenizer.build(["ab"], BPEConfig(min_frequency=1))
    assert once.merges == (("a", "b"),) and once.encode("ab") == [260]
    assert BPETokenizer.build(["ab ab"], BPEConfig(min_frequency=2)).encode("ab") == [260]


# --------------------------------------------------------------------- round trip
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_and_no_unk(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert UNK_ID not in ids and PAD_ID not in ids and BOS_ID not in ids and EOS_ID not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == text
    assert "".join(tok.split(text)) == "".join(tok.tokens[i] for i in ids)


def test_encode_many_matches_encode(tok):
    out = tok.encode_many(ROUND_TRIP + CORPUS)
    assert len(out) == len(ROUND_TRIP) + len(CORPUS)
    for text, arr in zip(ROUND_TRIP + CORPUS, out):
        assert arr.dtype == np.int32 and arr.ndim == 1
        assert arr.tolist() == tok.encode(text)
        assert tok.decode(arr) == text
    assert tok.encode_many([]) == []
    assert tok.encode_many(iter(["a b"]))[0].tolist() == tok.encode("a b")


def test_corpus_compresses_and_round_trips(tok):
    n_bytes = sum(len(t.encode("utf-8")) for t in CORPUS)
    n_ids = sum(len(a) for a in tok.encode_many(CORPUS))
    assert n_ids < n_bytes / 2  # merges learned from the corpus shorten it
    assert [tok.decode(a) for a in tok.encode_many(CORPUS)] == CORPUS


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_round_trip_any_text(text):
    tok = _shared_tok()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids
    assert tok.encode_many([text])[0].tolist() == ids


_SHARED = []


def _shared_tok() -> BPETokenizer:  # hypothesis tests cannot take function-scoped fixtures cleanly
    if not _SHARED:
        _SHARED.append(BPETokenizer.build(CORPUS, BPEConfig(vocab_size=400)))
    return _SHARED[0]


def test_literal_special_text_is_plain_text(tok):
    for text in ("<eos>", "<pad>", "<unk>", "<bos>"):
        ids = tok.encode(text)
        assert len(ids) > 1 and not set(ids) & {0, 1, 2, 3}
        assert tok.decode(ids) == text


def test_bad_text_to_encode(tok):
    with pytest.raises(DataError, match="surrogate"):
        tok.encode("a\udc80b")
    with pytest.raises(DataError, match="text 1 .*surrogate"):
        tok.encode_many(["fine", "a\ud800"])
    with pytest.raises(DataError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(DataError, match="text 0"):
        tok.encode_many([3])
    with pytest.raises(TypeError):
        tok.encode_many("a single string")


def test_decode_specials_and_bad_ids(tok):
    ids = tok.encode("hi there")
    framed = [BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]
    assert tok.decode(framed) == "hi there"
    assert tok.decode(framed, skip_special=False) == "<bos>hi there<eos><pad><pad>"
    assert tok.decode([UNK_ID]) == "<unk>"  # UNK stands for text, so it is kept
    assert tok.decode(np.array(framed, np.int32)) == "hi there"
    assert tok.decode([]) == ""
    for bad in ([-1], [tok.vocab_size], [1.0], ["3"], [True]):
        with pytest.raises(DataError, match="not in the vocabulary"):
            tok.decode(bad)
    # A cut inside a multi-byte character decodes to U+FFFD instead of failing.
    one = BPETokenizer.build(["é"], BPEConfig(min_frequency=2))
    assert one.decode(one.encode("é")[:1]) == "\ufffd"


# --------------------------------------------------------------------- batches
def _reference_batch(tok, texts, max_len, add_bos, add_eos, pad_to_multiple):
    rows = []
    for t in texts:
        row = ([BOS_ID] if add_bos else []) + tok.encode(t) + ([EOS_ID] if add_eos else [])
        rows.append(row if max_len is None else row[:max_len])
    width = max((len(r) for r in rows), default=0)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids = np.full((len(rows), width), PAD_ID, np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    return ids, lengths, np.arange(width)[None, :] < lengths[:, None]


@pytest.mark.parametrize("max_len", [None, 1, 3, 8, 1000])
@pytest.mark.parametrize("add_bos,add_eos", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("pad_to_multiple", [1, 8])
def test_encode_batch_matches_reference(tok, max_len, add_bos, add_eos, pad_to_multiple):
    texts = ["def f(x):\n    return x", "", "naïve 🐍", "a", CORPUS[0]]
    b = tok.encode_batch(texts, max_len=max_len, add_bos=add_bos, add_eos=add_eos,
                         pad_to_multiple=pad_to_multiple)
    ids, lengths, mask = _reference_batch(tok, texts, max_len, add_bos, add_eos, pad_to_multiple)
    assert isinstance(b, EncodedBatch)
    assert b.ids.dtype == np.int32 and b.lengths.dtype == np.int32 and b.mask.dtype == bool
    np.testing.assert_array_equal(b.ids, ids)
    np.testing.assert_array_equal(b.lengths, lengths)
    np.testing.assert_array_equal(b.mask, mask)
    assert b.ids.shape[1] % pad_to_multiple == 0


def test_encode_batch_edge_cases(tok):
    empty = tok.encode_batch([])
    assert empty.ids.shape == (0, 0) and empty.lengths.shape == (0,)
    for kw in ({"max_len": 0}, {"max_len": -1}, {"pad_to_multiple": 0}, {"max_len": 2.0}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            tok.encode_batch(["x"], **kw)


# --------------------------------------------------------------------- determinism
def test_two_builds_equal(tok):
    again = BPETokenizer.build(CORPUS, BPEConfig(vocab_size=400))
    assert again == tok and hash(again) == hash(tok)
    assert again.fingerprint() == tok.fingerprint()
    other = BPETokenizer.build(CORPUS, BPEConfig(vocab_size=401))
    assert other != tok and other.fingerprint() != tok.fingerprint()


@pytest.mark.parametrize("min_frequency", [1, 2])
def test_document_order_does_not_matter(min_frequency):
    # min_frequency=1 with a vocabulary larger than the merges available exhausts
    # the merges, so many are decided among pairs of equal count (ties).
    cfg = BPEConfig(vocab_size=5000, min_frequency=min_frequency)
    ref = BPETokenizer.build(CORPUS, cfg)
    for seed in range(3):
        texts = list(CORPUS)
        random.Random(seed).shuffle(texts)
        assert BPETokenizer.build(texts, cfg).fingerprint() == ref.fingerprint()
    assert BPETokenizer.build(CORPUS[::-1], cfg) == ref


@pytest.mark.parametrize("rayon_threads", [None, "1", "4"])
def test_fresh_process_same_fingerprint(tmp_path, rayon_threads):
    cfg = BPEConfig(vocab_size=5000, min_frequency=1)
    expected = BPETokenizer.build(CORPUS, cfg).fingerprint()
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    env["PYTHONHASHSEED"] = "random"
    if rayon_threads is not None:
        env["RAYON_NUM_THREADS"] = rayon_threads
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(CORPUS), encoding="utf-8")
    args = [str(corpus), "7", str(cfg.vocab_size), str(cfg.min_frequency)]
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


# --------------------------------------------------------------------- persistence
def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "sub" / "bpe.json"
    tok.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["bpe.json"]  # no temp file left
    back = BPETokenizer.load(path)
    assert back == tok and back.fingerprint() == tok.fingerprint()
    texts = ROUND_TRIP + CORPUS[:5]
    for a, b in zip(back.encode_many(texts), tok.encode_many(texts)):
        np.testing.assert_array_equal(a, b)
    assert BPETokenizer.from_json(json.loads(json.dumps(tok.to_json()))) == tok
    tok.save(path)  # overwrite in place
    assert BPETokenizer.load(path) == tok


def test_fingerprint_is_canonical_json_hash(tok):
    import hashlib
    canon = json.dumps(tok.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert tok.fingerprint() == hashlib.sha256(canon.encode("utf-8")).hexdigest()
    assert len(tok.fingerprint()) == 64


def test_hf_json_is_equivalent(tok):
    hf = tokenizers.Tokenizer.from_str(tok.hf_json())
    for text in ROUND_TRIP:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)


def _tampered(tok, **changes):
    obj = json.loads(json.dumps(tok.to_json()))
    for key, fn in changes.items():
        obj[key] = fn(obj[key])
    return obj


def test_from_json_rejects_garbage(tok):
    garbage = [
        None, 3, "text", [], {},
        {**tok.to_json(), "extra": 1},
        _tampered(tok, format=lambda _: "codex-jax-tokenizer"),
        _tampered(tok, version=lambda _: 2),
        _tampered(tok, config=lambda _: {"vocab_size": 100, "min_frequency": 2}),
        _tampered(tok, config=lambda _: {"vocab_size": 400}),
        _tampered(tok, config=lambda c: {**c, "vocab_size": 300}),  # fewer than the tokens
        _tampered(tok, config=lambda _: "config"),
        _tampered(tok, tokens=lambda _: "tokens"),
        _tampered(tok, tokens=lambda t: t[1:]),  # specials shifted
        _tampered(tok, tokens=lambda t: t[:4] + t[5:]),  # a byte token missing
        _tampered(tok, tokens=lambda t: t[:-1] + [t[-2]]),  # duplicate
        _tampered(tok, tokens=lambda t: t[:-1] + ["has space"]),  # not byte-level characters
        _tampered(tok, tokens=lambda t: t[:-1] + [""]),
        _tampered(tok, tokens=lambda t: t[:-1] + [7]),
        _tampered(tok, merges=lambda _: {"a": "b"}),
        _tampered(tok, merges=lambda m: m + [["a"]]),
        _tampered(tok, merges=lambda m: m + ["a b"]),
        _tampered(tok, merges=lambda m: m + [["a", "zzzz"]]),
        _tampered(tok, merges=lambda m: m + [["<", "eos>"]]),
        _tampered(tok, merges=lambda m: m + [m[0]]),  # duplicate merge
        _tampered(tok, merges=lambda m: m + [["q", "q"]]),  # result "qq" not in the vocabulary
    ]
    for obj in garbage:
        with pytest.raises(DataError):
            BPETokenizer.from_json(obj)
    with pytest.raises(DataError, match="not a byte-level character"):
        BPETokenizer.from_json(_tampered(tok, tokens=lambda t: t[:-1] + ["has space"]))


def test_load_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        BPETokenizer.load(tmp_path / "missing.json")
    with pytest.raises(DataError, match="not a regular file"):
        BPETokenizer.load(tmp_path)
    bad = tmp_path / "bad.json"
    for data in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"format": "codex-jax-bpe"}'):
        bad.write_bytes(data)
        with pytest.raises(DataError, match="bad.json"):
            BPETokenizer.load(bad)


# --------------------------------------------------------------------- object behaviour
def test_immutable_equal_and_picklable(tok):
    with pytest.raises(dataclasses.FrozenInstanceError):
        tok.config = BPEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        del tok.tokens
    assert pickle.loads(pickle.dumps(tok)) == tok
    assert tok != "tokenizer" and "vocab_size=400" in repr(tok)
    with pytest.raises(ConfigError):
        BPETokenizer({"vocab_size": 400}, tok.tokens, tok.merges)
    with pytest.raises(DataError):
        BPETokenizer(tok.config, "tokens", tok.merges)
