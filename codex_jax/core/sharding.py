"""Running the stages on a device mesh with ``jax.sharding`` (GSPMD).

A ``Layout`` is a 2-D ``Mesh`` with axes ("data", "model") plus the parameter
placement rule.  The stage code does not change: the driver places the state and the
data on the mesh, and ``loop.run_steps`` pins, inside the compiled scan,

* every batch to ``P("data")`` on its leading (example) axis, so each device computes
  the loss and gradients of its share of the batch and XLA inserts the all-reduce;
* every state leaf to the sharding the rule gives its shape, so the carry keeps one
  layout across steps and chunks (no re-compilation, no silent re-layout).

Parameter rule, by leaf shape (optimiser moments have their parameter's shape, so
they follow it, as in ZeRO/FSDP):

* ``model=M > 1``: the last dimension divisible by M is split over "model" (the output
  features of a kernel, the vocabulary of an embedding/logit vector);
* ``fsdp=True``: the largest remaining dimension divisible by the data-axis size is
  split over "data" (ZeRO-3 / FSDP: each data-parallel device keeps a shard and XLA
  all-gathers it for the forward and backward passes);
* everything else (and everything with ``fsdp=False, model=1``) is replicated.

Data pools (corpus rows, demonstrations, pairs, prompts) are split over "data" on
their leading axis when it divides evenly, replicated otherwise; the batch gather in
``select_batch`` reads them either way, with the same values, so a run's batches do
not depend on the mesh.  Only reduction order does: float sums over a sharded batch
are added per device and then across devices, so results on different meshes agree
to rounding, and bit for bit where every partial sum is exact (token counting).

Multi-host: call ``jax.distributed.initialize()`` first (``codex-jax run
--distributed``); every process loads the same data, arrays are built with
``jax.make_array_from_callback`` so each process supplies only its own shards, and
``to_host`` gathers results for process 0 to write.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from codex_jax.config import MESH_AXES as AXES
from codex_jax.config import parse_mesh
from codex_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the parameter rule; hashable, so it is a static argument of jit."""

    mesh: Mesh
    fsdp: bool = False

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape["data"])

    @property
    def model_size(self) -> int:
        return int(self.mesh.shape["model"])

    def describe(self) -> dict:
        """What the manifest records (and the audit compares)."""
        devices = self.mesh.devices.ravel()
        return {"data": self.data_size, "model": self.model_size, "fsdp": self.fsdp,
                "devices": int(devices.size), "platform": devices[0].platform,
                "processes": int(jax.process_count())}

    # ---- rules (by shape only, so the same rule serves placement and constraints)
    def param_spec(self, shape: tuple[int, ...]) -> P:
        spec: list[str | None] = [None] * len(shape)
        if self.model_size > 1:
            for d in reversed(range(len(shape))):
                if shape[d] % self.model_size == 0:
                    spec[d] = "model"
                    break
        if self.fsdp and self.data_size > 1:
            free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % self.data_size == 0]
            if free:
                spec[max(free, key=lambda d: (shape[d], -d))] = "data"
        return P(*spec)

    def rows_spec(self, shape: tuple[int, ...]) -> P:
        if len(shape) >= 1 and shape[0] % self.data_size == 0:
            return P("data")
        return P()

    def _named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # ---- placement (host -> mesh) and constraints (inside jit)
    def place_state(self, state: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: _put(x, self._named(self.param_spec(np.shape(x)))), state)

    def place_data(self, data: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: _put(x, self._named(self.rows_spec(np.shape(x)))), data)

    def constrain_state(self, state: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(x, self._named(self.param_spec(x.shape))), state)


def shard_rows(tree: Any) -> Any:
    """Inside a stage step: split each leaf's leading (example) axis over the "data"
    axis of the mesh ``loop.run_steps`` traces under (a no-op without one, or where
    the axis does not divide).  For batches a step builds itself, e.g. PPO minibatches
    gathered from the rollouts: without it GSPMD replicates the gathered rows and every
    device would compute the whole minibatch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names or mesh.shape["data"] == 1:
        return tree
    n = mesh.shape["data"]
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, P("data")) if x.ndim and x.shape[0] % n == 0 else x, tree)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a value every process holds in full."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) and x.is_fully_addressable else x
    if isinstance(host, jax.Array):  # already global: let JAX re-lay it out
        return jax.device_put(host, sharding)
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def make_layout(spec: str | dict | None = None, *, fsdp: bool = False, devices=None) -> Layout:
    """A ``Layout`` over the first data x model devices (default: all devices on "data")."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec or {"data": len(devices), "model": 1})
    sizes = {a: int(sizes.get(a, 1)) for a in AXES}
    need = sizes["data"] * sizes["model"]
    if need > len(devices):
        raise ConfigError(f"mesh data={sizes['data']},model={sizes['model']} needs {need} devices; "
                          f"this process sees {len(devices)} ({devices[0].platform})")
    mesh = jax.make_mesh((sizes["data"], sizes["model"]), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices[:need])
    return Layout(mesh=mesh, fsdp=bool(fsdp))


def to_host(tree: Any) -> Any:
    """NumPy copies of (possibly sharded, possibly multi-host) arrays."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
