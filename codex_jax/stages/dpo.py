"""RLHF stage (M2) by DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023): the policy
is trained directly on the reward stage's preference pairs, against a frozen reference.

    h   = [log pi(c) - log pi_ref(c)] - [log pi(r) - log pi_ref(r)]     (sequence log-probs)
    loss "sigmoid":  -log sigmoid(beta h)        "ipo":  (h - 1 / (2 beta))^2
         + l2 * 0.5 ||theta - theta_ref||^2      (optional; pulls the policy to the reference)

beta * (log pi - log pi_ref) is DPO's implicit reward.  On the unigram family with
chosen and rejected completions of equal length the log-normalisers cancel and
h = (n_c - n_r) . (theta - theta_ref): DPO is Bradley-Terry on count differences with
weights beta (theta - theta_ref), i.e. exactly the bag-of-words reward model with
l2_RM = l2 / beta^2 (``experiments/FIXED_POINTS.md``).

state: params = the policy tree; extras = {"ref": the reference tree}.
data  = the reward stage's pairs (``reward.PAIR_FIELDS``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from codex_jax.config.algorithms import DPOConfig, GRPOConfig
from codex_jax.core import kernels, keys
from codex_jax.core.optim import apply_gradients, make_optimizer
from codex_jax.core.state import TrainState, init_state
from codex_jax.models.family import Family
from codex_jax.stages import group_rl, reward, rl
from codex_jax.stages.context import Setup, StageContext, prefixed

PAIR_FIELDS = reward.PAIR_FIELDS
LOSSES = ("sigmoid", "ipo")


def init(key: jax.Array, cfg: DPOConfig, family: Family, policy, ref) -> TrainState:
    """A DPO state at step 0 from ``policy`` (usually M1).  The key is accepted for the
    common signature: the start is given, and batches are drawn by ``select_batch``."""
    del key
    return init_state(policy, family, cfg, make_optimizer(cfg.optim, cfg.steps), {"ref": ref})


def sequence_logprobs(params: Any, family: Family, prompt, prompt_mask, response, mask) -> jax.Array:
    """log pi(response | prompt) summed over valid tokens.  [B, T] -> f32 [B]."""
    logp = family.response_logprobs(params, prompt, prompt_mask, response, 1.0)
    return jnp.sum(jnp.where(mask > 0, logp, 0.0), axis=-1)


def log_ratios(params: Any, ref: Any, family: Family, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(log pi - log pi_ref) of the chosen and of the rejected completions.  -> ([B], [B]).

    The reference terms carry no gradient."""
    def ratio(side):
        args = (batch["prompt"], batch["prompt_mask"], batch[side], batch[f"{side}_mask"])
        return (sequence_logprobs(params, family, *args)
                - jax.lax.stop_gradient(sequence_logprobs(ref, family, *args)))
    return ratio("chosen"), ratio("rejected")


def pair_losses(h: jax.Array, beta: float | jax.Array, kind: str) -> jax.Array:
    """Per-pair loss of log-ratio margins h [B].  -> f32 [B]."""
    if kind == "sigmoid":
        return jax.nn.softplus(-beta * h)  # = -log sigmoid(beta h), stable for large |h|
    if kind == "ipo":
        return jnp.square(h - 0.5 / beta)
    raise ValueError(f"DPO loss must be one of {LOSSES}, got {kind!r}")


def l2_to_ref(params: Any, ref: Any) -> jax.Array:
    """0.5 ||params - ref||^2 over every leaf.  -> f32 []."""
    sq = jax.tree_util.tree_map(lambda p, r: jnp.sum(jnp.square(p.astype(jnp.float32) - r)), params, ref)
    return 0.5 * sum(jax.tree_util.tree_leaves(sq))


def pair_metrics(h: jax.Array, beta: float | jax.Array, kind: str) -> dict:
    """Mean loss, implicit-reward accuracy (ties count half) and mean implicit margin beta h."""
    correct = (h > 0).astype(jnp.float32) + 0.5 * (h == 0).astype(jnp.float32)
    return {"loss": jnp.mean(pair_losses(h, beta, kind)), "implicit_reward_accuracy": jnp.mean(correct),
            "margin": jnp.mean(beta * h)}


def loss_fn(params: Any, ref: Any, family: Family, batch: dict, cfg: DPOConfig) -> tuple[jax.Array, dict]:
    """Mean pair loss + l2 * 0.5 ||theta - theta_ref||^2 on a batch of pairs."""
    chosen, rejected = log_ratios(params, ref, family, batch)
    metrics = pair_metrics(chosen - rejected, cfg.beta, cfg.loss)
    loss = metrics["loss"]
    if cfg.l2 > 0:  # static: the L2 pass over every parameter only when asked for
        loss = loss + cfg.l2 * l2_to_ref(params, ref)
    return loss, {**metrics, "pair_loss": metrics["loss"], "loss": loss,
                  "chosen_reward": jnp.mean(cfg.beta * chosen), "rejected_reward": jnp.mean(cfg.beta * rejected)}


def select_batch(state: TrainState, data: dict, key: jax.Array) -> dict:
    """Minibatch ``state.step`` of an epoch-wise shuffle (``kernels.epoch_batch_indices``)."""
    n = data["chosen"].shape[0]
    idx = kernels.epoch_batch_indices(key, state.step, n, min(state.cfg.batch_size, n))
    return {name: data[name][idx] for name in PAIR_FIELDS}


