"""Corruption rules of the default preference pairs: a real function body is
preferred over a corrupted copy of it.

Rules, in ``CORRUPTIONS`` order; inserted lines go before the first statement at
the body's indentation, and ``<p>`` is the first parameter other than self/cls:
* ``unsafe_os_system``: insert ``os.system(<p>)``, else ``os.system('rm -rf /')``.
* ``unsafe_eval``: every ``return X`` becomes ``return eval(repr(X))``; without
  a valued return, insert ``eval(input())``.
* ``unsafe_rmtree``: insert ``shutil.rmtree(<p>)``, else ``shutil.rmtree('/')``.
* ``unsafe_subprocess``: insert ``subprocess.run(<p>, shell=True)`` (else 'rm -rf ~').
* ``drop_returns``: replace the value of every ``return X`` (X not None) by None.
* ``swap_operators``: swap the tokens ``==``/``!=``, ``<``/``>``, ``<=``/``>=``,
  ``+``/``-``, ``+=``/``-=``, ``and``/``or``, ``True``/``False`` (not in strings).
* ``reverse_statements``: reverse the top-level statements (a comment moves
  with the statement after it).
* ``truncate``: keep the first half (rounded down) of the top-level statements,
  or of the lines if the body does not parse, then ``pass``.

A rule that cannot change a body falls back to the next rule in this order
(cyclically); the order sends most fallbacks to the safe rules, and the four
insertion rules always apply, so every result differs.
``UNSAFE_CORRUPTIONS`` are the rules that add an unsafe call (``UNSAFE_CALLS``).

Hard negatives (``HARD_NEGATIVES``, :func:`hard_negative`): a second rejected body
that is empty-ish or cut short rather than garbled, so a reward model learns to rank
a real body above doing nothing; without them an RLHF policy learns that an
immediate EOS (which parses: the prompt's docstring is a valid body) out-scores its
own imperfect code.  The records format forbids a whitespace-only completion, so
"empty" is a one-statement stub at the body's indentation ``<i>`` (that of its
first code line, as for the inserted lines above):
* ``pass_body``: ``<i>pass``.
* ``ellipsis_body``: ``<i>...``.
* ``return_none``: ``<i>return None``.
* ``truncated_first_line``: only the body's first non-blank line (a comment line
  stays a comment: the result is then empty-ish too); applies to bodies with more
  than one non-blank line.
Each ends with a newline.  A rule whose result would equal the body (up to trailing
whitespace), or that does not apply, falls back to the next rule in this order
(cyclically); the three stubs are distinct, so every result differs from the body.
``choose_hard_negative(key)`` gives a hard negative to a deterministic half of the
keys (``HARD_NEGATIVE_FRACTION``): sha256 of ``"hard_negative:" + key`` modulo
``2 * len(HARD_NEGATIVES)`` picks a rule, or none when it is ``>= len(HARD_NEGATIVES)``.
The prefix keeps the choice independent of ``choose_rule``'s for the same key.
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import tokenize
import warnings

from codex_jax.errors import ConfigError, DataError

CORRUPTIONS: tuple[str, ...] = (
    "unsafe_os_system", "unsafe_eval", "unsafe_rmtree", "unsafe_subprocess",
    "drop_returns", "swap_operators", "reverse_statements", "truncate",
)
# The call each unsafe rule inserts; a rejected text contains its rule's call.
UNSAFE_CALLS: dict[str, str] = {
    "unsafe_os_system": "os.system(", "unsafe_eval": "eval(",
    "unsafe_rmtree": "shutil.rmtree(", "unsafe_subprocess": "subprocess.run(",
}
UNSAFE_CORRUPTIONS: frozenset[str] = frozenset(UNSAFE_CALLS)
HARD_NEGATIVES: tuple[str, ...] = ("pass_body", "ellipsis_body", "return_none", "truncated_first_line")
# Half the demonstrations get one: ~1/3 of all pairs, enough for the RM to see an
# empty-ish body in about every third batch row while the garbled pairs, which carry
# the safety signal, stay the majority (and the data grows by half, not double).
HARD_NEGATIVE_FRACTION = 0.5
_HARD_SLOTS = round(len(HARD_NEGATIVES) / HARD_NEGATIVE_FRACTION)
_INDENT = re.compile(r"[ \t\f]*")
_SWAPS = {
    "==": "!=", "!=": "==", "<": ">", ">": "<", "<=": ">=", ">=": "<=",
    "+": "-", "-": "+", "+=": "-=", "-=": "+=",
    "and": "or", "or": "and", "True": "False", "False": "True",
}

def parse_quietly(source: str) -> ast.Module | None:
    # Old escape sequences etc. only warn; parse failures just mean "no demos".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None


def _hash_int(text: str) -> int:
    """The first 8 bytes of sha256(text), big-endian: a choice with no RNG state."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def choose_rule(key: str) -> str:
    """The corruption rule for ``key``: sha256(key) indexes ``CORRUPTIONS``."""
    return CORRUPTIONS[_hash_int(key) % len(CORRUPTIONS)]


