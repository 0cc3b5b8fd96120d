"""The one train-state type every stage uses.

``params`` is what the stage trains (a family's parameter pytree, or a dict of named
sub-trees such as PPO's {"policy", "value"}); ``extras`` holds the stage's other
named leaves that ride along in the compiled loop: frozen sub-trees (the reference
policy, the reward model) and controller state (the KL coefficient).  The family,
the stage config and the optax transformation are static: they select the compiled
program, they are not data.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from flax import struct

from codex_jax.core.keys import to_device


@struct.dataclass
class TrainState:
    params: Any  # trained pytree
    opt_state: Any  # optax state of ``params``
    step: jax.Array  # int32 [] updates (or iterations) done
    skipped: jax.Array  # int32 [] updates skipped for non-finite gradients
    extras: dict  # named stage-specific leaves (frozen trees, controller state); {} if none
    family: Any = struct.field(pytree_node=False)  # a models.family.Family
    cfg: Any = struct.field(pytree_node=False)  # the stage's config dataclass
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    # host-side callables the compiled step calls through jax.pure_callback (e.g. the
    # execution reward of an RL stage); static, compared by identity; None: none
    host_reward: Any = struct.field(pytree_node=False, default=None)


def init_state(params: Any, family: Any, cfg: Any, tx: optax.GradientTransformation,
               extras: dict | None = None, host_reward: Any = None) -> TrainState:
    """A state at step 0 with a fresh optimiser state for ``params``."""
    return TrainState(params=params, opt_state=tx.init(params), step=to_device(0, np.int32),
                      skipped=to_device(0, np.int32), extras=dict(extras or {}),
                      family=family, cfg=cfg, tx=tx, host_reward=host_reward)
