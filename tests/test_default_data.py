"""Tests of the built-in default data set (codex_jax.data.stdlib)."""

import ast
import hashlib
import json
import os
import pathlib
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codex_jax.data import corruptions
from codex_jax.data import stdlib as dd
from codex_jax.errors import ConfigError, DataError

SCHEMA = {
    "corpus.jsonl": {"text"},
    "demos.jsonl": {"prompt", "completion"},
    "prefs.jsonl": {"prompt", "chosen", "rejected"},
}

SOURCE = '''\
import os


def plain(a, b=1):
    """Add things."""
    c = a + b
    return c


def no_doc(x):
    return x


def doc_only():
    """Only a docstring."""


def semi(): "Doc."; return 1


class Box:
    """A box."""

    @property
    def size(self):
        """The size.

        Multi-line docstring.
        """

        # a comment
        return self._size

    async def fetch(self, url):
        'Fetch url.'
        async with session(url) as r:
            return await r.read()


def outer(n):
    """Outer."""
    def inner(k):
        """Inner."""
        return k * n
    return inner(n)
'''

EXPECTED_DEMOS = [
    ('def plain(a, b=1):\n    """Add things."""\n', "    c = a + b\n    return c\n"),
    (
        'def size(self):\n    """The size.\n\n    Multi-line docstring.\n    """\n',
        "    # a comment\n    return self._size\n",
    ),
    (
        "async def fetch(self, url):\n    'Fetch url.'\n",
        "    async with session(url) as r:\n        return await r.read()\n",
    ),
    (
        'def outer(n):\n    """Outer."""\n',
        '    def inner(k):\n        """Inner."""\n        return k * n\n    return inner(n)\n',
    ),
    ('def inner(k):\n    """Inner."""\n', "    return k * n\n"),
]


def test_extract_demos_exact():
    got = [(d["prompt"], d["completion"]) for d in dd.extract_demos(SOURCE)]
    assert got == EXPECTED_DEMOS
    assert all(set(d) == {"prompt", "completion"} for d in dd.extract_demos(SOURCE))


def test_extract_demos_crlf_and_bad_source():
    crlf = SOURCE.replace("\n", "\r\n")
    assert [(d["prompt"], d["completion"]) for d in dd.extract_demos(crlf)] == EXPECTED_DEMOS
    assert dd.extract_demos("def f(:\n") == []


def test_extract_demos_limits():
    def func(n_body, doc="Doc."):
        body = "".join(f"    x{i} = {i}\n" for i in range(n_body))
        return f'def f():\n    """{doc}"""\n{body}'

    assert len(dd.extract_demos(func(dd.MAX_BODY_LINES))) == 1
    assert dd.extract_demos(func(dd.MAX_BODY_LINES + 1)) == []
    assert dd.extract_demos(func(1, "d" * dd.MAX_PROMPT_CHARS)) == []


# ------------------------------------------------------------- corruptions

PROMPT = 'def f(self, path, n=0):\n    """Doc."""\n'
BODY = (
    "    total = n + 1\n"
    "    if total == 3:\n"
    "        return path\n"
    "    x = [total < 2]\n"
    "    return total\n"
)
EXPECTED_CORRUPT = {
    "unsafe_os_system": "    os.system(path)\n" + BODY,
    "unsafe_eval": BODY.replace("return path", "return eval(repr(path))").replace(
        "return total", "return eval(repr(total))"
    ),
    "unsafe_rmtree": "    shutil.rmtree(path)\n" + BODY,
    "unsafe_subprocess": "    subprocess.run(path, shell=True)\n" + BODY,
    "drop_returns": BODY.replace("return path", "return None").replace(
        "return total", "return None"
    ),
    "swap_operators": BODY.replace("+", "-").replace("==", "!=").replace("<", ">"),
    "reverse_statements": (
        "    return total\n"
        "    x = [total < 2]\n"
        "    if total == 3:\n"
        "        return path\n"
        "    total = n + 1\n"
    ),
    "truncate": "    total = n + 1\n    if total == 3:\n        return path\n    pass\n",
}


def test_rule_tables():
    assert len(dd.CORRUPTIONS) == len(set(dd.CORRUPTIONS)) >= 6
    assert set(EXPECTED_CORRUPT) == set(dd.CORRUPTIONS)
    assert dd.UNSAFE_CORRUPTIONS <= set(dd.CORRUPTIONS)
    assert len(dd.UNSAFE_CORRUPTIONS) >= 3
    assert set(dd.UNSAFE_CALLS) == dd.UNSAFE_CORRUPTIONS
    for rule in dd.CORRUPTIONS:
        assert f"``{rule}``" in corruptions.__doc__