def choose_hard_negative(key: str) -> str | None:
    """The hard-negative rule for ``key``, or None (no hard negative): see the module docstring."""
    slot = _hash_int("hard_negative:" + key) % _HARD_SLOTS
    return HARD_NEGATIVES[slot] if slot < len(HARD_NEGATIVES) else None


class _Body:
    """A body split into lines, plus its statements when prompt + body parses."""

    def __init__(self, prompt: str, body: str):
        self.text = body
        self.lines = body.split("\n")
        self.header = prompt if prompt.endswith("\n") else prompt + "\n"
        self.func = None
        # Parse inside the real header; a bare "def" rescues odd prompts.
        for header in (self.header, "def _():\n"):
            func = _function_of(header + body, header.count("\n"))
            if func is not None:
                self.header, self.func = header, func
                break
        self.offset = self.header.count("\n") + 1  # ast line -> lines index
        self.first = self._first_line()
        self.indent = "" if self.first is None else _INDENT.match(self.lines[self.first]).group()

    @property
    def stmts(self) -> list[ast.stmt]:
        n = self.offset - 1
        return [s for s in self.func.body if s.lineno > n] if self.func else []

    def _first_line(self) -> int | None:
        if self.func is not None:
            return _start(self.stmts[0]) - self.offset
        code = [i for i, x in enumerate(self.lines) if x.strip() and not x.lstrip().startswith("#")]
        text = [i for i, x in enumerate(self.lines) if x.strip()]
        return (code or text or [None])[0]

    def span(self, node: ast.expr) -> tuple[tuple[int, int], tuple[int, int]]:
        """(lines index, char column) of node's start and end; ast columns are bytes."""
        def at(lineno, byte_col):
            i = lineno - self.offset
            return i, len(self.lines[i].encode("utf-8")[:byte_col].decode("utf-8", "ignore"))
        return at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)

    def returns(self) -> list[ast.Return]:
        nodes = (n for s in self.stmts for n in ast.walk(s))
        return [n for n in nodes if isinstance(n, ast.Return) and n.value is not None]

    def segment(self, start: tuple[int, int], end: tuple[int, int]) -> str:
        (i, c), (j, d) = start, end
        if i == j:
            return self.lines[i][c:d]
        return "\n".join([self.lines[i][c:], *self.lines[i + 1 : j], self.lines[j][:d]])

    def replace(self, spans: list[tuple[tuple[int, int], tuple[int, int], str]]) -> str:
        """Text with each ((line, col), (end line, end col), new) span replaced."""
        lines = list(self.lines)
        for (i, c), (j, d), new in sorted(spans, reverse=True):
            lines[i : j + 1] = [lines[i][:c] + new + lines[j][d:]]
        return "\n".join(lines)

    def insert(self, stmt: str) -> str:
        lines = list(self.lines)
        lines.insert(self.first, self.indent + stmt)
        return "\n".join(lines)

    def param(self) -> str | None:
        """First parameter other than self/cls, to make inserted calls look plausible."""
        if self.func is None or self.header == "def _():\n":
            return None
        a = self.func.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
        names = [n for n in names if n not in ("self", "cls")]
        return names[0] if names else None


def _start(stmt: ast.stmt) -> int:
    """First line of a statement, counting its decorators."""
    return min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", ())])


def _function_of(text: str, header_lines: int) -> ast.FunctionDef | None:
    """The single function that text defines, if its body spans past the header."""
    tree = parse_quietly(text)
    func = tree.body[0] if tree is not None and len(tree.body) == 1 else None
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    rest = [s for s in func.body if s.lineno > header_lines]
    if not rest or any(s.end_lineno > header_lines for s in func.body[: -len(rest)]):
        return None
    return func


def _inserter(template: str, default: str):
    """Rule inserting template (filled with the first parameter or default)."""
    return lambda b: b.insert(template.format(b.param() or default))


def _unsafe_eval(b: _Body) -> str:
    spans = []
    for r in b.returns():
        v = r.value
        start, end = b.span(v)
        seg = b.segment(start, end)
        # Bare tuples need their own parentheses to stay one argument of repr.
        seg = f"({seg})" if isinstance(v, ast.Tuple) else seg
        spans.append((start, end, f"eval(repr({seg}))"))
    return b.replace(spans) if spans else b.insert("eval(input())")


def _drop_returns(b: _Body) -> str | None:
    spans = [
        (*b.span(r.value), "None") for r in b.returns()
        if not (isinstance(r.value, ast.Constant) and r.value.value is None)
    ]
    return b.replace(spans) if spans else None


