"""The one train-state type every stage uses.

``params`` is what the stage trains (a family's parameter pytree, or a dict of named
sub-trees such as PPO's {"policy", "value"}); ``extras`` holds the stage's other
named leaves that ride along in the compiled loop: frozen sub-trees (the reference
policy, the reward model) and controller state (the KL coefficient).  The family,
the stage config and the optax transformation are static: they select the compiled
program, they are not data.

A frozen dataclass registered with ``jax.tree_util.register_dataclass``, with
``.replace``: what ``flax.struct.dataclass`` makes (the same leaves, key paths and
order), without importing flax (0.2 s) into runs that use no flax module.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
import optax

from codex_jax.core.keys import to_device


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["params", "opt_state", "step", "skipped", "extras"],
                   meta_fields=["family", "cfg", "tx", "host_reward"])
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Any  # trained pytree
    opt_state: Any  # optax state of ``params``
    step: jax.Array  # int32 [] updates (or iterations) done
    skipped: jax.Array  # int32 [] updates skipped for non-finite gradients
    extras: dict  # named stage-specific leaves (frozen trees, controller state); {} if none
    # static (part of the treedef: they select the compiled program) -----------------
    family: Any  # a models.family.Family
    cfg: Any  # the stage's config dataclass
    tx: optax.GradientTransformation
    # host-side callables the compiled step calls through jax.pure_callback (e.g. the
    # execution reward of an RL stage); static, compared by identity; None: none
    host_reward: Any = None

    def replace(self, **updates) -> TrainState:
        """A copy with ``updates`` (the state is immutable)."""
        return dataclasses.replace(self, **updates)


def init_state(params: Any, family: Any, cfg: Any, tx: optax.GradientTransformation,
               extras: dict | None = None, host_reward: Any = None) -> TrainState:
    """A state at step 0 with a fresh optimiser state for ``params``."""
    return TrainState(params=params, opt_state=tx.init(params), step=to_device(0, np.int32),
                      skipped=to_device(0, np.int32), extras=dict(extras or {}),
                      family=family, cfg=cfg, tx=tx, host_reward=host_reward)
