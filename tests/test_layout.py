"""The package's layering: imports flow one way, modules stay small, private names stay home.

Layers, lowest first (a module may import its own layer or a lower one):
errors -> config -> data, core -> models -> stages -> execute -> run -> cli.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "codex_jax"
LAYERS = ("errors", "config", "data", "core", "models", "stages", "execute", "run", "cli")
RANK = {"errors": 0, "config": 1, "data": 2, "core": 2, "models": 3, "stages": 4, "execute": 5, "run": 6, "cli": 7}
MAX_LINES = 400


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: pathlib.Path, known: dict) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every codex_jax import."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full, "", node.lineno) if full in known else (base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
    return [(m, n, line) for m, n, line in out if m.startswith("codex_jax")]


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_every_module_is_in_a_layer():
    assert {layer(m) for m in modules() if m != "codex_jax"} <= set(LAYERS)


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_at_most_400_lines(name):
    lines = modules()[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name}: {lines} lines > {MAX_LINES}"


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    bad = [f"{m} line {line}: {n} from {target}" for m, p in known.items()
           for target, n, line in imports(m, p, known)
           if n.startswith("_") and not n.startswith("__") and target != m]
    assert not bad, "\n".join(bad)


def test_imports_flow_down_the_layers():
    known = modules()
    bad = []
    for m, p in known.items():
        for target, _, line in imports(m, p, known):
            src, dst = layer(m), layer(target)
            if src and dst and RANK[dst] > RANK[src]:
                bad.append(f"{m} line {line} imports {target} ({src} -> {dst})")
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    known = modules()
    edges = {m: {t for t, _, _ in imports(m, p, known) if t in known and t != m and not m.startswith(t + ".")
                 and t != "codex_jax"} for m, p in known.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(known):
        if not state.get(m):
            visit(m, [])
    assert not cycles, "\n".join(cycles)


def test_the_checker_catches_a_cycle_a_long_module_and_a_private_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted package breaks each of them."""
    pkg = tmp_path / "codex_jax"
    (pkg / "core").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from codex_jax.models.b import _hidden\n" + "x = 1\n" * 401)
    (pkg / "models" / "b.py").write_text("from codex_jax.core import a\n_hidden = 1\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    with pytest.raises(AssertionError, match="_hidden"):
        test_no_private_name_is_imported_from_another_module()
    with pytest.raises(AssertionError, match="core -> models"):
        test_imports_flow_down_the_layers()
    with pytest.raises(AssertionError, match="codex_jax.core.a -> codex_jax.models.b -> codex_jax.core.a"):
        test_the_import_graph_has_no_cycle()
    with pytest.raises(AssertionError, match="> 400"):
        test_module_is_at_most_400_lines("codex_jax.core.a")
