"""The built-in code task set as the run's data, and execution rewards for RL.

``[tasks] enabled = true`` (``codex-jax run --tasks``) replaces the data directory by
the programmatically generated problems of ``data.tasks`` (training problems give the
corpus, the SFT demonstrations, hard-negative preference pairs and the RL prompt pool;
held-out problems are only evaluated), rewards the RL stage by running its completions
against each problem's tests in the sandbox (``reward``), and reports pass@k of M1 and
M2 on the held-out problems.  Family names are checked where the task set is built.
"""

from __future__ import annotations

import dataclasses

from codex_jax.config.checks import check_bool, check_choice, check_float, check_int
from codex_jax.errors import ConfigError

REWARD_SOURCES = ("rm", "execution", "mixed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TasksConfig:
    enabled: bool = False
    problems_per_family: int = 34  # training + held-out problems per family
    heldout_fraction: float = 0.2  # of each family's problems (new parameter values)
    seed: int = 0  # which parameters are held out; which hard negative each pair gets
    families: tuple[str, ...] = ()  # () = every family of data.task_families
    # RL reward: the reward model, the execution reward, or rm + execution_coef * execution
    reward: str = "execution"
    execution_mode: str = "fraction"  # "fraction" of the test's asserts passed, or "pass" (0/1)
    execution_coef: float = 1.0
    timeout: float = 3.0  # CPU seconds per program
    require_sandbox: bool = False  # refuse to run model code without bubblewrap
    eval_samples: int = 10  # completions per held-out problem for pass@k of M1 and M2
    eval_temperature: float = 0.8

    def __post_init__(self):
        check_bool(self, "enabled")
        check_int(self, "problems_per_family", minimum=2)
        check_float(self, "heldout_fraction", low=0.0, high=1.0, low_open=True)
        check_int(self, "seed", minimum=0)
        if not isinstance(self.families, tuple) or not all(isinstance(f, str) and f for f in self.families):
            raise ConfigError(f"TasksConfig.families must be a list of family names, got {self.families!r}")
        check_choice(self, "reward", REWARD_SOURCES)
        check_choice(self, "execution_mode", ("fraction", "pass"))
        check_float(self, "execution_coef", low=0.0)
        check_float(self, "timeout", low=0.0, low_open=True)
        check_bool(self, "require_sandbox")
        check_int(self, "eval_samples", minimum=1)
        check_float(self, "eval_temperature", low=0.0, low_open=True)