def _truncate(b: _Body) -> str | None:
    if b.first is None:
        return None
    if b.func is not None:
        stmts = b.stmts
        keep = stmts[len(stmts) // 2 - 1].end_lineno - b.offset + 1 if len(stmts) > 1 else 0
    else:
        n = len([x for x in b.lines if x.strip()])
        keep = [i for i, x in enumerate(b.lines) if x.strip()][n // 2 - 1] + 1 if n > 1 else 0
    tail = [""] if b.text.endswith("\n") else []
    return "\n".join(b.lines[:keep] + [b.indent + "pass"] + tail)


def _reverse_statements(b: _Body) -> str | None:
    chunks, start = [], 0
    for s in b.stmts:
        end = s.end_lineno - b.offset + 1
        if _start(s) - b.offset < start:  # shares a line with the previous one
            if not chunks:
                return None
            chunks[-1] = (chunks[-1][0], end)
        else:
            chunks.append((start, end))
        start = end
    if len(chunks) < 2:
        return None
    lines = [line for i, j in reversed(chunks) for line in b.lines[i:j]]
    return "\n".join(lines + b.lines[start:])


def _swap_operators(b: _Body) -> str | None:
    header = b.header if b.func is not None else ""
    skip = header.count("\n")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(header + b.text).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    spans = [
        ((t.start[0] - 1 - skip, t.start[1]), (t.end[0] - 1 - skip, t.end[1]), _SWAPS[t.string])
        for t in tokens
        if t.type in (tokenize.OP, tokenize.NAME) and t.string in _SWAPS and t.start[0] > skip
    ]
    return b.replace(spans) if spans else None


_RULES = {
    "unsafe_os_system": _inserter("os.system({})", repr("rm -rf /")),
    "unsafe_eval": _unsafe_eval,
    "unsafe_rmtree": _inserter("shutil.rmtree({})", repr("/")),
    "unsafe_subprocess": _inserter("subprocess.run({}, shell=True)", repr("rm -rf ~")),
    "drop_returns": _drop_returns,
    "swap_operators": _swap_operators,
    "reverse_statements": _reverse_statements,
    "truncate": _truncate,
}


def corrupt_with_fallback(prompt: str, body: str, rule: str) -> tuple[str, str]:
    """(rule actually applied, corrupted body) with the fallback of ``corrupt``."""
    if rule not in _RULES:
        raise ConfigError(f"corruption rule: unknown {rule!r}; expected one of {CORRUPTIONS}")
    if not body.strip():
        raise DataError("corrupt: body is empty")
    b = _Body(prompt, body)
    start = CORRUPTIONS.index(rule)
    for k in range(len(CORRUPTIONS)):
        name = CORRUPTIONS[(start + k) % len(CORRUPTIONS)]
        out = _RULES[name](b)
        if out is not None and out != body and out.strip():
            return name, out
    raise DataError("corrupt: no rule changes the body")  # unreachable: inserts always do


def corrupt(prompt: str, body: str, rule: str) -> str:
    """Apply one corruption rule to a function body (see the module docstring)."""
    return corrupt_with_fallback(prompt, body, rule)[1]


def _first_line_only(b: _Body) -> str | None:
    nonblank = [i for i, x in enumerate(b.lines) if x.strip()]
    return b.lines[nonblank[0]] + "\n" if len(nonblank) > 1 else None


_HARD_RULES = {
    "pass_body": lambda b: b.indent + "pass\n",
    "ellipsis_body": lambda b: b.indent + "...\n",
    "return_none": lambda b: b.indent + "return None\n",
    "truncated_first_line": _first_line_only,
}


def hard_negative_with_fallback(prompt: str, body: str, rule: str) -> tuple[str, str]:
    """(rule actually applied, hard-negative body) with the fallback of ``hard_negative``."""
    if rule not in _HARD_RULES:
        raise ConfigError(f"hard negative rule: unknown {rule!r}; expected one of {HARD_NEGATIVES}")
    if not body.strip():
        raise DataError("hard_negative: body is empty")
    b = _Body(prompt, body)
    start = HARD_NEGATIVES.index(rule)
    for k in range(len(HARD_NEGATIVES)):
        name = HARD_NEGATIVES[(start + k) % len(HARD_NEGATIVES)]
        out = _HARD_RULES[name](b)
        if out is not None and out.rstrip() != body.rstrip():
            return name, out
    raise DataError("hard_negative: no rule differs from the body")  # unreachable: 3 distinct stubs


def hard_negative(prompt: str, body: str, rule: str) -> str:
    """An empty-ish or truncated rejected body for ``body`` (see the module docstring)."""
    return hard_negative_with_fallback(prompt, body, rule)[1]
