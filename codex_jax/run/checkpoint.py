"""Resumable stage checkpoints with orbax.

Layout: ``OUT/checkpoints/<stage>/<step>/{state,meta}``.  ``state`` holds every array
leaf of the stage's state pytree (params, optimiser state, step, skip counters,
KL-controller state, frozen reference and reward sub-trees); ``meta`` records the leaf
names, shapes and dtypes, the stage key and the config hash.  The data order and
every step key are pure functions of (stage key, step), so step + key is the whole
data-order cursor.

orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save leaves no step that restores as valid: ``latest_step`` only sees
committed steps.  Before restoring, the recorded leaves are compared with the leaves
this run expects, so a different vocabulary size (say) is a clear error naming the
leaf, never a silent broadcast.

``save(..., block=False)`` writes in a background thread while training goes on (a
save is ~0.1 s of mostly Python work for the symbolic stages); at most one save is in
flight, the next ``save``, ``wait`` or ``close`` waits for it and re-raises its error.
This is safe because a state's arrays are immutable and never donated.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from codex_jax.errors import CodexError


class CheckpointError(CodexError):
    """A checkpoint that cannot be restored into this run's state."""


def _leaf_name(path) -> str:
    from codex_jax.run.artifacts import key_name

    # '/' would become a directory level in the on-disk format; '.' stays a name
    return ".".join(key_name(k) for k in path)


def state_leaves(state: Any) -> dict[str, Any]:
    """{name: array} of the state's dynamic leaves, in pytree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {_leaf_name(path): leaf for path, leaf in flat}


def leaf_specs(leaves: dict[str, Any]) -> dict[str, list]:
    """{name: [shape, dtype]} -- what a checkpoint must match to be restored."""
    return {name: [list(np.shape(x)), str(np.dtype(x.dtype))] for name, x in leaves.items()}


def _fault_injection(directory: pathlib.Path, save_index: int) -> str | None:
    """Test hook: ``CODEX_JAX_KILL_AT="<n>:<phase>"`` SIGKILLs this process at the n-th
    save of the process (1-based) -- phase ``before`` the write, ``during`` it (as soon
    as orbax's temporary directory appears) or ``after`` it.  Unset in normal use."""
    spec = os.environ.get("CODEX_JAX_KILL_AT")
    if not spec:
        return None
    n, _, phase = spec.partition(":")
    if int(n) != save_index:
        return None
    if phase == "during":
        def watch():
            while True:
                if any("tmp" in p.name for p in directory.glob("*")):
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.0005)

        threading.Thread(target=watch, daemon=True).start()
    elif phase == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    return phase


class StageCheckpointer:
    """Saves and restores one stage's state under ``root/<stage>``."""

    def __init__(self, root: str | pathlib.Path, stage: str, *, keep: int = 2):
        self.directory = pathlib.Path(root).absolute() / stage
        self.stage = stage
        self.keep = keep
        self._manager = None  # made on first use: see ``manager``
        self._made = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None  # background saves (block=False)
        self._pending: Future | None = None

    @property
    def manager(self):
        """The orbax manager, made on first use.  Importing orbax takes ~0.6 s; a fresh
        run first needs it in its first background save, where the import overlaps
        training instead of delaying it."""
        with self._made:
            if self._manager is None:
                import orbax.checkpoint as ocp

                logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save at INFO
                self._ocp = ocp
                options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=False,
                                                       create=True)
                self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                      item_names=("state", "meta"))
            return self._manager

    def latest_step(self) -> int | None:
        self.wait()
        if self._manager is None and not self.directory.exists():
            return None  # nothing saved yet (and no orbax import just to learn that)
        return self.manager.latest_step()

    saves = 0  # saves in this process, for the fault-injection hook

    def save(self, step: int, state: Any, meta: dict, *, block: bool = True) -> None:
        """Writes ``state`` as ``step``; ``block=False`` returns at once (see the module note)."""
        self.wait()  # steps are committed in order, one at a time
        StageCheckpointer.saves += 1
        save_index = StageCheckpointer.saves
        if block:
            self._write(step, state, meta, save_index)
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ckpt-{self.stage}")
        self._pending = self._writer.submit(self._write, step, state, meta, save_index)

    def _write(self, step: int, state: Any, meta: dict, save_index: int) -> None:
        manager = self.manager
        ocp = self._ocp
        phase = _fault_injection(self.directory, save_index)
        leaves = state_leaves(state)
        meta = {**meta, "stage": self.stage, "step": int(step), "leaves": leaf_specs(leaves)}
        manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)), force=True)
        if phase is not None:  # "after" (or a "during" watcher that lost the race)
            os.kill(os.getpid(), signal.SIGKILL)

    def wait(self) -> None:
        """Until the save in flight (if any) is committed; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def read_meta(self, step: int) -> dict:
        self.wait()
        manager, ocp = self.manager, self._ocp
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, target: Any, expect: dict | None = None) -> Any:
        """Restores ``step`` into the structure of ``target`` (a freshly initialised
        state); ``expect`` entries (e.g. config hash, key data) must match the meta."""
        where = f"{self.directory / str(step)}"
        meta = self.read_meta(step)
        ocp = self._ocp
        for name, value in (expect or {}).items():
            if meta.get(name) != value:
                raise CheckpointError(f"{where}: {name} differs from this run "
                                      f"(checkpoint {meta.get(name)!r}, run {value!r})")
        want = leaf_specs(state_leaves(target))
        have = meta.get("leaves", {})
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            raise CheckpointError(f"{where}: structure differs from this run's state "
                                  f"(missing {missing[:5]}, unexpected {extra[:5]})")
        for name, (shape, dtype) in want.items():
            if [list(have[name][0]), have[name][1]] != [shape, dtype]:
                raise CheckpointError(f"{where}: leaf {name} has shape {tuple(have[name][0])} dtype "
                                      f"{have[name][1]}, this run expects shape {tuple(shape)} dtype {dtype}")
        # the target's shardings, not the saved ones: a state saved on 4 devices
        # restores onto 1 (and back), laid out as this run places it
        targets = state_leaves(target)
        abstract = {n: jax.ShapeDtypeStruct(tuple(s), np.dtype(d), sharding=getattr(targets[n], "sharding", None))
                    for n, (s, d) in want.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
        treedef = jax.tree_util.tree_structure(target)
        return jax.tree_util.tree_unflatten(treedef, [restored[n] for n in want])

    def load_leaves(self, step: int) -> dict[str, np.ndarray]:
        """Every saved leaf of ``step`` as {name: array}, without a target state."""
        specs = self.read_meta(step)["leaves"]
        ocp = self._ocp
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever mesh saved it
        abstract = {n: jax.ShapeDtypeStruct(tuple(s), np.dtype(d), sharding=one) for n, (s, d) in specs.items()}
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        return {n: np.asarray(state[n]) for n in specs}

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
            if self._manager is not None:
                self._manager.close()
