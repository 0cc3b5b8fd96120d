"""Hard-negative preference pairs of the default data (data.corruptions.HARD_NEGATIVES).

They exist so that a reward model ranks a real body above an empty-ish or cut-short
one; these tests pin each rule's output, the deterministic half of the demonstrations
that get one, and their place and count in a built data set.

No reward model is trained here.  The symbolic pipeline's bag-of-words RM sums token
weights, so it already ranks every real body above these short stubs without hard
negatives (on the synthetic set below: all 60 bodies above every stub, either way), and
a planted-signal comparison would test nothing.  The effect is on the transformer RM,
which reads the last token: experiments/transformer_pipeline.py measures it.
"""

import ast
import hashlib
import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codex_jax.data import corruptions
from codex_jax.data import stdlib as dd
from codex_jax.errors import ConfigError, DataError

PROMPT = 'def f(self, path, n=0):\n    """Doc."""\n'
BODY = (
    "    total = n + 1\n"
    "    if total == 3:\n"
    "        return path\n"
    "    return total\n"
)
EXPECTED = {
    "pass_body": "    pass\n",
    "ellipsis_body": "    ...\n",
    "return_none": "    return None\n",
    "truncated_first_line": "    total = n + 1\n",
}
STUBS = ("pass_body", "ellipsis_body", "return_none")


def test_rule_tables_and_docs():
    assert set(EXPECTED) == set(dd.HARD_NEGATIVES)
    assert len(set(dd.HARD_NEGATIVES)) == len(dd.HARD_NEGATIVES)
    assert not set(dd.HARD_NEGATIVES) & set(dd.CORRUPTIONS)
    assert dd.HARD_NEGATIVE_FRACTION == 0.5
    for rule in dd.HARD_NEGATIVES:
        assert f"``{rule}``" in corruptions.__doc__


@pytest.mark.parametrize("rule", dd.HARD_NEGATIVES)
def test_each_rule_gives_its_documented_body(rule):
    out = dd.hard_negative(PROMPT, BODY, rule)
    assert out == EXPECTED[rule]
    assert corruptions.hard_negative_with_fallback(PROMPT, BODY, rule) == (rule, out)
    assert out == dd.hard_negative(PROMPT, BODY, rule)  # deterministic
    assert out != BODY and out.strip() and out.endswith("\n")
    ast.parse(PROMPT + out)


def test_indentation_follows_the_body():
    # Tabs, 2-space bodies and a leading comment: the stub goes at the first code line's
    # indentation; truncation keeps the first non-blank line, even a comment.
    tabbed = "\tx = 1\n\treturn x\n"
    assert dd.hard_negative("def g():\n\t'D.'\n", tabbed, "pass_body") == "\tpass\n"
    assert dd.hard_negative("def g():\n\t'D.'\n", tabbed, "truncated_first_line") == "\tx = 1\n"
    two = "  # why\n  y = 2\n  return y\n"
    assert dd.hard_negative("def g():\n  'D.'\n", two, "return_none") == "  return None\n"
    assert dd.hard_negative("def g():\n  'D.'\n", two, "truncated_first_line") == "  # why\n"
    # A body that does not parse still gets the first code line's indentation.
    broken = "        x = (\n        y ==\n"
    assert dd.hard_negative("not a def", broken, "ellipsis_body") == "        ...\n"
    assert dd.hard_negative("not a def", broken, "truncated_first_line") == "        x = (\n"


def test_fallbacks():
    order = dd.HARD_NEGATIVES

    def applied(body, rule):
        return corruptions.hard_negative_with_fallback(PROMPT, body, rule)

    # A stub equal to the body (also up to trailing whitespace) moves to the next rule.
    assert applied("    pass\n", "pass_body") == ("ellipsis_body", "    ...\n")
    assert applied("    pass  \n", "pass_body") == ("ellipsis_body", "    ...\n")
    assert applied("    ...\n", "ellipsis_body") == ("return_none", "    return None\n")
    # One line: nothing to truncate, so cyclically back to the first rule ...
    assert applied("    return x\n", "truncated_first_line") == (order[0], "    pass\n")
    # ... and on, past a stub equal to the body.
    assert applied("    return None\n", "return_none") == ("pass_body", "    pass\n")
    assert applied("    pass\n", "truncated_first_line") == ("ellipsis_body", "    ...\n")
    # Blank lines do not count as lines.
    assert applied("\n    return x\n\n", "truncated_first_line")[0] == order[0]


def test_errors():
    with pytest.raises(ConfigError):
        dd.hard_negative(PROMPT, BODY, "no_such_rule")
    with pytest.raises(ConfigError):
        dd.hard_negative(PROMPT, BODY, "truncate")  # a corruption rule, not a hard negative
    with pytest.raises(DataError):
        dd.hard_negative(PROMPT, " \n", "pass_body")


STATEMENTS = st.sampled_from([
    "x = n + 1", "return x", "return None", "pass", "...", "# note",
    "if n == 1:\n    return path", "for i in range(n):\n    x -= i", "return (x,\n        y)",
])


@settings(max_examples=60, deadline=None)
@given(st.lists(STATEMENTS, min_size=1, max_size=5), st.sampled_from(dd.HARD_NEGATIVES),
       st.sampled_from(["    ", "\t", "  "]))