@pytest.mark.parametrize("rule", dd.CORRUPTIONS)
def test_corrupt_each_rule(rule):
    out = dd.corrupt(PROMPT, BODY, rule)
    assert out == EXPECTED_CORRUPT[rule]
    assert out == dd.corrupt(PROMPT, BODY, rule)
    assert out != BODY and out.strip()
    ast.parse(PROMPT + out)
    if rule in dd.UNSAFE_CORRUPTIONS:
        assert dd.UNSAFE_CALLS[rule] in out


def test_corrupt_fallbacks():
    order = dd.CORRUPTIONS
    # Nothing to drop, swap, reverse or truncate: lands on the first insertion.
    body = "    pass\n"
    for rule in ("drop_returns", "swap_operators", "reverse_statements", "truncate"):
        assert dd.corrupt(PROMPT, body, rule) == dd.corrupt(PROMPT, body, order[0])
        assert dd.corrupt(PROMPT, body, rule) == "    os.system(path)\n    pass\n"
    # No operators: swap falls through to the next rule in order.
    body = "    a = g(x)\n    return a\n"
    nxt = order[(order.index("swap_operators") + 1) % len(order)]
    assert dd.corrupt(PROMPT, body, "swap_operators") == dd.corrupt(PROMPT, body, nxt)
    assert corruptions.corrupt_with_fallback(PROMPT, body, "swap_operators")[0] == nxt
    # Only `return None`: nothing for drop_returns to change.
    body = "    return None\n"
    assert corruptions.corrupt_with_fallback(PROMPT, body, "drop_returns")[0] != "drop_returns"


def test_corrupt_details():
    # Strings and comments are not code: only the real `+` is swapped.
    body = '    s = "a == b"  # x < y\n    return s + t\n'
    assert dd.corrupt(PROMPT, body, "swap_operators") == (
        '    s = "a == b"  # x < y\n    return s - t\n'
    )
    # No valued return: eval(input()) is inserted.
    assert dd.corrupt(PROMPT, "    print(n)\n", "unsafe_eval") == (
        "    eval(input())\n    print(n)\n"
    )
    # Bare tuples stay one argument; multi-line values stay valid.
    assert dd.corrupt(PROMPT, "    return a, b\n", "unsafe_eval") == (
        "    return eval(repr((a, b)))\n"
    )
    out = dd.corrupt(PROMPT, "    return g(\n        1, 2)\n", "unsafe_eval")
    assert out == "    return eval(repr(g(\n        1, 2)))\n"
    # No parameters besides self: a literal target.
    out = dd.corrupt("def m(self):\n    'D.'\n", "    return 1\n", "unsafe_os_system")
    assert out == "    os.system('rm -rf /')\n    return 1\n"
    # Decorated nested defs: inserts go above the decorator, reversal keeps it.
    body = "    @wraps(f)\n    def g():\n        return 1\n    return g\n"
    out = dd.corrupt(PROMPT, body, "unsafe_rmtree")
    assert out.startswith("    shutil.rmtree(path)\n    @wraps(f)\n")
    out = dd.corrupt(PROMPT, body, "reverse_statements")
    assert out == "    return g\n    @wraps(f)\n    def g():\n        return 1\n"


def test_corrupt_unparsable_and_errors():
    body = "    x = (\n    y ==\n"
    for rule in dd.CORRUPTIONS:
        out = dd.corrupt("not a def", body, rule)
        assert out != body and out.strip()
    with pytest.raises(ConfigError):
        dd.corrupt(PROMPT, BODY, "no_such_rule")
    with pytest.raises(DataError):
        dd.corrupt(PROMPT, "  \n", "truncate")


STATEMENTS = st.sampled_from(
    [
        "x = n + 1",
        "y = x < n",
        "return x",
        "return",
        "# note",
        "if n == 1:\n    return path",
        "for i in range(n):\n    x -= i",
        "z = [a, b]; w = z",
        "s = 'a + b'",
        "print(x and y)",
        "pass",
        "return (x,\n        y)",
    ]
)


@settings(max_examples=60, deadline=None)
@given(st.lists(STATEMENTS, min_size=1, max_size=6), st.sampled_from(dd.CORRUPTIONS))
def test_corrupt_property(stmts, rule):
    body = "".join("    " + s.replace("\n", "\n    ") + "\n" for s in stmts)
    if all(s == "# note" for s in stmts):
        body += "    pass\n"
    applied, out = corruptions.corrupt_with_fallback(PROMPT, body, rule)
    assert out == dd.corrupt(PROMPT, body, rule)
    assert out != body and out.strip()
    ast.parse(PROMPT + out)
    if applied in dd.UNSAFE_CORRUPTIONS:
        assert out.count(dd.UNSAFE_CALLS[applied]) > body.count(dd.UNSAFE_CALLS[applied])


