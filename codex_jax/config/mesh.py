"""Device-mesh specs (``--mesh data=N,model=M``) and the flags that recreate one."""

from __future__ import annotations

import re

from codex_jax.errors import ConfigError

MESH_AXES = ("data", "model")
_MESH_PART = re.compile(r"^\s*(data|model)\s*=\s*([0-9]+)\s*$")


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=4"`` or ``"data=2,model=2"`` -> {"data": 2, "model": 2} (missing axes = 1)."""
    sizes: dict[str, int] = {}
    for part in str(spec).split(","):
        m = _MESH_PART.match(part)
        if m is None:
            raise ConfigError(f"--mesh {spec!r}: each part must be data=N or model=M (N, M >= 1), got {part!r}")
        name, size = m.group(1), int(m.group(2))
        if name in sizes:
            raise ConfigError(f"--mesh {spec!r}: axis {name!r} given twice")
        if size < 1:
            raise ConfigError(f"--mesh {spec!r}: axis {name!r} must have size >= 1, got {size}")
        sizes[name] = size
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def mesh_flags(mesh: dict | None) -> list[str]:
    """CLI flags that recreate a recorded mesh (manifest "mesh"); [] for one device."""
    if not mesh:
        return []
    flags = ["--mesh", f"data={int(mesh.get('data', 1))},model={int(mesh.get('model', 1))}"]
    return flags + (["--fsdp"] if mesh.get("fsdp") else [])
