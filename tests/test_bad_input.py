"""Bad input, tried systematically: malformed data files and configs through the CLI.

Every case runs ``codex-jax run --data D --out OUT --config C --quiet`` in-process and
must end with exit code 2, one stderr line ``codex-jax: error: ...`` that names the
file (data: ``file:line:`` and the field when one applies; configs: the field), and
no ``OUT``.  Validation precedes training, so nothing here compiles; a guard makes
any case that reaches training fail loudly.

``COUNTS`` tallies the generated cases by kind; the last test prints the tally
(``pytest -s tests/test_bad_input.py``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import math
import pathlib
import tempfile

import pytest
from conftest import DATA_FILES, FIELDS, TINY_CONFIG, TINY_RECORDS, write_config, write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codex_jax import cli
from codex_jax.run import pipeline

COUNTS: collections.Counter = collections.Counter()
INF, NAN = math.inf, math.nan

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def no_training(monkeypatch):
    """Bad input must never reach training; if it does, fail instead of compiling.
    (Held for all examples of a property test: it needs no reset between them.)"""
    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached training (run_stages)")

    monkeypatch.setattr(pipeline, "run_stages", refuse)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("bad-input")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_rejected(rc: int, out: str, err: str, *needles: str) -> str:
    """Exit 2, nothing on stdout, one stderr line ``codex-jax: error: ...`` with every needle."""
    assert rc == 2, (rc, err)
    assert out == "", out
    assert err.startswith("codex-jax: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1 and "\r" not in err, repr(err)
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def run_bad(root: pathlib.Path, data_dir, config_path, *needles: str, extra=()) -> str:
    """Runs the CLI into ``root/out``; checks the rejection and that nothing was created."""
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    rc, out, err = run_cli(["run", "--data", str(data_dir), "--out", str(root / "out"),
                            "--config", str(config_path), "--quiet", *extra])
    msg = assert_rejected(rc, out, err, *needles)
    assert not (root / "out").exists()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    return msg


# --------------------------------------------------------------------------- data: strategies
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(str.strip)
KEY = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8)
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                        st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(KEY, inner, max_size=3)), max_leaves=6)
NON_STRING = JSON_VALUE.filter(lambda v: not isinstance(v, str))
NON_OBJECT = JSON_VALUE.filter(lambda v: not isinstance(v, dict))
WHITESPACE = st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000"), max_size=4)
BLANK_LINES = st.sampled_from(["", " ", "\t", "  \t ", "\r", "\x0c", "\u3000", "\xa0 "])
INVALID_UTF8 = st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xc0\xaf", b"\xe2\x82",
                                b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf0\x9f\x98", b"\xf8\x88\x80\x80\x80"])
BAD_SYNTAX = st.sampled_from([
    "{'text': 'a'}", '{"text": "a",}', '{text: "a"}', '{"text": "a"} // note', '{"text": "a"}{"text": "b"}',
    "[", "{", '{"text" "a"}', "nul", "True", '{"text": undefined}', '{"text": "a\tb"}', '{"text": "a\\q"}',
    '"unterminated', "}", "{}}", '{"a":1 "b":2}',
])

# kind -> (expected field?, words the message must contain)
KINDS = {
    "truncated": (False, "invalid JSON"),
    "syntax": (False, "invalid JSON"),
    "wrong_type": (True, "expected a string"),
    "missing": (True, "missing"),
    "renamed": (True, "missing"),
    "extra": (True, "unknown field"),
    "empty_string": (True, "empty string"),
    "whitespace_string": (True, "whitespace-only"),
    "surrogate": (True, "surrogate"),
    "duplicate": (True, "more than once"),
    "not_object": (False, "expected a JSON object"),
    "invalid_utf8": (False, "invalid UTF-8"),
    "bom_file": (False, "byte-order mark"),
    "bom_line": (False, ""),  # line 1: the BOM message; later lines: invalid JSON
    "blank_line": (False, "blank line"),
    "nul_byte": (False, "NUL"),
    "deep_nesting": (False, "nested too deeply"),
    "huge_int": (False, "invalid JSON"),
    "long_bad": (False, "invalid JSON"),
}


def dumps(obj, ascii_: bool = True) -> str:
    return json.dumps(obj, ensure_ascii=ascii_)


@st.composite
def valid_records(draw, name: str):
    fields = FIELDS[name]
    return draw(st.lists(st.fixed_dictionaries({f: TEXT for f in fields}), min_size=1, max_size=4))


@st.composite
def defect(draw, name: str, kind: str):
    """(kind, line bytes or None for a file-level defect, field or None)."""
    fields = FIELDS[name]
    rec = draw(st.fixed_dictionaries({f: TEXT for f in fields}))
    f = draw(st.sampled_from(fields))
    ascii_ = draw(st.booleans())
    field = f if KINDS[kind][0] else None
    if kind == "truncated":
        s = dumps(rec, ascii_)
        line = s[: draw(st.integers(1, len(s) - 1))]
    elif kind == "syntax":
        line = draw(BAD_SYNTAX)
    elif kind == "wrong_type":
        rec[f] = draw(NON_STRING)
        line = dumps(rec, ascii_)
    elif kind == "missing":
        del rec[f]
        line = dumps(rec, ascii_)
    elif kind == "renamed":  # a typo'd field name: the real one is missing
        new = draw(st.sampled_from([f.upper(), f.capitalize(), f + "s", f[:-1], " " + f]))
        rec = {(new if k == f else k): v for k, v in rec.items()}
        line = dumps(rec, ascii_)
    elif kind == "extra":
        field = draw(KEY.filter(lambda k: k not in fields))
        items = list(rec.items())
        items.insert(draw(st.integers(0, len(items))), (field, draw(JSON_VALUE)))
        line = dumps(dict(items), ascii_)
    elif kind == "empty_string":
        rec[f] = ""
        line = dumps(rec, ascii_)
    elif kind == "whitespace_string":
        rec[f] = draw(WHITESPACE.filter(bool))
        line = dumps(rec, ascii_)
    elif kind == "surrogate":
        rec[f] = draw(st.sampled_from(["\ud800", "a\udfffb", "\udc80x"]))
        line = dumps(rec, True)
    elif kind == "duplicate":
        items = [f"{dumps(k)}: {dumps(v)}" for k, v in rec.items()]
        items.insert(draw(st.integers(0, len(items))), f"{dumps(f)}: {dumps(draw(JSON_VALUE))}")
        line = "{" + ", ".join(items) + "}"
    elif kind == "not_object":
        line = dumps(draw(NON_OBJECT), ascii_)
    elif kind == "invalid_utf8":
        rec[f] = "ab@@BAD@@cd"
        return kind, dumps(rec).encode().replace(b"@@BAD@@", draw(INVALID_UTF8)), None
    elif kind == "bom_file":
        return kind, None, None
    elif kind == "bom_line":
        line = "\ufeff" + dumps(rec, ascii_)
    elif kind == "blank_line":
        line = draw(BLANK_LINES)
    elif kind == "nul_byte":
        s = dumps(rec, ascii_)
        i = draw(st.integers(0, len(s)))
        line = s[:i] + "\x00" + s[i:]
    elif kind == "deep_nesting":
        depth = 50_000
        line = "{" + dumps(f) + ": " + "[" * depth + "]" * depth + "}"
    elif kind == "huge_int":
        line = "{" + dumps(f) + ": " + "9" * draw(st.integers(5_000, 20_000)) + "}"
    elif kind == "long_bad":  # a very long line that is one character short of valid
        rec[f] = rec[f] * (200_000 // len(rec[f]) + 1)
        line = dumps(rec, ascii_)[:-1]
    else:  # pragma: no cover
        raise AssertionError(kind)
    return kind, line.encode("utf-8"), field


@st.composite
def bad_dataset(draw, kind: str):
    """Three files, all valid except one ``kind`` of defect in one of them (file, position drawn)."""
    target = draw(st.sampled_from(DATA_FILES))
    files = {name: [dumps(r, draw(st.booleans())).encode() for r in draw(valid_records(name))]
             for name in DATA_FILES}
    if draw(st.booleans()):  # a very long but valid line must not be mistaken for a bad one
        where = draw(st.sampled_from(DATA_FILES))
        rec = dict(TINY_RECORDS[where][0])
        first = FIELDS[where][0]
        rec[first] = (rec[first] + " ") * 5_000
        lines = files[where]
        lines.insert(draw(st.integers(0, len(lines))), dumps(rec).encode())
    kind, line, field = draw(defect(target, kind))
    lines = files[target]
    if kind == "bom_file":
        lineno = 1
    else:
        pos = draw(st.integers(0, len(lines)))
        lines.insert(pos, line)
        lineno = pos + 1
    raw = {}
    for name, lines in files.items():
        final_newline = draw(st.booleans()) or (name == target and lines[-1] == b"")
        raw[name] = b"\n".join(lines) + (b"\n" if final_newline else b"")
    if kind == "bom_file":
        raw[target] = b"\xef\xbb\xbf" + raw[target]
    return target, kind, lineno, field, raw


# --------------------------------------------------------------------------- data: properties
@pytest.mark.parametrize("kind", sorted(KINDS))
@PROPERTY
@given(data=st.data())
def test_malformed_data_rejected(kind, data, scratch, tiny_config_path, no_training):
    target, kind, lineno, field, raw = data.draw(bad_dataset(kind))
    COUNTS[f"data:{kind}"] += 1
    COUNTS[f"data-file:{target}"] += 1
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        root = pathlib.Path(tmp)
        data_dir = write_dataset(root / "data", raw=raw)
        needles = [f"{data_dir / target}:{lineno}: ", KINDS[kind][1]]
        if field is not None:
            needles.append(f"field {field!r}")
        run_bad(root, data_dir, tiny_config_path, *needles)


@settings(PROPERTY, max_examples=60)
@given(target=st.sampled_from(DATA_FILES), content=st.sampled_from([b"", b"\n", b"\n\n", b"  \n\t\n", b" "]),
       missing=st.sampled_from([None, *DATA_FILES]))
def test_empty_or_missing_file_rejected(target, content, missing, scratch, tiny_config_path, no_training):
    COUNTS["data:empty_or_missing_file"] += 1
    what = {"corpus.jsonl": "an empty corpus", "demos.jsonl": "no demonstrations",
            "prefs.jsonl": "no preference pairs"}
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        root = pathlib.Path(tmp)
        omit = (missing,) if missing else ()
        data_dir = write_dataset(root / "data", raw={target: content}, omit=omit)
        # files are read in order corpus, demos, prefs: the first defect is reported
        order = list(DATA_FILES)
        first = min([target] + ([missing] if missing else []), key=order.index)
        if first == missing:
            run_bad(root, data_dir, tiny_config_path, f"{data_dir / missing}: no such file")
        else:
            run_bad(root, data_dir, tiny_config_path, f"{data_dir / target}: no records ({what[target]})")


# --------------------------------------------------------------------------- data: examples
@pytest.mark.parametrize("name,what", [("corpus.jsonl", "an empty corpus"), ("demos.jsonl", "no demonstrations"),
                                       ("prefs.jsonl", "no preference pairs")])
def test_empty_file_named(tmp_path, tiny_config_path, no_training, name, what):
    data_dir = write_dataset(tmp_path / "data", raw={name: b""})
    run_bad(tmp_path, data_dir, tiny_config_path, f"{name}: no records ({what})")


@pytest.mark.parametrize("name", DATA_FILES)
def test_missing_file_named(tmp_path, tiny_config_path, no_training, name):
    data_dir = write_dataset(tmp_path / "data", omit=(name,))
    run_bad(tmp_path, data_dir, tiny_config_path, f"{data_dir / name}: no such file")


def test_missing_preference_data_named(tmp_path, tiny_config_path, no_training):
    data_dir = write_dataset(tmp_path / "data", omit=("prefs.jsonl",))
    msg = run_bad(tmp_path, data_dir, tiny_config_path, "prefs.jsonl")
    assert "no such file" in msg


def test_data_dir_problems(tmp_path, tiny_config_path, no_training):
    run_bad(tmp_path, tmp_path / "nope", tiny_config_path, f"{tmp_path / 'nope'}: no such directory")
    (tmp_path / "afile").write_text("x")
    run_bad(tmp_path, tmp_path / "afile", tiny_config_path, "afile: not a directory")
    data_dir = write_dataset(tmp_path / "data", omit=("demos.jsonl",))
    (data_dir / "demos.jsonl").mkdir()
    run_bad(tmp_path, data_dir, tiny_config_path, "demos.jsonl: not a regular file")
    empty = tmp_path / "empty"
    empty.mkdir()
    run_bad(tmp_path, empty, tiny_config_path, f"{empty / 'corpus.jsonl'}: no such file")


def test_first_defect_in_file_order_is_reported(tmp_path, tiny_config_path, no_training):
    data_dir = write_dataset(tmp_path / "data", raw={"demos.jsonl": b"{\n", "prefs.jsonl": b"[]\n"})
    run_bad(tmp_path, data_dir, tiny_config_path, "demos.jsonl:1: invalid JSON")


def test_crlf_and_unicode_lines_are_fine(tmp_path):
    """Not bad input: CRLF endings, U+2028 inside strings, non-ASCII text load."""
    from codex_jax.data.records import load_dataset

    recs = {"corpus.jsonl": [{"text": "naïve 日本語\u2028x"}, {"text": "b"}]}
    data_dir = write_dataset(tmp_path / "data", recs)
    crlf = (data_dir / "demos.jsonl").read_bytes().replace(b"\n", b"\r\n")
    (data_dir / "demos.jsonl").write_bytes(crlf)
    ds = load_dataset(data_dir)
    assert ds.corpus.texts[0] == "naïve 日本語\u2028x" and len(ds.demos) == len(TINY_RECORDS["demos.jsonl"])


def test_tokenizer_min_count_too_high(tmp_path, tiny_data_dir, no_training):
    """Valid data and a valid config that leave no vocabulary: rejected before output."""
    cfg = write_config(tmp_path / "c.json", {**TINY_CONFIG, "tokenizer": {"max_size": 64, "min_count": 10**6}})
    run_bad(tmp_path, tiny_data_dir, cfg, "min_count")


@pytest.mark.parametrize("line", ['{"text": "a", "x\\ny": "b"}', '{"text": "a", "text\\n": "b", "text\\n": "c"}'])
def test_key_with_newline_gives_one_line(tmp_path, tiny_config_path, no_training, line):
    data_dir = write_dataset(tmp_path / "data", raw={"corpus.jsonl": (line + "\n").encode()})
    run_bad(tmp_path, data_dir, tiny_config_path, "corpus.jsonl:1: field ")


# --------------------------------------------------------------------------- configs: strategies
INT, FLOAT, CHOICE, BOOL, TOKENS = "int", "float", "choice", "bool", "tokens"
OPTIM = {"name": (CHOICE, ("adam", "adamw", "sgd")), "lr": (FLOAT, 0.0, INF, True),
         "schedule": (CHOICE, ("constant", "cosine")), "final_lr_fraction": (FLOAT, 0.0, 1.0, False),
         "warmup_steps": (INT, 0), "weight_decay": (FLOAT, 0.0, INF, False),
         "grad_clip": (FLOAT, 0.0, INF, False)}
LM = {"mode": (CHOICE, ("exact", "gradient")), "steps": (INT, 1), "batch_size": (INT, 1),
      "smoothing": (FLOAT, 0.0, INF, False), "log_every": (INT, 1)}
GROUP_RL = {**{k: (INT, 1) for k in ("iterations", "rollouts", "response_len", "epochs", "minibatches",
                                      "kl_horizon", "log_every")},
            "group_size": (INT, 2), "kl_coef": (FLOAT, 0.0, INF, False), "kl_target": (FLOAT, 0.0, INF, True),
            "kl_estimator": (CHOICE, ("k1", "k2", "k3")), "kl_placement": (CHOICE, ("reward", "loss")),
            "reference": (CHOICE, ("pretrain", "sft")), "whiten_rewards": (BOOL,),
            "no_eos_penalty": (FLOAT, 0.0, INF, False), "temperature": (FLOAT, 0.0, INF, True),
            "safety_penalty": (FLOAT, 0.0, INF, False), "max_kl": (FLOAT, 0.0, INF, True),
            "kl_guard": (CHOICE, ("stop", "skip")), "unsafe_tokens": (TOKENS,), "clip": (FLOAT, 0.0, INF, True)}
SECTIONS = {
    "": {"seed": (INT, 0), "model": (CHOICE, ("unigram", "transformer")), "checkpoint_every": (INT, 0),
         "checkpoint_min_seconds": (FLOAT, 0.0, INF, False), "algorithm": (CHOICE, ("ppo", "grpo", "rloo", "dpo")),
         "max_consecutive_skips": (INT, 1)},
    "data": {"context_len": (INT, 2), "max_prompt_len": (INT, 2), "max_response_len": (INT, 2),
             "heldout_fraction": (FLOAT, 0.0, 0.5, False)},
    "tokenizer": {"mode": (CHOICE, ("regex", "whitespace")), "lowercase": (BOOL,), "min_count": (INT, 1),
                  "max_size": (INT, 5)},
    "pretrain": LM,
    "sft": {**LM, "mode": (CHOICE, ("gradient",))},  # the pipeline needs a gradient SFT
    "reward": {"steps": (INT, 1), "batch_size": (INT, 1), "l2": (FLOAT, 0.0, INF, False),
               "heldout_fraction": (FLOAT, 0.0, 0.5, False), "log_every": (INT, 1)},
    "ppo": {**{k: (INT, 1) for k in ("iterations", "rollouts", "response_len", "epochs", "kl_horizon",
                                      "ptx_batch_size", "log_every")},
            "minibatches": (INT, 1), "clip": (FLOAT, 0.0, INF, True), "kl_coef": (FLOAT, 0.0, INF, False),
            "kl_target": (FLOAT, 0.0, INF, True), "max_kl": (FLOAT, 0.0, INF, True),
            "reference": (CHOICE, ("pretrain", "sft")), "kl_guard": (CHOICE, ("stop", "skip")),
            "kl_estimator": (CHOICE, ("k1", "k2", "k3")), "kl_placement": (CHOICE, ("reward", "loss")),
            "gamma": (FLOAT, 0.0, 1.0, False), "gae_lambda": (FLOAT, 0.0, 1.0, False),
            "whiten_advantages": (BOOL,), "whiten_rewards": (BOOL,), "vf_coef": (FLOAT, 0.0, INF, False),
            "value_clip": (FLOAT, 0.0, INF, True), "no_eos_penalty": (FLOAT, 0.0, INF, False),
            "temperature": (FLOAT, 0.0, INF, True),
            "ptx_coef": (FLOAT, 0.0, INF, False), "safety_penalty": (FLOAT, 0.0, INF, False),
            "unsafe_tokens": (TOKENS,)},
    "transformer": {"layers": (INT, 1), "mlp_ratio": (INT, 1), "context_len": (INT, 2), "top_k": (INT, 0),
                    "top_p": (FLOAT, 0.0, 1.0, True), "positions": (CHOICE, ("rotary", "learned")),
                    "dtype": (CHOICE, ("float32", "bfloat16")), "d_model": (INT, 1), "heads": (INT, 1)},
    "bpe": {"vocab_size": (INT, 260), "min_frequency": (INT, 1)},
    "objective": {"alpha": (FLOAT, 0.0, INF, False), "beta": (FLOAT, 0.0, INF, False),
                  "gamma": (FLOAT, 0.0, INF, False)},
    "tasks": {"enabled": (BOOL,), "problems_per_family": (INT, 2), "heldout_fraction": (FLOAT, 0.0, 1.0, True),
              "seed": (INT, 0), "families": (TOKENS,), "reward": (CHOICE, ("rm", "execution", "mixed")),
              "execution_mode": (CHOICE, ("fraction", "pass")), "execution_coef": (FLOAT, 0.0, INF, False),
              "timeout": (FLOAT, 0.0, INF, True), "require_sandbox": (BOOL,), "eval_samples": (INT, 1),
              "eval_temperature": (FLOAT, 0.0, INF, True)},
    "grpo": {**GROUP_RL, "scale_rewards": (BOOL,), "length_normalise": (BOOL,)},
    "rloo": GROUP_RL,
    "dpo": {"beta": (FLOAT, 0.0, INF, True), "loss": (CHOICE, ("sigmoid", "ipo")), "l2": (FLOAT, 0.0, INF, False),
            "reference": (CHOICE, ("pretrain", "sft")), "steps": (INT, 1), "batch_size": (INT, 1),
            "heldout_fraction": (FLOAT, 0.0, 0.5, False), "log_every": (INT, 1)},
    **{f"{s}.optim": OPTIM for s in ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo")},
}
OPTIONAL = {("ppo", "kl_target"), ("ppo", "max_kl"), ("grpo", "kl_target"), ("grpo", "max_kl"),
            ("rloo", "kl_target"), ("rloo", "max_kl"), ("rloo", "clip")}  # None is valid there

def test_sections_cover_every_config_field():
    """The property tests below give every leaf field of PipelineConfig a bad value."""
    import dataclasses
    import typing

    from codex_jax.config import PipelineConfig

    def leaves(cls, prefix: str) -> set:
        hints, out = typing.get_type_hints(cls), set()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out |= leaves(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
            else:
                out.add((prefix, f.name))
        return out

    assert leaves(PipelineConfig, "") == {(s, f) for s, names in SECTIONS.items() for f in names}


CFG_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8)
CFG_KEY = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=10)
CFG_SCALAR = st.one_of(st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True), CFG_TEXT)
CFG_LIST = st.lists(CFG_SCALAR, max_size=3)
CFG_TABLE = st.dictionaries(CFG_KEY, CFG_SCALAR, max_size=2)
NOT_NUMBER = st.one_of(st.booleans(), CFG_TEXT, CFG_LIST, CFG_TABLE)


def bad_values(spec, section: str, field: str) -> st.SearchStrategy:
    kind = spec[0]
    if kind == INT:
        minimum = spec[1]
        out = st.one_of(st.integers(-10**9, minimum - 1), st.floats(allow_nan=True), NOT_NUMBER)
        if (section, field) == ("ppo", "minibatches"):  # must divide rollouts = 8
            out = st.one_of(out, st.integers(1, 100).filter(lambda m: 8 % m))
        return out
    if kind == FLOAT:
        _, low, high, low_open = spec
        below = st.floats(max_value=low).filter(lambda v: v <= low if low_open else v < low)
        parts = [below, st.just(NAN), st.just(-INF), NOT_NUMBER,
                 st.integers(-10**9, int(low) if low_open else int(low) - 1)]
        if high != INF:
            parts += [st.floats(min_value=high, exclude_min=True), st.just(INF),
                      st.integers(int(high) + 1, 10**9)]
        return st.one_of(parts)
    if kind == CHOICE:
        extra = [st.just("exact")] if (section, field) == ("sft", "mode") else []
        return st.one_of(*extra, CFG_TEXT.filter(lambda v: v not in spec[1]),
                         st.sampled_from([s.upper() for s in spec[1]]), st.integers(-10**9, 10**9), st.booleans(),
                         CFG_LIST)
    if kind == BOOL:
        return st.one_of(st.integers(-2, 2), CFG_TEXT, st.floats(), CFG_LIST)
    if kind == TOKENS:
        return st.one_of(CFG_TEXT, st.integers(-10**9, 10**9), st.lists(st.just(""), min_size=1, max_size=2),
                         st.lists(st.integers(-9, 9), min_size=1, max_size=2),
                         st.tuples(CFG_TEXT.filter(bool), st.just("")).map(list))
    raise AssertionError(kind)  # pragma: no cover


def expected_repr(spec, value, optional: bool = False) -> str:
    """How the error message shows ``value`` after loading (ints become floats, lists tuples;
    from_dict leaves ints in ``float | None`` fields as they are)."""
    if spec[0] == FLOAT and not optional and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec[0] == TOKENS and isinstance(value, list):
        value = tuple(value)
    return repr(value)


def set_path(cfg: dict, section: str, key: str, value) -> dict:
    node = cfg
    for part in [p for p in section.split(".") if p]:
        node = node.setdefault(part, {})
    node[key] = value
    return cfg


CONFIG_KINDS = [*(f"bad_value:{s}:{f}" for s in sorted(SECTIONS) for f in sorted(SECTIONS[s])),
                "unknown_key", "wrong_shape", "unparseable", "top_level"]


@st.composite
def bad_config(draw, kind: str):
    """(kind, config dict or raw bytes, suffix, words the message must contain, field or None)."""
    cfg = copy.deepcopy(TINY_CONFIG)
    suffix = draw(st.sampled_from([".toml", ".json"]))
    if kind.startswith("bad_value:"):
        _, section, field = kind.split(":")
        spec = SECTIONS[section][field]
        value = draw(bad_values(spec, section, field))
        if (section, field) == ("ppo", "rollouts"):
            cfg["ppo"]["minibatches"] = 1
        set_path(cfg, section, field, value)
        needles = [field, expected_repr(spec, value, (section, field) in OPTIONAL)]
        needles += [section.split(".")[-1]] if section else []
        return f"bad_value:{spec[0]}", cfg, suffix, needles, f"{section}.{field}"
    if kind == "unknown_key":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        key = draw(CFG_KEY.filter(lambda k: k not in SECTIONS[section] and k not in SECTIONS
                                  and k not in ("optim",)))
        set_path(cfg, section, key, draw(CFG_SCALAR))
        dotted = f"{section}.{key}" if section else key
        return kind, cfg, suffix, ["unknown config key", repr(dotted)], None
    if kind == "wrong_shape":  # a scalar or list where a table belongs
        section = draw(st.sampled_from([s for s in sorted(SECTIONS) if s]))
        parent, _, leaf = section.rpartition(".")
        node = cfg
        for part in [p for p in parent.split(".") if p]:
            node = node.setdefault(part, {})
        node[leaf] = draw(st.one_of(CFG_SCALAR, CFG_LIST))
        return kind, cfg, suffix, [f"{section} must be a table/object"], None
    if kind == "unparseable":
        raw = draw(st.sampled_from({
            ".toml": [b"[sft\nsteps = 3\n", b"steps = = 3\n", b"seed = 1\nseed = 2\n", b"[sft]\nsteps = 4\n[sft]\n",
                      b"a = 'x\n", b"seed = 0x\n", b"model = \"\xff\"\n", b"= 1\n", b"sft = {steps = 4,}\n",
                      b"[ppo]\nclip = .5\n"],
            ".json": [b'{"sft": {"steps": 3,}}', b"{'seed': 1}", b"", b"{", b'{"seed": 1} x', b"\xff{}",
                      b'{"seed": 01}', b'{"seed": 1', b"nul", b"\xef\xbb\xbf{}"],
        }[suffix]))
        return kind, raw, suffix, ["cannot parse config"], None
    # top_level: valid JSON that is not an object
    raw = json.dumps(draw(st.one_of(CFG_SCALAR, CFG_LIST))).encode()
    return kind, raw, ".json", ["must be a table/object"], None


def _check_config_case(case, scratch, data_dir) -> None:
    kind, cfg, suffix, needles, field = case
    COUNTS[f"config:{kind}"] += 1
    if field:
        COUNTS[f"config-field:{field}"] += 1
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        root = pathlib.Path(tmp)
        path = root / f"config{suffix}"
        if isinstance(cfg, bytes):
            path.write_bytes(cfg)
            needles = [str(path), *needles]
        else:
            write_config(path, cfg)
        run_bad(root, data_dir, path, *needles)


@pytest.mark.parametrize("kind", [k for k in CONFIG_KINDS if k.startswith("bad_value:")])
@settings(PROPERTY, max_examples=8)
@given(data=st.data())
def test_bad_config_value_rejected(kind, data, scratch, tiny_data_dir, no_training):
    """Every field of every section: out of range, NaN/inf, wrong type, bad choice."""
    _check_config_case(data.draw(bad_config(kind)), scratch, tiny_data_dir)


@pytest.mark.parametrize("kind", [k for k in CONFIG_KINDS if not k.startswith("bad_value:")])
@settings(PROPERTY, max_examples=40)
@given(data=st.data())
def test_malformed_config_rejected(kind, data, scratch, tiny_data_dir, no_training):
    """Unknown keys (dotted path), scalars for tables, unparseable files, non-object JSON."""
    _check_config_case(data.draw(bad_config(kind)), scratch, tiny_data_dir)


# --------------------------------------------------------------------------- configs / CLI: examples
def test_missing_config_file(tmp_path, tiny_data_dir, no_training):
    run_bad(tmp_path, tiny_data_dir, tmp_path / "nope.toml", f"{tmp_path / 'nope.toml'}: config file not found")


@pytest.mark.parametrize("seed", ["-1", "-100"])
def test_negative_seed_flag(tmp_path, tiny_data_dir, tiny_config_path, no_training, seed):
    run_bad(tmp_path, tiny_data_dir, tiny_config_path, "seed", seed, extra=["--seed", seed])


def test_config_error_wins_over_data_error(tmp_path, tiny_config_path, no_training):
    """The config is read first; both bad: the config is named."""
    data_dir = write_dataset(tmp_path / "data", raw={"corpus.jsonl": b"{\n"})
    cfg = write_config(tmp_path / "c.json", {"ppo": {"clip": 0}})
    run_bad(tmp_path, data_dir, cfg, "clip")


@pytest.mark.parametrize("value", ["sft", "sft:0", "sft:-1", "sft:x", "rlhf:3", ":3", "sft:3:4", ""])
def test_bad_stop_after(tmp_path, tiny_data_dir, tiny_config_path, no_training, value):
    run_bad(tmp_path, tiny_data_dir, tiny_config_path, "--stop-after", extra=["--stop-after", value])


def test_resume_errors(tmp_path, tiny_config_path, no_training):
    rc, out, err = run_cli(["run", "--resume", str(tmp_path / "nothing"), "--quiet"])
    assert "nothing to resume" in assert_rejected(rc, out, err, str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()
    for extra in (["--config", str(tiny_config_path)], ["--seed", "3"], ["--data", str(tmp_path)]):
        rc, out, err = run_cli(["run", "--resume", str(tmp_path), *extra, "--quiet"])
        assert_rejected(rc, out, err, "--resume")


def test_resume_corrupt_run_json(tmp_path, no_training):
    (tmp_path / "run.json").write_text("{")
    rc, out, err = run_cli(["run", "--resume", str(tmp_path), "--quiet"])
    assert_rejected(rc, out, err, "run.json")


def test_seed_too_large(tmp_path, tiny_data_dir, tiny_config_path):
    run_bad(tmp_path, tiny_data_dir, tiny_config_path, "seed", extra=["--seed", str(2**63)])


def test_out_is_a_file(tmp_path, tiny_data_dir, tiny_config_path, no_training):
    (tmp_path / "out").write_text("keep me")
    rc, out, err = run_cli(["run", "--data", str(tiny_data_dir), "--out", str(tmp_path / "out"),
                            "--config", str(tiny_config_path), "--quiet"])
    assert_rejected(rc, out, err, "out")
    assert (tmp_path / "out").read_text() == "keep me"


# --------------------------------------------------------------------------- tally
def test_zz_report_counts():
    """Prints the generated cases by kind; every defect kind must have been tried."""
    if not COUNTS:
        pytest.skip("the property tests did not run in this session")
    total_data = sum(v for k, v in COUNTS.items() if k.startswith("data:"))
    total_cfg = sum(v for k, v in COUNTS.items() if k.startswith("config:"))
    print(f"\nbad-input cases: data {total_data}, config {total_cfg}")
    for key in sorted(COUNTS):
        print(f"  {key}: {COUNTS[key]}")
    fields = {k for k in COUNTS if k.startswith("config-field:")}
    every = {f"config-field:{s}.{f}" for s, names in SECTIONS.items() for f in names}
    print(f"  config fields given a bad value: {len(fields)} of {len(every)}")
    if COUNTS.get("data-file:corpus.jsonl"):
        assert all(COUNTS[f"data-file:{n}"] > 0 for n in DATA_FILES)
    if total_cfg:
        assert all(COUNTS[f"config:bad_value:{t}"] > 0 for t in (INT, FLOAT, CHOICE, BOOL, TOKENS)), COUNTS