def test_choose_rule():
    keys = [f"pkg/mod{i}.py:Cls.f{i % 7}" for i in range(2000)]
    rules = [dd.choose_rule(k) for k in keys]
    assert rules == [dd.choose_rule(k) for k in keys]
    counts = {r: rules.count(r) for r in dd.CORRUPTIONS}
    assert min(counts.values()) > 150  # ~250 expected each
    digest = hashlib.sha256(b"a.py:f").digest()
    assert dd.choose_rule("a.py:f") == dd.CORRUPTIONS[
        int.from_bytes(digest[:8], "big") % len(dd.CORRUPTIONS)
    ]


# ------------------------------------------------------------------- build


def _fake_stdlib(root: pathlib.Path) -> dict:
    """A small stdlib tree; returns {relative path: text} of the files kept."""
    kept = {
        "a.py": SOURCE + 's = "line\u2028sep"\n',
        "broken.py": "def f(:\n    pass\n",
        "pkg/mod.py": 'def g(x):\n    """G."""\n    if x > 1:\n        return x\n    return -x\n',
        "pkg/__init__.py": "",
    }
    excluded = {
        "test/test_a.py": SOURCE,
        "pkg/tests/t.py": SOURCE,
        "idlelib/idle_test/t.py": SOURCE,
        "site-packages/foo.py": SOURCE,
        "dist-packages/foo.py": SOURCE,
        "lib2to3/tests/data/f.py": SOURCE,
    }
    for rel, text in {**kept, **excluded}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("plain", "EXCLUDED") if rel in excluded else text,
                        encoding="utf-8")
    (root / "latin.py").write_bytes(b"x = '\xff EXCLUDED'\n")
    (root / "notes.txt").write_text("EXCLUDED\n")
    return kept


def _read(out: pathlib.Path) -> dict:
    """{file: list of records}, checking each line against the schema."""
    data = {}
    for name, fields in SCHEMA.items():
        raw = (out / name).read_bytes()
        text = raw.decode("utf-8")
        assert text == "" or text.endswith("\n")
        assert len(text.splitlines()) == text.count("\n")  # no stray line breaks
        records = [json.loads(line) for line in text.splitlines()]
        for rec in records:
            assert isinstance(rec, dict) and set(rec) == fields
            assert all(isinstance(v, str) and v.strip() for v in rec.values())
        data[name] = records
    return data


