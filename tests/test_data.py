"""Tests of codex_jax.data.records: JSON Lines loading, validation messages, writing."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codex_jax.data.records import (
    CORPUS_FIELDS,
    DEMO_FIELDS,
    PREF_FIELDS,
    Corpus,
    Dataset,
    Demos,
    Prefs,
    file_sha256,
    load_corpus,
    load_dataset,
    load_demos,
    load_prefs,
    read_jsonl,
    write_jsonl,
)
from codex_jax.errors import DataError

DEMOS = [{"prompt": "def f():", "completion": "return 1"},
         {"prompt": "héllo ✓", "completion": "naïve 日本語\nsecond line\u2028x"}]


def write_lines(path, lines, *, end=b"\n"):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + end)
    return path


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False)


def test_good_files_load(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a b c"}, {"text": "d"}])
    write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    ds = load_dataset(tmp_path)
    assert isinstance(ds, Dataset) and ds.source == str(tmp_path)
    assert ds.corpus == Corpus(texts=("a b c", "d")) and len(ds.corpus) == 2
    assert ds.demos.prompts == ("def f():", "héllo ✓") and len(ds.demos) == 2
    assert ds.demos.completions[1] == DEMOS[1]["completion"]
    assert ds.prefs == Prefs(prompts=("p",), chosen=("c",), rejected=("r",)) and len(ds.prefs) == 1
    assert load_demos(tmp_path / "demos.jsonl") == ds.demos


def test_no_trailing_newline_and_crlf_are_fine(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [dumps({"text": "x"}), dumps({"text": "y"})], end=b"")
    assert load_corpus(p).texts == ("x", "y")
    p.write_bytes(b'{"text": "x"}\r\n{"text": "y"}\r\n')
    assert load_corpus(p).texts == ("x", "y")


def test_write_read_round_trip_non_ascii(tmp_path):
    path = tmp_path / "deep" / "d.jsonl"
    write_jsonl(path, DEMOS)
    raw = path.read_bytes()
    assert "日本語".encode() in raw  # ensure_ascii=False
    assert raw.endswith(b"\n") and raw.count(b"\n") == len(DEMOS)
    assert read_jsonl(path, DEMO_FIELDS) == DEMOS
    assert os.listdir(path.parent) == ["d.jsonl"]  # the temp file was renamed away
    assert len(file_sha256(path)) == 64 and file_sha256(path) != file_sha256(write_lines(tmp_path / "o", ["{}"]))
    with pytest.raises(DataError):
        write_jsonl(tmp_path / "bad.jsonl", [{"text": float("nan")}])
    with pytest.raises(DataError):
        write_jsonl(tmp_path / "bad.jsonl", ["not a dict"])
    assert not (tmp_path / "bad.jsonl").exists()


PROMPT_OK = dumps({"prompt": "p", "completion": "c"})


@pytest.mark.parametrize("bad_line,field,expect", [
    (b"not json", None, "invalid JSON"),
    (b'{"prompt": "p", "completion": "c"', None, "invalid JSON"),
    (b'["p", "c"]', None, "got array"),
    (b'"text"', None, "got string"),
    (b"null", None, "got null"),
    (b'{"prompt": "p"}', "completion", "missing"),
    (b'{"prompt": 3, "completion": "c"}', "prompt", "got number"),
    (b'{"prompt": "p", "completion": null}', "completion", "got null"),
    (b'{"prompt": ["p"], "completion": "c"}', "prompt", "got array"),
    (b'{"prompt": true, "completion": "c"}', "prompt", "got boolean"),
    (b'{"prompt": "", "completion": "c"}', "prompt", "empty"),
    (b'{"prompt": " \\n\\t", "completion": "c"}', "prompt", "whitespace-only"),
    (b'{"prompt": "p", "completion": "c", "extra": "x"}', "extra", "unknown field"),
    (b'{"prompt": "p", "prompt": "q", "completion": "c"}', "prompt", "more than once"),
    (b'{"prompt": "\\ud800", "completion": "c"}', "prompt", "surrogate"),
    (b'{"prompt": "p\xff", "completion": "c"}', None, "invalid UTF-8"),
    (b'{"prompt": "p\x00", "completion": "c"}', None, "NUL"),
    (b"", None, "blank line"),
    (b"   ", None, "blank line"),
])
def test_malformed_line_names_file_line_field(tmp_path, bad_line, field, expect):
    path = write_lines(tmp_path / "demos.jsonl", [PROMPT_OK, PROMPT_OK, bad_line, PROMPT_OK])
    with pytest.raises(DataError) as info:
        load_demos(path)
    msg = str(info.value)
    prefix = f"{path}:3: " + (f"field '{field}': " if field else "")
    assert msg.startswith(prefix), msg
    assert expect in msg


def test_json_message_included(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [b'{"text": "a",}'])
    with pytest.raises(DataError, match=r"c\.jsonl:1: invalid JSON: Expecting property name"):
        load_corpus(path)


def test_blank_line_at_end_and_start(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [dumps({"text": "a"}), b""])  # two newlines at end
    with pytest.raises(DataError, match=r"c\.jsonl:2: blank line"):
        load_corpus(path)
    path.write_bytes(b'\n{"text": "a"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: blank line"):
        load_corpus(path)


def test_bom(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + dumps({"text": "a"}).encode() + b"\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: .*byte-order mark"):
        load_corpus(path)


def test_invalid_utf8_names_its_line(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [dumps({"text": "é"})] * 4 + [b'{"text": "\xc3("}'])
    with pytest.raises(DataError, match=r"c\.jsonl:5: invalid UTF-8"):
        load_corpus(path)


@pytest.mark.parametrize("loader,what", [
    (load_corpus, "empty corpus"), (load_demos, "no demonstrations"), (load_prefs, "no preference pairs"),
])
@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\n"])
def test_empty_files(tmp_path, loader, what, content):
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path}: no records \\(.*{what}\\)"):
        loader(path)


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not a regular file"):
        load_corpus(tmp_path)
    with pytest.raises(DataError, match=r"nodir: no such directory"):
        load_dataset(tmp_path / "nodir")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(write_lines(tmp_path / "file", ["{}"]))
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"demos\.jsonl: no such file"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        file_sha256(tmp_path / "nope")


def test_dataclasses_validate():
    with pytest.raises(DataError):
        Demos(prompts=("a", "b"), completions=("c",))
    with pytest.raises(DataError):
        Corpus(texts=["a"])
    with pytest.raises(DataError):
        Prefs(prompts=("a",), chosen=("b",), rejected=(3,))


# ------------------------------------------------------------------ properties
text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())
SCHEMAS = [CORPUS_FIELDS, DEMO_FIELDS, PREF_FIELDS]


@st.composite
def valid_file(draw):
    fields = draw(st.sampled_from(SCHEMAS))
    records = draw(st.lists(st.fixed_dictionaries({f: text for f in fields}), min_size=1, max_size=6))
    return fields, records


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=valid_file())
def test_valid_records_round_trip(tmp_path, data):
    fields, records = data
    path = tmp_path / "r.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path, fields) == records
    # Shuffled key order and no final newline change nothing.
    path.write_bytes(b"\n".join(dumps(dict(reversed(r.items()))).encode() for r in records))
    assert read_jsonl(path, fields) == records


CORRUPTIONS = ["blank", "prefix", "non_object", "drop_field", "extra_field", "non_string",
               "whitespace", "bad_utf8", "nul", "bom"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=valid_file(), kind=st.sampled_from(CORRUPTIONS), draw=st.data())
def test_corruptions_always_raise_data_error(tmp_path, data, kind, draw):
    fields, records = data
    lines = [dumps(r).encode() for r in records]
    i = draw.draw(st.integers(0, len(lines) - 1))
    rec = dict(records[i])
    field = draw.draw(st.sampled_from(fields))
    if kind == "blank":
        lines.insert(i, draw.draw(st.sampled_from([b"", b" ", b"\t"])))
    elif kind == "prefix":
        lines[i] = lines[i][: draw.draw(st.integers(0, len(lines[i]) - 1))] or b"{"
    elif kind == "non_object":
        lines[i] = dumps(draw.draw(st.one_of(st.lists(text), text, st.integers(), st.none()))).encode()
    elif kind == "drop_field":
        del rec[field]
        lines[i] = dumps(rec).encode()
    elif kind == "extra_field":
        rec[draw.draw(text.filter(lambda k: k not in fields))] = "x"
        lines[i] = dumps(rec).encode()
    elif kind == "non_string":
        rec[field] = draw.draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.none(),
                                         st.booleans(), st.lists(st.integers())))
        lines[i] = dumps(rec).encode()
    elif kind == "whitespace":
        rec[field] = draw.draw(st.text(alphabet=" \t\n\r\u3000", max_size=5))
        lines[i] = dumps(rec).encode()
    elif kind in ("bad_utf8", "nul"):
        j = draw.draw(st.integers(0, len(lines[i])))
        junk = b"\x00" if kind == "nul" else draw.draw(st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80"]))
        lines[i] = lines[i][:j] + junk + lines[i][j:]
    elif kind == "bom":
        i = 0
        lines[0] = b"\xef\xbb\xbf" + lines[0]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path, fields)
    assert str(info.value).startswith(f"{path}:{i + 1}: "), (kind, str(info.value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=valid_file(), raw=st.binary(max_size=40), pos=st.integers(0, 10_000), cut=st.integers(0, 20))
def test_arbitrary_byte_damage_never_escapes_as_other_errors(tmp_path, data, raw, pos, cut):
    fields, records = data
    blob = b"".join(dumps(r).encode() + b"\n" for r in records)
    pos %= len(blob) + 1
    path = tmp_path / "x.jsonl"
    path.write_bytes(blob[:pos] + raw + blob[pos + cut:])
    try:
        got = read_jsonl(path, fields)
    except DataError as e:
        assert str(e).startswith(str(path))
    else:  # the damage happened to leave a valid file: then it must be valid
        assert all(set(r) == set(fields) and all(v.strip() for v in r.values()) for r in got)