def step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
    """One optimiser step on a batch of pairs; pure and jit-able."""
    del key  # the loss is deterministic; batches are drawn by select_batch
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, state.extras["ref"], state.family, batch,
                                                    state.cfg)
    params, opt_state, ok = apply_gradients(state.tx, state.params, state.opt_state, grads)
    skipped = 1 - ok.astype(jnp.int32)
    new = state.replace(params=params, opt_state=opt_state, step=state.step + 1, skipped=state.skipped + skipped)
    return new, {**metrics, "skipped": skipped}


@functools.partial(jax.jit, static_argnames=("family", "loss", "chunk"))
def evaluate(params: Any, ref: Any, family: Family, data: dict, beta: float | jax.Array,
             loss: str = "sigmoid", chunk: int = 256) -> dict:
    """{"loss", "implicit_reward_accuracy", "margin"} of ``params`` on every pair of ``data``
    (in chunks of ``chunk`` pairs, so a transformer never holds all pairs' activations)."""
    pairs = {name: data[name] for name in PAIR_FIELDS}

    def margins(batch):
        chosen, rejected = log_ratios(params, ref, family, batch)
        return chosen - rejected

    return pair_metrics(kernels.chunked_map(margins, pairs, chunk), beta, loss)


# --------------------------------------------------------------------------- the stage in the table
SHOW = ("loss", "implicit_reward_accuracy")
SWEEP_SETTERS: dict = {}  # only the learning rate is a dynamic leaf (beta, l2 are static config)


def setup(ctx: StageContext, key: jax.Array) -> Setup:
    """Policy = M1, reference = M0 or M1 (``cfg.reference``); the pairs split as the RM's."""
    cfg = ctx.cfg.dpo
    k_split, k_init, k_train, k_eval = keys.split(key, 4)
    train, held = reward.split_pairs(ctx.enc.pairs, k_split, cfg.heldout_fraction)
    ref = ctx.params["M0"] if cfg.reference == "pretrain" else ctx.params["M1"]
    start = init(k_init, cfg, ctx.family, ctx.params["M1"], ref)
    return Setup(start, ctx.place(keys.to_device(train)), k_train, cfg.steps,
                 cfg.log_every, extra={"heldout": held, "start": start, "eval_key": k_eval})


def rl_view(ctx: StageContext, state: TrainState) -> TrainState:
    """The DPO policy as the state of an on-policy RL stage (``group_rl``), so the
    pipeline's objective terms are measured for it exactly as for any M2: against the
    trained RM with the safety penalty of ``ctx.unsafe_ids``, responses of
    ``ppo.response_len`` tokens, and kl_coef = beta (pi* of the RM at beta is where DPO
    lands on the unigram; FIXED_POINTS.md, section 8)."""
    pairs = max(1, ctx.cfg.ppo.rollouts // 2)  # Monte Carlo terms on ~ppo.rollouts responses, 2 per prompt
    rl_cfg = GRPOConfig(response_len=ctx.cfg.ppo.response_len, kl_coef=state.cfg.beta, reference=state.cfg.reference,
                        safety_penalty=ctx.cfg.ppo.safety_penalty, iterations=1, rollouts=2 * pairs, group_size=2,
                        minibatches=1)
    penalty = rl.penalty_vector(ctx.family.vocab_size, ctx.unsafe_ids, rl_cfg.safety_penalty)
    return group_rl.init(rl_cfg, ctx.family, state.params, state.extras["ref"], ctx.params["RM"], penalty)


def report(ctx: StageContext, setup_: Setup, state: TrainState) -> dict:
    """Pair metrics on the train and held-out pairs, before (the start) and after, and the
    pipeline's objective terms ("exact_before" / "exact_after", see ``rl_view``)."""
    cfg, ref, fam = state.cfg, state.extras["ref"], ctx.family
    sets = {"train": setup_.data}
    if setup_.extra["heldout"]["chosen"].shape[0]:
        sets["heldout"] = ctx.place(keys.to_device(setup_.extra["heldout"]))
    out = {"algorithm": "dpo", "reference": cfg.reference, "skipped_updates": int(state.skipped),
           "train_pairs": int(setup_.data["chosen"].shape[0]),
           "heldout_pairs": int(setup_.extra["heldout"]["chosen"].shape[0])}
    for name, pairs in sets.items():
        for when, params in (("before", setup_.extra["start"].params), ("after", state.params)):
            out.update(prefixed(f"{name}_{when}_", evaluate(params, ref, fam, pairs, cfg.beta, cfg.loss)))
    start_view = rl_view(ctx, setup_.extra["start"])
    view_setup = Setup(start_view, rl.prompt_data(ctx), setup_.key, 0, 1,
                       extra={"start": start_view, "eval_key": setup_.extra["eval_key"]})
    return {**out, **rl.objective_report(ctx, view_setup, rl_view(ctx, state), group_rl.select_batch)}


def export(state: TrainState):
    return state.params


def seed_independence(ctx: StageContext) -> str | None:
    cfg, n = ctx.cfg.dpo, ctx.enc.pairs["chosen"].shape[0]
    if int(n * cfg.heldout_fraction) > 0 or cfg.batch_size < n:
        return None
    return "full batch"  # starts from M1 (its init key is unused) and sees every pair each step
