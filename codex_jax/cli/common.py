"""What every sub-command shares: the data source and JAX's compilation cache."""

from __future__ import annotations

import os
import pathlib
import sys


def cache_root() -> pathlib.Path:
    """Where the command line keeps what runs can share: $CODEX_JAX_CACHE or ~/.cache/codex-jax."""
    return pathlib.Path(os.environ.get("CODEX_JAX_CACHE", str(pathlib.Path.home() / ".cache" / "codex-jax")))


def prepared_cache_dir() -> pathlib.Path:
    """The cache of prepared data (tokenizer + encoded arrays; ``run.prepared``)."""
    return cache_root() / "prepared"


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a second run skips compiling."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def settle_gc() -> None:
    """Before a command's long work: what is alive now (modules, functions, the data) is
    moved out of the collector's reach, and young objects are collected 30x less often.
    Tracing a program makes hundreds of thousands of short-lived objects; with the
    defaults a run did ~460 collections, three of them full ones over the whole heap of
    JAX's modules (0.03-0.1 s each): 0.37 s of a 5.8 s run.  Command-line processes only;
    the library leaves the collector as its caller set it."""
    import gc

    gc.freeze()  # no collect() first: after the imports it finds nothing (and takes 0.07 s)
    gc.set_threshold(20_000, 20, 20)


def load_dataset(source: str | None, cfg=None):
    """A user's directory, the built-in default data (source None or "default"), or the
    built-in task set of ``cfg.tasks`` (source "tasks")."""
    import dataclasses

    from codex_jax.data.snapshot import load_dataset_cached

    def load(directory):  # files read and validated before come back from a snapshot
        return load_dataset_cached(directory, cache_root() / "records")

    if source == "tasks":
        from codex_jax.run.tasks import task_data_dir

        print("[    data] writing or reading the built-in task set", file=sys.stderr)
        return dataclasses.replace(load(task_data_dir(cfg.tasks)), source="tasks")
    if source is not None and source != "default":
        return dataclasses.replace(load(source), source=str(pathlib.Path(source).absolute()))
    from codex_jax.data.stdlib import default_data_dir

    print("[    data] building or reading the default data set (Python standard library)", file=sys.stderr)
    return dataclasses.replace(load(default_data_dir()), source="default")