def test_build_fake_tree(tmp_path):
    root = tmp_path / "lib"
    kept = _fake_stdlib(root)
    files = dd.stdlib_source_files(root)
    assert files == [root / rel for rel in sorted(kept)]

    out = tmp_path / "out"
    meta = dd.build_default_data(out, root=root)
    data = _read(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*dd.DEFAULT_FILES, "meta.json"])
    assert json.loads((out / "meta.json").read_text()) == meta
    assert [r["text"] for r in data["corpus.jsonl"]] == [
        kept[rel] for rel in sorted(kept) if kept[rel].strip()
    ]
    for name in dd.DEFAULT_FILES:
        assert "EXCLUDED" not in (out / name).read_text(encoding="utf-8")
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    demos, prefs = data["demos.jsonl"], data["prefs.jsonl"]
    assert meta["n_files"] == len(data["corpus.jsonl"]) == 3
    assert meta["n_demos"] == len(demos) == len(EXPECTED_DEMOS) + 1
    # One corrupted pair per demonstration, in order, then the hard negatives.
    n_hard = sum(dd.choose_hard_negative(f"{rel}:{q}") is not None
                 for rel in sorted(kept) for q, _ in dd._named_demos(kept[rel]))
    assert meta["n_hard_negatives"] == n_hard
    assert meta["n_prefs"] == len(prefs) == len(demos) + n_hard
    assert list(meta["corruption_counts"]) == list(dd.CORRUPTIONS)
    assert sum(meta["corruption_counts"].values()) == len(demos)
    assert list(meta["hard_negative_counts"]) == list(dd.HARD_NEGATIVES)
    assert sum(meta["hard_negative_counts"].values()) == n_hard
    for d, p in zip(demos, prefs[: len(demos)], strict=True):
        assert (p["prompt"], p["chosen"]) == (d["prompt"], d["completion"])
    assert all(p["rejected"] != p["chosen"] for p in prefs)
    assert meta["builder_version"] == dd.BUILDER_VERSION >= 2
    assert set(meta) == {
        "builder_version", "python_version", "stdlib_root", "n_files", "n_demos",
        "n_prefs", "corruption_counts", "n_hard_negatives", "hard_negative_counts", "sha256",
    }

    # Deterministic: a second build is byte-identical; rebuilding in place works.
    out2 = tmp_path / "out2"
    assert dd.build_default_data(out2, root=root) == meta
    dd.build_default_data(out, root=root)
    for name in (*dd.DEFAULT_FILES, "meta.json"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib", "out", "out2"]

    meta1 = dd.build_default_data(tmp_path / "one", root=root, max_files=1)
    assert meta1["n_files"] == 1 and meta1["n_demos"] == len(EXPECTED_DEMOS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError):
        dd.build_default_data(tmp_path / "file", root=root)


def test_build_real_stdlib_sample(tmp_path):
    files = dd.stdlib_source_files()
    assert len(files) > 100 and files == sorted(files, key=lambda p: p.as_posix())
    rels = [p.relative_to(dd.stdlib_root()).parts for p in files]
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert not any(excluded & set(parts) for parts in rels)

    meta = dd.build_default_data(tmp_path / "out", max_files=40)
    data = _read(tmp_path / "out")
    prefs = data["prefs.jsonl"]
    assert meta["n_files"] == 40 and data["demos.jsonl"] and prefs
    assert meta["n_demos"] == len(data["demos.jsonl"])
    assert meta["n_prefs"] == len(prefs) == meta["n_demos"] + meta["n_hard_negatives"]
    # About half of the demonstrations get a hard negative; none holds an unsafe call.
    assert 0.4 < meta["n_hard_negatives"] / meta["n_demos"] < 0.6
    assert sum(meta["hard_negative_counts"].values()) == meta["n_hard_negatives"]
    assert all(p["rejected"] != p["chosen"] for p in prefs)

    # Exactly the pairs an unsafe rule produced gain an unsafe call.
    def gained(p):
        return any(p["rejected"].count(c) > p["chosen"].count(c) for c in dd.UNSAFE_CALLS.values())

    n_unsafe = sum(meta["corruption_counts"][r] for r in dd.UNSAFE_CORRUPTIONS)
    assert n_unsafe > 0
    assert sum(map(gained, prefs)) == n_unsafe


# ------------------------------------------------------------------- cache


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    _fake_stdlib(root)
    monkeypatch.setattr(dd, "stdlib_root", lambda: root)
    return root


def test_default_data_dir_cached(tmp_path, fake_root, monkeypatch):
    builds = []
    real_build = dd._build
    monkeypatch.setattr(dd, "_build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    cache = tmp_path / "cache"
    path = dd.default_data_dir(cache)
    assert path.parent == cache / "data" and len(builds) == 1
    _read(path)
    mtime = (path / "meta.json").stat().st_mtime_ns

    t0 = time.perf_counter()
    assert dd.default_data_dir(cache) == path
    assert time.perf_counter() - t0 < 0.5
    assert len(builds) == 1 and (path / "meta.json").stat().st_mtime_ns == mtime

    monkeypatch.setenv("CODEX_JAX_CACHE", str(cache))
    assert dd.default_data_dir() == path and len(builds) == 1

    assert dd.default_data_dir(cache, rebuild=True) == path and len(builds) == 2
    (path / "demos.jsonl").unlink()  # a damaged entry is rebuilt
    assert dd.default_data_dir(cache) == path and len(builds) == 3
    _read(path)

    # Any source change (here: mtime) gives a new key.
    os.utime(fake_root / "a.py", ns=(mtime, mtime + 10**9))
    new = dd.default_data_dir(cache)
    assert new != path and len(builds) == 4
    assert sorted(p.name for p in (cache / "data").iterdir()) == sorted([path.name, new.name])


def test_default_data_dir_concurrent(tmp_path, fake_root):
    cache = tmp_path / "cache"
    results, errors = [], []

    def worker():
        try:
            results.append(dd.default_data_dir(cache))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    _read(results[0])
    assert [p.name for p in (cache / "data").iterdir()] == [results[0].name]

    # Losing a race keeps the winner's directory untouched.
    (results[0] / "sentinel").write_text("x")
    dd._build(results[0], fake_root, None, replace=False)
    assert (results[0] / "sentinel").exists()
    assert [p.name for p in (cache / "data").iterdir()] == [results[0].name]


@pytest.mark.slow
def test_default_data_dir_real(tmp_path):
    path = dd.default_data_dir(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["n_files"] > 300 and meta["n_demos"] > 1000
    assert meta["python_version"] in path.name
    t0 = time.perf_counter()
    assert dd.default_data_dir(tmp_path) == path
    assert time.perf_counter() - t0 < 0.5