def test_property_every_result_differs(stmts, rule, indent):
    if all(s == "# note" for s in stmts):
        stmts = [*stmts, "pass"]
    body = "".join(indent + s.replace("\n", "\n" + indent) + "\n" for s in stmts)
    prompt = f'def f(path, n):\n{indent}"""Doc."""\n'
    name, out = corruptions.hard_negative_with_fallback(prompt, body, rule)
    assert out == dd.hard_negative(prompt, body, rule)
    assert name in dd.HARD_NEGATIVES and out.rstrip() != body.rstrip() and out.endswith("\n")
    if name in STUBS:
        assert out == indent + EXPECTED[name].lstrip()
        ast.parse(prompt + out)
    else:
        assert out == body.split("\n")[0] + "\n" and body.count("\n") > 1


def test_choice_is_a_deterministic_hash_of_the_key():
    keys = [f"pkg/mod{i}.py:Cls.f{i % 7}" for i in range(4000)]
    got = [dd.choose_hard_negative(k) for k in keys]
    assert got == [dd.choose_hard_negative(k) for k in keys]
    for k, g in zip(keys[:50], got[:50]):
        digest = hashlib.sha256(("hard_negative:" + k).encode()).digest()
        slot = int.from_bytes(digest[:8], "big") % (2 * len(dd.HARD_NEGATIVES))
        assert g == (dd.HARD_NEGATIVES[slot] if slot < len(dd.HARD_NEGATIVES) else None)
    # About half get one, spread over the rules (about an eighth each) ...
    assert 0.45 < sum(g is not None for g in got) / len(keys) < 0.55
    for rule in dd.HARD_NEGATIVES:
        assert 0.09 < got.count(rule) / len(keys) < 0.16
    # ... independently of the corruption rule of the same key (the hash is salted).
    rules = [dd.choose_rule(k) for k in keys]
    for rule in dd.CORRUPTIONS:
        picked = [g is not None for g, r in zip(got, rules) if r == rule]
        assert 0.38 < sum(picked) / len(picked) < 0.62, rule


# ------------------------------------------------------------------- build


def _function(i: int) -> str:
    """A documented function whose body shape cycles through 1, 2 and 4 statements."""
    bodies = [
        f"    return x + {i}\n",
        f"    y = x * {i}\n    return y - x\n",
        f"    y = x - {i}\n    if y > 0:\n        return y\n    z = [y, x]\n    return len(z)\n",
    ]
    return f'def f{i}(x):\n    """Function {i}."""\n{bodies[i % 3]}\n\n'


def _synthetic_root(root: pathlib.Path, n: int = 60) -> dict[str, str]:
    """Two source files of n documented functions in all (plus an undocumented one)."""
    files = {
        "alpha.py": "".join(_function(i) for i in range(n // 2)) + "def bare(x):\n    return x\n",
        "pkg/beta.py": "".join(_function(i) for i in range(n // 2, n)),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return files


def _records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_adds_the_expected_hard_negative_pairs(tmp_path):
    root = tmp_path / "lib"
    files = _synthetic_root(root)
    meta = dd.build_default_data(tmp_path / "out", root=root)
    demos, prefs = _records(tmp_path / "out" / "demos.jsonl"), _records(tmp_path / "out" / "prefs.jsonl")
    assert meta["n_demos"] == len(demos) == 60

    # The expected pairs, recomputed from the documented rule: key = "relative path:qualname".
    expected = []
    for rel in sorted(files):
        for qualname, demo in dd._named_demos(files[rel]):
            rule = dd.choose_hard_negative(f"{rel}:{qualname}")
            if rule is not None:
                expected.append((demo, *corruptions.hard_negative_with_fallback(
                    demo["prompt"], demo["completion"], rule)))
    assert 15 < len(expected) < 45  # about half of 60
    assert meta["n_hard_negatives"] == len(expected)
    assert meta["n_prefs"] == len(prefs) == len(demos) + len(expected)
    assert list(meta["hard_negative_counts"]) == list(dd.HARD_NEGATIVES)
    assert meta["hard_negative_counts"] == {r: sum(e[1] == r for e in expected) for r in dd.HARD_NEGATIVES}
    assert sum(meta["corruption_counts"].values()) == len(demos)

    # Corrupted pairs first, aligned with the demonstrations; then the hard negatives in order.
    for d, p in zip(demos, prefs[: len(demos)], strict=True):
        assert (p["prompt"], p["chosen"]) == (d["prompt"], d["completion"])
    for (demo, _, rejected), p in zip(expected, prefs[len(demos):], strict=True):
        assert p == {"prompt": demo["prompt"], "chosen": demo["completion"], "rejected": rejected}
        assert p["rejected"] != p["chosen"]
        if p["rejected"].strip() in ("pass", "...", "return None"):
            ast.parse(p["prompt"] + p["rejected"])

    # Deterministic, and the ablation leaves exactly the hard negatives out.
    assert dd.build_default_data(tmp_path / "again", root=root) == meta
    plain = dd.build_default_data(tmp_path / "plain", root=root, hard_negatives=False)
    assert plain["n_hard_negatives"] == 0 and plain["n_prefs"] == len(demos)
    assert _records(tmp_path / "plain" / "prefs.jsonl") == prefs[: len(demos)]
    for name in ("corpus.jsonl", "demos.jsonl"):
        assert plain["sha256"][name] == meta["sha256"][name]


def test_builder_version_is_part_of_the_cache_key(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    _synthetic_root(root)
    key = dd._cache_key(root)
    monkeypatch.setattr(dd, "BUILDER_VERSION", dd.BUILDER_VERSION - 1)
    assert dd._cache_key(root) != key
    assert dd.BUILDER_VERSION >= 1

