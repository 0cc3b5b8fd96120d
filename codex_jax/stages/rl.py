"""What every on-policy RL stage (PPO, GRPO, RLOO) shares as a stage of the table:
its prompt pool, its starting trees (policy = M1, reference, reward model, safety
penalty) and its report (the objective terms before and after training: exact for
a family with a closed form, Monte Carlo on fixed prompts and keys otherwise).

A state of such a stage has ``params["policy"]`` and ``extras`` {"ref", "reward",
"penalty", "kl_coef"}, and its config ``response_len`` and ``reference``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.core.keys import to_device
from codex_jax.models.family import response_mask, sample_with_logprobs
from codex_jax.stages import lm
from codex_jax.stages.context import Setup, StageContext, floats, lm_datasets


def penalty_vector(vocab_size: int, unsafe_ids, penalty: float):
    """s[v] = penalty for each unsafe id, else 0.  -> f32 [V]."""
    vector = np.zeros((vocab_size,), np.float32)  # on the host: no program compiled for it
    vector[np.asarray(list(unsafe_ids), np.int64)] = penalty
    return to_device(vector)


def prompt_data(ctx: StageContext) -> dict:
    """The prompt pool (demonstration prompts) and demonstrations for the ptx term."""
    if "rl" not in ctx.cache:
        demos = lm_datasets(ctx)["demos"]
        ctx.cache["rl"] = ctx.place({"prompt": to_device(ctx.enc.prompt),
                                     "prompt_mask": to_device(ctx.enc.prompt_mask),
                                     "ptx_tokens": demos["tokens"], "ptx_mask": demos["mask"]})
    return ctx.cache["rl"]


def start_trees(ctx: StageContext, cfg: Any) -> dict:
    """policy = M1, ref = M0 or M1 (``cfg.reference``), reward = RM, penalty [V]."""
    ref = ctx.params["M0"] if cfg.reference == "pretrain" else ctx.params["M1"]
    return {"policy": ctx.params["M1"], "ref": ref, "reward": ctx.params["RM"],
            "penalty": penalty_vector(ctx.family.vocab_size, ctx.unsafe_ids, cfg.safety_penalty)}


def task_reward(state, prompt_id, prompt, prompt_mask, response, mask, last) -> jax.Array:
    """The per-token reward before penalties, f32 [B, T]: the reward model's scores and/or
    a host reward (the execution reward: completions run against their problem's tests)
    on each response's last valid token.  The host reward runs between the jitted rollout
    and the jitted update through ``jax.pure_callback``; it is a deterministic function of
    (prompt ids [B], responses [B, T]), so a seed still gives bitwise-identical runs.
    ``state.host_reward`` carries its static weights ``rm_weight`` and ``weight``."""
    fam, host = state.family, state.host_reward
    total = jnp.zeros(response.shape, jnp.float32)
    if host is None or host.rm_weight > 0:  # static: an execution-only reward skips the RM pass
        rm = fam.reward_token_scores(state.extras["reward"], prompt, prompt_mask, response, mask)
        total = rm if host is None else host.rm_weight * rm
    if host is not None:
        out = jax.ShapeDtypeStruct(prompt_id.shape, jnp.float32)
        r = jax.pure_callback(host, out, prompt_id, response, vmap_method="sequential")
        total = total + host.weight * r[:, None] * last
    return total


def exact_kl(state, policy: Any) -> dict:
    """{"exact_kl": response_len * KL(pi || pi_ref)} for families with a closed form, else {}."""
    fam, e = state.family, state.extras
    if fam.exact_objective is None:
        return {}
    terms = fam.exact_objective(policy, e["ref"], e["reward"], e["penalty"], jnp.zeros((fam.vocab_size,)),
                                state.cfg.response_len, e["kl_coef"])
    return {"exact_kl": terms["KL"]}


@jax.jit
def exact_terms(state, demo_counts: jax.Array) -> dict:
    """Exact objective terms of the state's policy (families with a closed form)."""
    e = state.extras
    return state.family.exact_objective(state.params["policy"], e["ref"], e["reward"], e["penalty"],
                                        demo_counts, state.cfg.response_len, e["kl_coef"])


@jax.jit
def sampled_objective(state, batch: dict, key: jax.Array) -> dict:
    """Monte Carlo objective terms per response on ``batch``'s prompts: L_RLHF = -mean raw
    RM score, KL = mean sampled KL(pi || ref), safety = mean penalty mass."""
    fam, e, T = state.family, state.extras, state.cfg.response_len
    policy, prompt, pmask = state.params["policy"], batch["prompt"], batch["prompt_mask"]
    response, logp = sample_with_logprobs(fam, policy, key, prompt, pmask, T, 1.0)
    mask = response_mask(response, fam.eos_id)
    ref_logp = fam.response_logprobs(e["ref"], prompt, pmask, response, 1.0)
    rm = fam.reward_token_scores(e["reward"], prompt, pmask, response, mask).sum(-1)
    return {"L_RLHF": -jnp.mean(rm), "KL": jnp.mean(((logp - ref_logp) * mask).sum(-1)),
            "safety": jnp.mean((e["penalty"][response] * mask).sum(-1))}


def objective_report(ctx: StageContext, setup_: Setup, state, select_batch) -> dict:
    """The objective terms of the start and the final policy: {"exact_before", "exact_after"}."""
    demos = lm_datasets(ctx)["demos"]
    start = setup_.extra["start"]
    if ctx.family.exact_objective is not None:
        counts = lm.count_tokens(demos["tokens"], demos["mask"], ctx.family.vocab_size)
        return {"exact_before": floats(exact_terms(start, counts)), "exact_after": floats(exact_terms(state, counts))}
    k_eval = setup_.extra["eval_key"]  # same prompts and sampling keys before and after
    batch = select_batch(state, setup_.data, jax.random.fold_in(k_eval, 0))
    out = {}
    for name, st in (("exact_before", start), ("exact_after", state)):
        out[name] = {**floats(sampled_objective(st, batch, k_eval)),
                     "L_SFT": floats(lm.evaluate(st.params["policy"], ctx.family, demos))["nll"]}
    return out


def report(ctx: StageContext, setup_: Setup, state, select_batch) -> dict:
    cfg = state.cfg
    return {"algorithm": setup_.extra["algorithm"], "reference": cfg.reference,
            "final_kl_coef": float(state.extras["kl_coef"]), "skipped_updates": int(state.skipped),
            "unsafe_token_ids": int((np.asarray(state.extras["penalty"]) > 0).sum()),
            **objective_report(ctx, setup_, state, select_batch)}


def export(state):
    return state.params["policy"]


def seed_independence(ctx: StageContext) -> str | None:
    return None  # every iteration samples responses


def update_kl_coef(cfg, kl_coef: jax.Array, kl: jax.Array) -> jax.Array:
    """Adaptive controller of Ziegler et al. (2019); fixed when kl_target is None."""
    if cfg.kl_target is None:
        return kl_coef
    error = jnp.clip(kl / cfg.kl_target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * cfg.rollouts / cfg.kl_horizon)


def finish_iteration(state, trainable: dict, opt_state, skipped: jax.Array, stats: dict, mb_metrics: dict):
    """The end of every on-policy iteration: the KL controller, the KL guard in "skip"
    mode (which drops the iteration's update without a host sync) and the metrics.
    -> (new state, metrics)."""
    cfg = state.cfg
    kl_coef = update_kl_coef(cfg, state.extras["kl_coef"], stats["kl"])
    kl_skip = jnp.asarray(False)
    if cfg.max_kl is not None and cfg.kl_guard == "skip":
        kl_skip = stats["kl"] > cfg.max_kl
        keep = lambda new, old: jnp.where(kl_skip, old, new)  # noqa: E731
        trainable = jax.tree_util.tree_map(keep, trainable, state.params)
        opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
        kl_coef = jnp.where(kl_skip, state.extras["kl_coef"], kl_coef)
    metrics = {**stats, **jax.tree_util.tree_map(jnp.mean, mb_metrics), "kl_coef": state.extras["kl_coef"],
               **exact_kl(state, state.params["policy"]),  # closed-form families: beside the estimate
               "skipped": skipped - state.skipped, "kl_skipped": kl_skip.astype(jnp.int32)}
    new = state.replace(params=trainable, opt_state=opt_state, extras={**state.extras, "kl_coef": kl_coef},
                        step=state.step + 1, skipped=skipped)
    return new, metrics


def set_kl_coef(states, values: jax.Array, ctx: StageContext):
    """Sweep setter: the (initial) KL coefficient of each stacked member.  values [G]."""
    return states.replace(extras={**states.extras, "kl_coef": values})


def set_safety_penalty(states, values: jax.Array, ctx: StageContext):
    """Sweep setter: the penalty per unsafe token of each stacked member.  values [G]."""
    base = penalty_vector(ctx.family.vocab_size, ctx.unsafe_ids, 1.0)
    return states.replace(extras={**states.extras, "penalty": values[:, None] * base[None, :]})


SWEEP_SETTERS = {"kl_coef": set_kl_coef, "safety_penalty": set_safety_penalty}
