"""Built-in default data set, built offline from the installed Python stdlib.

Three JSON Lines files (UTF-8, one object per line) are written:

* ``corpus.jsonl`` ``{"text"}``: one record per stdlib source file.
* ``demos.jsonl`` ``{"prompt", "completion"}``: signature + docstring -> body.
* ``prefs.jsonl`` ``{"prompt", "chosen", "rejected"}``: the real body is
  preferred over a corrupted copy of it (one pair per demonstration, in
  ``demos.jsonl`` order), then over a hard negative -- an empty-ish stub or the
  body's first line alone -- for about half of the demonstrations (again in
  demonstration order, after all the corrupted pairs, so ``prefs[i]`` belongs to
  ``demos[i]`` for ``i < n_demos``).

Everything is deterministic: files are taken in sorted relative-path order, and
for the key ``f"{relative_path}:{qualname}"`` the corruption rule of a pair is
``corruptions.choose_rule(key)`` and the hard-negative rule (or none)
``corruptions.choose_hard_negative(key)`` (sha256 hashes, no RNG); the rules are
documented in ``data.corruptions``.  ``meta.json`` counts the pairs of each rule.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import sysconfig
import tempfile

from codex_jax.data.corruptions import (  # noqa: F401 - the rules belong to this data set's API
    CORRUPTIONS,
    HARD_NEGATIVE_FRACTION,
    HARD_NEGATIVES,
    UNSAFE_CALLS,
    UNSAFE_CORRUPTIONS,
    choose_hard_negative,
    choose_rule,
    corrupt,
    corrupt_with_fallback,
    hard_negative,
    hard_negative_with_fallback,
    parse_quietly,
)
from codex_jax.errors import ConfigError, DataError

DEFAULT_FILES = ("corpus.jsonl", "demos.jsonl", "prefs.jsonl")
# Bump when the output for the same stdlib changes; it is part of the cache key.
# 2: hard-negative pairs (``corruptions.HARD_NEGATIVES``) after the corrupted ones.
BUILDER_VERSION = 2
MAX_BODY_LINES = 60
MAX_PROMPT_CHARS = 2000

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_INDENT = re.compile(r"[ \t\f]*")
# Characters json.dumps leaves raw but str.splitlines() treats as line breaks.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def stdlib_root() -> pathlib.Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _candidates(root: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(relative posix path, path) of every non-excluded ``*.py``, sorted; no reads."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = pathlib.Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def _normalize(text: str) -> str:
    """Drop a BOM and normalize newlines, as Python's tokenizer does."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _iter_sources(root: pathlib.Path):
    """Yield (relative path, text) for every candidate that decodes as UTF-8."""
    for rel, path in _candidates(root):
        try:
            yield rel, _normalize(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue


def stdlib_source_files(root=None) -> list[pathlib.Path]:
    """Sorted stdlib ``*.py`` files that decode as UTF-8 (tests, site-packages excluded)."""
    root = pathlib.Path(root) if root is not None else stdlib_root()
    return [root / rel for rel, _ in _iter_sources(root)]


def _walk_defs(node: ast.AST, prefix: str):
    """Yield (qualname, def node) below node; only statements can hold defs."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            qualname = prefix + child.name
            yield qualname, child
            yield from _walk_defs(child, qualname + ".<locals>.")
        elif isinstance(child, ast.ClassDef):
            yield from _walk_defs(child, f"{prefix}{child.name}.")
        elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield from _walk_defs(child, prefix)


def _dedent(lines: list[str], indent: str) -> list[str]:
    # Strip the def line's indent; shallower lines can only be inside strings.
    out = []
    for line in lines:
        if line.startswith(indent):
            out.append(line[len(indent):])
        elif not line.strip():
            out.append("")
        else:
            out.append(line)
    return out


def _named_demos(source: str) -> list[tuple[str, dict]]:
    """(qualname, demo) pairs of ``extract_demos``."""
    source = _normalize(source)
    tree = parse_quietly(source)
    if tree is None:
        return []
    # Split on "\n" only: ast line numbers ignore \f, \v and \u2028.
    lines = source.split("\n")
    defs = sorted(_walk_defs(tree, ""), key=lambda d: (d[1].lineno, d[1].col_offset))
    out = []
    for qualname, node in defs:
        doc = node.body[0]
        if not (
            len(node.body) >= 2
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
            and node.body[1].lineno > doc.end_lineno
        ):
            continue
        indent = _INDENT.match(lines[node.lineno - 1]).group()
        head = _dedent(lines[node.lineno - 1 : doc.end_lineno], indent)
        body = _dedent(lines[doc.end_lineno : node.end_lineno], indent)
        while body and not body[0].strip():
            body.pop(0)
        prompt = "\n".join(head) + "\n"
        if len(body) > MAX_BODY_LINES or len(prompt) > MAX_PROMPT_CHARS:
            continue
        out.append((qualname, {"prompt": prompt, "completion": "\n".join(body) + "\n"}))
    return out


def extract_demos(source: str) -> list[dict]:
    """``{"prompt", "completion"}`` for every documented function, in source order.

    The prompt runs from the ``def`` line through the docstring, the completion
    is the rest of the body; both lose the def line's indentation.
    """
    return [demo for _, demo in _named_demos(source)]


def _jsonl(records: list[dict]) -> bytes:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    for raw, escaped in _LINE_BREAKS.items():
        text = text.replace(raw, escaped)
    return text.encode("utf-8")


def _publish(tmp: pathlib.Path, out: pathlib.Path, *, replace: bool) -> None:
    """Rename tmp to out; an existing out is swapped out (replace) or kept."""
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not out.exists():
            raise
    if replace:
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.rename(out, old / "data")
            os.rename(tmp, out)
        except OSError:
            if not out.exists():  # nothing else published meanwhile: surface it
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)  # lost the race: keep the existing one


def _build(out_dir, root, max_files, *, replace: bool, hard_negatives: bool = True) -> dict:
    root = pathlib.Path(root) if root is not None else stdlib_root()
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if max_files is not None and max_files < 0:
        raise ConfigError(f"max_files: must be >= 0, got {max_files}")
    corpus, demos, prefs, hard = [], [], [], []
    counts = dict.fromkeys(CORRUPTIONS, 0)
    hard_counts = dict.fromkeys(HARD_NEGATIVES, 0)
    for rel, text in _iter_sources(root):
        if max_files is not None and len(corpus) >= max_files:
            break
        if not text.strip():
            continue
        corpus.append({"text": text})
        for qualname, demo in _named_demos(text):
            key = f"{rel}:{qualname}"
            applied, rejected = corrupt_with_fallback(demo["prompt"], demo["completion"], choose_rule(key))
            counts[applied] += 1
            demos.append(demo)
            prefs.append({"prompt": demo["prompt"], "chosen": demo["completion"],
                          "rejected": rejected})
            hard_rule = choose_hard_negative(key) if hard_negatives else None
            if hard_rule is not None:
                applied, rejected = hard_negative_with_fallback(demo["prompt"], demo["completion"], hard_rule)
                hard_counts[applied] += 1
                hard.append({"prompt": demo["prompt"], "chosen": demo["completion"],
                             "rejected": rejected})
    prefs += hard
    blobs = dict(zip(DEFAULT_FILES, map(_jsonl, (corpus, demos, prefs)), strict=True))
    meta = {
        "builder_version": BUILDER_VERSION, "python_version": platform.python_version(),
        "stdlib_root": str(root), "n_files": len(corpus), "n_demos": len(demos),
        "n_prefs": len(prefs), "corruption_counts": counts,
        "n_hard_negatives": len(hard), "hard_negative_counts": hard_counts,
        "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the published dir should be normal
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def build_default_data(out_dir, *, root=None, max_files: int | None = None,
                       hard_negatives: bool = True) -> dict:
    """Write the three files and ``meta.json`` to out_dir atomically; return meta.

    ``max_files`` caps the number of (non-empty) source files used.
    ``hard_negatives=False`` leaves out the hard-negative pairs, for ablations: the
    three data files are then byte-identical to builder version 1's (meta.json is not).
    """
    return _build(out_dir, root, max_files, replace=True, hard_negatives=hard_negatives)


def _cache_key(root: pathlib.Path) -> str:
    """Python version + hash of the sources' (path, size, mtime) + builder version."""
    h = hashlib.sha256(f"{BUILDER_VERSION}\n{sys.version}\n{root}\n".encode())
    for rel, path in _candidates(root):
        st = path.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"py{platform.python_version()}-{h.hexdigest()[:16]}"


def default_data_dir(cache_dir=None, *, rebuild=False) -> pathlib.Path:
    """``<cache>/data/<key>/`` holding the default data set, built if absent.

    ``cache_dir`` defaults to ``$CODEX_JAX_CACHE`` or ``~/.cache/codex-jax``.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("CODEX_JAX_CACHE") or "~/.cache/codex-jax"
    root = stdlib_root()
    out = pathlib.Path(cache_dir).expanduser() / "data" / _cache_key(root)
    complete = all((out / n).is_file() for n in (*DEFAULT_FILES, "meta.json"))
    if rebuild or not complete:
        # A damaged entry is replaced; a concurrent complete one is kept.
        _build(out, root, None, replace=rebuild or out.exists())
    return out
