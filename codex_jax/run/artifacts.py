"""Parameter export and fingerprints: flat ``.npz`` files keyed by "a/b" paths, and a
sha256 over the leaves in key-path order (path, dtype, shape and bytes)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from codex_jax.data.records import atomic_write_bytes
from codex_jax.errors import DataError


def key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """{"a/b": array} in the pytree's key-path order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {"/".join(key_name(k) for k in path): np.asarray(leaf) for path, leaf in flat}


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of ``flatten_params`` for nested-dict parameters."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def fingerprint(params: Any) -> str:
    """sha256 over (key path, dtype, shape, bytes) of every leaf, in key-path order."""
    digest = hashlib.sha256()
    for name, arr in flatten_params(params).items():
        arr = np.ascontiguousarray(arr)
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def arrays_sha256(*arrays: Any) -> str:
    """sha256 of numeric arrays (dtype, shape, bytes), e.g. the encoded data."""
    digest = hashlib.sha256()
    for arr in arrays:
        arr = np.ascontiguousarray(np.asarray(arr))
        digest.update(f"{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_params(path: str | os.PathLike, params: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **flatten_params(params))
    atomic_write_bytes(path, buf.getvalue())


def load_params(path: str | os.PathLike) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: parameter file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return unflatten_params({name: npz[name] for name in npz.files})
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a parameter .npz file ({err})") from None
