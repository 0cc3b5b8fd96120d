"""The built-in task set as a run's data (``[tasks] enabled``, ``codex-jax run --tasks``).

The problems come from ``data.tasks``; their corpus / demonstrations / hard-negative
preference files are written once per task-set config into the cache and read like any
data directory.  Row i of the RL prompt pool is training problem i (demonstrations keep
file order and the task set holds nothing out by content hash), which is how the
execution reward finds a completion's tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from codex_jax.config.tasks import TasksConfig
from codex_jax.data.tasks import TASK_FILES, TaskSetConfig, generate_tasks, write_task_set
from codex_jax.errors import ConfigError


def task_set_config(cfg: TasksConfig) -> TaskSetConfig:
    """The data layer's config of the task set a run's ``[tasks]`` section names."""
    kwargs = {"problems_per_family": cfg.problems_per_family, "heldout_fraction": cfg.heldout_fraction,
              "seed": cfg.seed}
    if cfg.families:
        kwargs["families"] = cfg.families
    try:
        return TaskSetConfig(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"tasks: {err}") from None


def task_data_dir(cfg: TasksConfig, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``<cache>/tasks/<config hash>/`` holding the task set's files, written if absent."""
    ts = task_set_config(cfg)
    cache = cache_dir or os.environ.get("CODEX_JAX_CACHE") or "~/.cache/codex-jax"
    key = hashlib.sha256(json.dumps([ts.problems_per_family, ts.heldout_fraction, ts.seed, list(ts.families)])
                         .encode()).hexdigest()[:16]
    out = pathlib.Path(cache).expanduser() / "tasks" / key
    if not all((out / name).is_file() for name in TASK_FILES):
        write_task_set(out, ts)
    return out


def task_problems(cfg: TasksConfig) -> tuple[list[dict], list[dict]]:
    """(training problems in prompt-pool order, held-out problems)."""
    return generate_tasks(task_set_config(cfg))
