"""``codex-jax sweep``: many seeds and hyperparameter settings in one compiled call per stage.

Every stage is a pure function of (state, data, key), so K members -- seeds x settings
-- train at once: the K states are stacked along a leading axis and one
``jax.jit(jax.vmap(loop.run_steps))`` runs them all (PureJaxRL-style).  Member ``i``
with seed ``s`` and settings ``x`` equals ``pipeline.run_stages`` with seed ``s`` and
``x`` written into the config (``member_config``), up to float rounding of batched
kernels (the tests check rtol 1e-5):

* keys: each member's stage keys are ``pipeline.stage_keys(s)``, split exactly as
  ``run_stages`` splits them;
* settings that vary across members are *dynamic* leaves of the stacked state, never
  static config: ``ppo.kl_coef`` is ``PPOState.kl_coef``, ``ppo.safety_penalty``
  scales ``PPOState.penalty``, and every ``*.lr`` is the base learning rate held in
  the optimiser state (``optim.set_learning_rate``);
* data are shared (``in_axes=None``), except the reward model's train / held-out
  split, which is drawn per seed as in ``run_stages`` and stacked.

A stage trains only as many distinct states as it has distinct inputs: the reward
model depends on (seed, reward.lr) only, so a sweep over 3 seeds x 4 KL coefficients
trains 3 reward models and 12 PPO policies; exact (closed-form) pretraining is
computed once.  Evaluations (per-member metrics) run one member at a time
(``lax.map``), so their memory does not scale with K; training memory does (K states,
K rollouts), which matters for ``--model transformer``.

Numerical guards are checked per member after each chunk, as ``Runner.guard`` checks a
run: a member that trips ``max_consecutive_skips`` or ``ppo.max_kl`` (``kl_guard =
"stop"``) is reported in its summary ("guard") and the others go on (``"skip"`` acts
inside the step, as in a run).  There are no checkpoints: a sweep is not resumable.

Output directory::

    OUT/sweep.json               the grid, members, mean/std over seeds of every final
                                 metric per setting, timings, config
    OUT/members/<i>/summary.json seed, settings, per-stage metrics, objective,
                                 fingerprints (as in a run's summary.json)
    OUT/curves.npz               per-step training metrics "<stage>/<name>" [K, steps],
                                 and "ppo_eval/<term>" [K, evals] (exact objective
                                 terms every ``eval_every`` PPO iterations, unigram)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from codex_jax.errors import CodexError, ConfigError

# name -> (stage it first changes, config path, help)
SETTINGS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "pretrain.lr": ("M0", ("pretrain", "optim", "lr"), "pretraining learning rate (gradient mode)"),
    "sft.lr": ("M1", ("sft", "optim", "lr"), "SFT learning rate"),
    "reward.lr": ("RM", ("reward", "optim", "lr"), "reward-model learning rate"),
    "ppo.lr": ("M2", ("ppo", "optim", "lr"), "PPO learning rate"),
    "ppo.kl_coef": ("M2", ("ppo", "kl_coef"), "(initial) KL coefficient"),
    "ppo.safety_penalty": ("M2", ("ppo", "safety_penalty"), "penalty per unsafe token"),
}
STAGES = ("M0", "M1", "RM", "M2")
# the settings each stage's result depends on (besides the seed)
DEPENDS = {
    "M0": ("pretrain.lr",),
    "M1": ("pretrain.lr", "sft.lr"),
    "RM": ("reward.lr",),
    "M2": tuple(SETTINGS),
}


# --------------------------------------------------------------------------- members
@dataclasses.dataclass(frozen=True)
class Member:
    seed: int
    settings: tuple[tuple[str, float], ...] = ()  # sorted (name, value) pairs

    @property
    def settings_dict(self) -> dict[str, float]:
        return dict(self.settings)


def grid(seeds: Sequence[int], settings: dict[str, Sequence[float]] | None = None) -> list[Member]:
    """Members of the product settings x seeds, seeds varying fastest:
    member ``j * len(seeds) + i`` has seed ``seeds[i]`` and the j-th setting."""
    settings = settings or {}
    for name in settings:
        if name not in SETTINGS:
            raise ConfigError(f"sweep: unknown setting {name!r} (one of {', '.join(SETTINGS)})")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"sweep: seeds must be distinct and at least one, got {list(seeds)}")
    names = sorted(settings)
    combos = list(itertools.product(*[[float(v) for v in settings[n]] for n in names]))
    return [Member(int(s), tuple(zip(names, combo))) for combo in combos for s in seeds]


def member_config(cfg, member: Member):
    """The single-run config this member equals: ``cfg`` with its seed and settings."""
    from codex_jax.config import PipelineConfig

    def put(obj, path, value):
        if len(path) == 1:
            return dataclasses.replace(obj, **{path[0]: value})
        return dataclasses.replace(obj, **{path[0]: put(getattr(obj, path[0]), path[1:], value)})

    out: PipelineConfig = dataclasses.replace(cfg, seed=member.seed)
    for name, value in member.settings:
        out = put(out, SETTINGS[name][1], value)
    return out


def _groups(members: list[Member], cfgs: list, stage: str) -> tuple[list[int], list[int]]:
    """Distinct inputs (seed and the settings in ``DEPENDS[stage]``) of a trained stage:
    (representative member of each group, group of each member)."""
    keys, reps, index = {}, [], []
    for i, (m, c) in enumerate(zip(members, cfgs)):
        key = (m.seed,) + tuple(_get(c, SETTINGS[n][1]) for n in DEPENDS[stage])
        if key not in keys:
            keys[key] = len(reps)
            reps.append(i)
        index.append(keys[key])
    return reps, index


def _get(obj, path):
    for p in path:
        obj = getattr(obj, p)
    return obj


# --------------------------------------------------------------------------- compiled pieces
# (JAX is imported inside functions: the CLI registers this sub-command without it)
@functools.cache
def _vmapped_run_steps():
    """``loop.run_steps`` vmapped over (state, key), data shared or stacked; jitted once."""
    import jax

    from codex_jax import loop

    @functools.partial(jax.jit, static_argnames=("step_fn", "select_fn", "num_steps", "data_axis"))
    def run(states, data, keys, *, step_fn, select_fn, num_steps, data_axis):
        one = lambda s, d, k: loop.run_steps(s, d, k, step_fn=step_fn, select_fn=select_fn,
                                             num_steps=num_steps)
        return jax.vmap(one, in_axes=(0, data_axis, 0))(states, data, keys)

    return run


@functools.cache
def _per_member():
    """``fn(x_i, shared)`` for each member i, one at a time (``lax.map``): evaluations whose
    memory must not scale with K, and which equal the single run's unbatched call."""
    import jax


    @functools.partial(jax.jit, static_argnames=("fn",))
    def run(fn, stacked, shared):
        return jax.lax.map(lambda x: fn(x, shared), stacked)

    return run


def _eval_lm(x, data):
    from codex_jax import lm

    params, family = x
    return lm.evaluate(params, family, data)


def _eval_rm(x, _):
    from codex_jax import reward

    (params, pairs), family = x
    return reward.evaluate(params, family, pairs)


def _eval_ppo_exact(state, demo_counts):
    from codex_jax import ppo

    return ppo.evaluate(state, demo_counts)


def _eval_ppo_sampled(x, data):
    """Monte Carlo objective terms + L_SFT, as ``run_stages`` reports for families
    without a closed form.  x = (state, eval_batch, key)."""
    from codex_jax import lm, ppo

    state, batch, key = x
    return {**ppo.sampled_objective(state, batch, key),
            "L_SFT": lm.evaluate(state.policy, state.family, data)["nll"]}


@functools.cache
def _bind(fn: Callable, family) -> Callable:
    """``fn`` with the (static, hashable) family bound; cached, so the jitted
    ``_per_member`` sees the same static function and compiles once."""
    return functools.partial(_with_family, fn, family)


def _with_family(fn, family, x, shared):
    return fn((x, family), shared)


def _map_eval(fn: Callable, stacked: Any, shared: Any, family=None) -> dict:
    """Runs ``fn`` per member and returns host numpy arrays [G, ...]."""
    import jax

    if family is not None:
        fn = _bind(fn, family)
    return jax.device_get(_per_member()(fn, stacked, shared))


# --------------------------------------------------------------------------- training
def _stack(trees: list) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree: Any, idx) -> Any:
    import jax
    import numpy as np

    idx = np.asarray(idx)
    return jax.tree_util.tree_map(lambda x: x[idx], tree)


def _set_lr(states, lrs):
    from codex_jax import optim

    return states.replace(opt_state=optim.set_learning_rate(states.opt_state, lrs))


def train_members(label: str, states: Any, data: Any, keys: Any, *, total: int, chunk: int,
                  step_fn: Callable, select_fn: Callable, data_axis: int | None = None,
                  guards: list | None = None, progress: bool = False,
                  show: tuple[str, ...] = (), on_chunk: Callable[[int, Any], None] | None = None):
    """Trains G stacked states ``total`` steps in vmapped chunks of ``chunk`` steps.

    Returns (states, metrics {name: numpy [G, total]}, guard messages [G] (None = ok)).
    ``guards``: one ``Runner.guard(label)`` closure per member, fed that member's
    records after each chunk (a tripped member is reported, the others go on).
    """
    import jax
    import numpy as np

    from codex_jax.loop import Progress
    from codex_jax.pipeline import GuardError

    run = _vmapped_run_steps()
    g = int(np.shape(states.step)[0])
    tripped: list[str | None] = [None] * g
    parts: list[dict] = []
    bar = Progress(f"{label}x{g}", total, enabled=progress)
    step = 0
    if on_chunk is not None:
        on_chunk(0, states)
    while step < total:
        n = min(chunk, total - step)
        states, metrics = run(states, data, keys, step_fn=step_fn, select_fn=select_fn, num_steps=n,
                              data_axis=data_axis)
        host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}  # one sync per chunk
        parts.append(host)
        step += n
        if guards is not None:
            for i, check in enumerate(guards):
                if tripped[i] is not None:
                    continue
                recs = [{"stage": label, "step": step - n + j + 1, **{k: float(v[i, j]) for k, v in host.items()}}
                        for j in range(n)]
                try:
                    check(recs, None)
                except GuardError as err:
                    tripped[i] = str(err)
        if on_chunk is not None:
            on_chunk(step, states)
        bar.update(step, {k: float(np.mean(host[k][:, -1])) for k in show if k in host})
    metrics = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]} if parts else {}
    return states, metrics, tripped


# --------------------------------------------------------------------------- the sweep
def run_sweep(enc, tokenizer, cfg, members: list[Member], *, eval_every: int = 0, progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict:
    """Runs M0 -> M1 -> RM -> M2 for every member, one vmapped compiled call per chunk of
    each stage.  ``eval_every`` > 0 (unigram): exact objective terms of every PPO member
    every ``eval_every`` iterations (``curves["ppo_eval"]``).

    Returns {"members", "configs", "params" {stage: stacked [G_stage]}, "index"
    {stage: group of each member [K]}, "metrics" [K], "objective" [K], "fingerprints" [K],
    "guard" [K], "curves" {label: {name: [K, steps]}}, "timings" {stage: s}}.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from codex_jax import artifacts, lm, ppo, reward
    from codex_jax.family import make_family
    from codex_jax.pipeline import Runner, split_pairs, stage_keys, unsafe_ids

    if not members:
        raise ConfigError("sweep: no members")
    cfgs = [member_config(cfg, m) for m in members]
    k_all = len(members)
    family = make_family(cfg.model, enc.vocab_size, cfg.transformer if cfg.model == "transformer" else None)
    keys = {s: stage_keys(s) for s in sorted({m.seed for m in members})}
    runner = Runner(cfg=cfg, progress=False)
    timings: dict[str, float] = {}
    params: dict[str, Any] = {}
    index: dict[str, np.ndarray] = {}
    group_metrics: dict[str, list[dict]] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    guard: list[str | None] = [None] * k_all
    say = log or (lambda _msg: None)

    def member_metrics(label: str, per_group: dict, idx) -> None:
        curves[label] = {k: v[np.asarray(idx)] for k, v in per_group.items()}

    def note_guards(tripped, group_of):
        for gi, msg in enumerate(tripped):
            if msg is not None:
                for i in range(k_all):
                    if group_of[i] == gi and guard[i] is None:
                        guard[i] = msg

    def lrs(reps, stage_cfg_name):
        return jnp.asarray([_get(cfgs[r], SETTINGS[stage_cfg_name][1]) for r in reps], jnp.float32)

    # ---- M0
    t0 = time.perf_counter()
    pcfg = cfg.pretrain
    eps = lm.smoothing_to_label_smoothing(pcfg.smoothing, enc.num_corpus_tokens, enc.vocab_size)
    corpus = lm.make_data(enc.corpus_tokens, enc.corpus_mask, pcfg.batch_size, eps)
    held_corpus, held_demos = lm.heldout_data(enc)
    split2 = lambda s, p: jax.random.split(keys[s][p])
    if pcfg.mode == "exact":
        reps0, idx0 = [0], [0] * k_all
        k_init = split2(members[0].seed, "pretrain")[0]
        m0 = lm.fit_exact(k_init, pcfg, family, corpus)
        params["M0"] = _stack([m0.params])
        m0_skipped = np.zeros(1, np.int64)
    else:
        reps0, idx0 = _groups(members, cfgs, "M0")
        ks = [split2(members[r].seed, "pretrain") for r in reps0]
        states = jax.vmap(lambda k: lm.init(k, pcfg, family))(jnp.stack([k[0] for k in ks]))
        states = _set_lr(states, lrs(reps0, "pretrain.lr"))
        say(f"M0: training {len(reps0)} distinct pretraining state(s)")
        states, m, tripped = train_members(
            "pretrain", states, corpus, jnp.stack([k[1] for k in ks]), total=pcfg.steps,
            chunk=pcfg.log_every, step_fn=lm.step, select_fn=lm.select_batch, progress=progress,
            show=("loss",), guards=[runner.guard("pretrain") for _ in reps0])
        member_metrics("pretrain", m, idx0)
        note_guards(tripped, idx0)
        params["M0"] = states.params
        m0_skipped = np.asarray(states.skipped)
    index["M0"] = np.asarray(idx0)
    ev = _map_eval(_eval_lm, params["M0"], corpus, family)
    group_metrics["M0"] = [{"mode": pcfg.mode, "corpus_tokens": enc.num_corpus_tokens,
                            "nll": float(ev["nll"][g]), "perplexity": float(ev["perplexity"][g]),
                            "skipped_updates": int(m0_skipped[g])} for g in range(len(reps0))]
    if held_corpus is not None:
        ev = _map_eval(_eval_lm, params["M0"], held_corpus, family)
        for g, rec in enumerate(group_metrics["M0"]):
            rec.update({f"heldout_{k}": float(v[g]) for k, v in ev.items()},
                       heldout_tokens=int(enc.heldout_corpus_mask.sum()))
    timings["M0"] = time.perf_counter() - t0

    # ---- M1
    t0 = time.perf_counter()
    scfg = cfg.sft
    demos = lm.make_data(enc.sft_tokens, enc.sft_mask, scfg.batch_size)
    reps1, idx1 = _groups(members, cfgs, "M1")
    ks = [split2(members[r].seed, "sft") for r in reps1]
    start = _take(params["M0"], [idx0[r] for r in reps1])
    states = jax.vmap(lambda k, p: lm.init(k, scfg, family, params=p))(jnp.stack([k[0] for k in ks]), start)
    states = _set_lr(states, lrs(reps1, "sft.lr"))
    say(f"M1: training {len(reps1)} distinct SFT state(s)")
    states, m, tripped = train_members(
        "sft", states, demos, jnp.stack([k[1] for k in ks]), total=scfg.steps, chunk=scfg.log_every,
        step_fn=lm.step, select_fn=lm.select_batch, progress=progress, show=("loss",),
        guards=[runner.guard("sft") for _ in reps1])
    member_metrics("sft", m, idx1)
    note_guards(tripped, idx1)
    params["M1"], index["M1"] = states.params, np.asarray(idx1)
    before = _map_eval(_eval_lm, start, demos, family)
    after = _map_eval(_eval_lm, states.params, demos, family)
    skipped = np.asarray(states.skipped)
    group_metrics["M1"] = [{"demo_nll_before": float(before["nll"][g]), "demo_nll_after": float(after["nll"][g]),
                            "skipped_updates": int(skipped[g])} for g in range(len(reps1))]
    if held_demos is not None:
        before = _map_eval(_eval_lm, start, held_demos, family)
        after = _map_eval(_eval_lm, states.params, held_demos, family)
        for g, rec in enumerate(group_metrics["M1"]):
            rec.update(heldout_demos=int(held_demos["tokens"].shape[0]), heldout_demo_nll_before=float(before["nll"][g]),
                       heldout_demo_nll_after=float(after["nll"][g]))
    timings["M1"] = time.perf_counter() - t0

    # ---- RM (the train / held-out split is drawn per seed, so its data are stacked)
    t0 = time.perf_counter()
    rcfg = cfg.reward
    reps_r, idx_r = _groups(members, cfgs, "RM")
    ks = [jax.random.split(keys[members[r].seed]["reward"], 3) for r in reps_r]
    splits = [split_pairs(enc.pairs, k[0], rcfg.heldout_fraction) for k in ks]
    train_pairs = _stack([jax.tree_util.tree_map(jnp.asarray, s[0]) for s in splits])
    states = jax.vmap(lambda k: reward.init(k, rcfg, family))(jnp.stack([k[1] for k in ks]))
    states = _set_lr(states, lrs(reps_r, "reward.lr"))
    say(f"RM: training {len(reps_r)} distinct reward model(s)")
    states, m, tripped = train_members(
        "reward", states, train_pairs, jnp.stack([k[2] for k in ks]), total=rcfg.steps, chunk=rcfg.log_every,
        step_fn=reward.step, select_fn=reward.select_batch, data_axis=0, progress=progress,
        show=("loss", "accuracy"), guards=[runner.guard("reward") for _ in reps_r])
    member_metrics("reward", m, idx_r)
    note_guards(tripped, idx_r)
    params["RM"], index["RM"] = states.params, np.asarray(idx_r)
    ev_train = _map_eval(_eval_rm, (states.params, train_pairs), None, family)
    n_held = int(splits[0][1]["chosen"].shape[0])
    if n_held:
        held = _stack([jax.tree_util.tree_map(jnp.asarray, s[1]) for s in splits])
        ev_held = _map_eval(_eval_rm, (states.params, held), None, family)
    skipped = np.asarray(states.skipped)
    group_metrics["RM"] = []
    for g in range(len(reps_r)):
        rec = {"train_pairs": int(train_pairs["chosen"].shape[1]), "heldout_pairs": n_held,
               "skipped_updates": int(skipped[g]), **{f"train_{k}": float(v[g]) for k, v in ev_train.items()}}
        if n_held:
            rec.update({f"heldout_{k}": float(v[g]) for k, v in ev_held.items()})
        group_metrics["RM"].append(rec)
    del train_pairs
    timings["RM"] = time.perf_counter() - t0

    # ---- M2 (every member is its own group unless two share seed and all settings)
    t0 = time.perf_counter()
    qcfg = cfg.ppo
    reps2, idx2 = _groups(members, cfgs, "M2")
    ids = unsafe_ids(tokenizer, qcfg.unsafe_tokens)
    ks = [jax.random.split(keys[members[r].seed]["ppo"], 3) for r in reps2]
    policy = _take(params["M1"], [idx1[r] for r in reps2])
    ref = _take(params["M0"] if qcfg.reference == "pretrain" else params["M1"],
                [(idx0 if qcfg.reference == "pretrain" else idx1)[r] for r in reps2])
    rm_params = _take(params["RM"], [idx_r[r] for r in reps2])
    penalty = jnp.stack([ppo.penalty_vector(enc.vocab_size, ids, cfgs[r].ppo.safety_penalty) for r in reps2])
    k_value = jnp.stack([k[0] for k in ks])
    k_train = jnp.stack([k[1] for k in ks])
    k_eval = jnp.stack([k[2] for k in ks])

    def init_one(pol, rf, rw, pen, kv):
        value = family.init_value(kv) if family.init_value is not None else None
        return ppo.init(qcfg, family, pol, rf, rw, pen, value=value)

    start = jax.vmap(init_one)(policy, ref, rm_params, penalty, k_value)
    start = start.replace(kl_coef=jnp.asarray([cfgs[r].ppo.kl_coef for r in reps2], jnp.float32))
    start = _set_lr(start, lrs(reps2, "ppo.lr"))
    ppo_data = {"prompt": jnp.asarray(enc.prompt), "prompt_mask": jnp.asarray(enc.prompt_mask),
                "ptx_tokens": demos["tokens"], "ptx_mask": demos["mask"]}
    demo_counts = jnp.bincount(demos["tokens"].ravel(), weights=demos["mask"].ravel(), length=enc.vocab_size)
    exact = family.exact_objective is not None
    evals: list[tuple[int, dict]] = []

    def on_chunk(step, states):
        if exact and eval_every and (step % eval_every == 0 or step == qcfg.iterations):
            evals.append((step, _map_eval(_eval_ppo_exact, states, demo_counts)))

    say(f"M2: training {len(reps2)} PPO member(s)")
    chunk = qcfg.log_every if not eval_every else eval_every
    m2, m, tripped = train_members(
        "ppo", start, ppo_data, k_train, total=qcfg.iterations, chunk=chunk, step_fn=ppo.step,
        select_fn=ppo.select_batch, progress=progress, show=("rm_score", "kl", "safety_penalty"),
        guards=[runner.guard("ppo") for _ in reps2], on_chunk=on_chunk if (exact and eval_every) else None)
    member_metrics("ppo", m, idx2)
    note_guards(tripped, idx2)
    if evals:
        curves["ppo_eval"] = {"step": np.asarray([s for s, _ in evals])}
        for name in evals[0][1]:
            curves["ppo_eval"][name] = np.stack([e[name] for _, e in evals], axis=1)[np.asarray(idx2)]
    params["M2"], index["M2"] = m2.policy, np.asarray(idx2)
    if exact:
        ev_before = _map_eval(_eval_ppo_exact, start, demo_counts)
        ev_after = _map_eval(_eval_ppo_exact, m2, demo_counts)
    else:  # Monte Carlo estimates on the same prompts and sampling keys, as run_stages
        batches = jax.vmap(lambda s, k: ppo.select_batch(s, ppo_data, jax.random.fold_in(k, 0)))(m2, k_eval)
        ev_before = _map_eval(_eval_ppo_sampled, (start, batches, k_eval), demos)
        ev_after = _map_eval(_eval_ppo_sampled, (m2, batches, k_eval), demos)
    final_kl = np.asarray(m2.kl_coef)
    skipped = np.asarray(m2.skipped)
    group_metrics["M2"] = [{"reference": qcfg.reference, "final_kl_coef": float(final_kl[g]),
                            "skipped_updates": int(skipped[g]),
                            "unsafe_token_ids": int((np.asarray(penalty[g]) > 0).sum()),
                            "exact_before": {k: float(v[g]) for k, v in ev_before.items()},
                            "exact_after": {k: float(v[g]) for k, v in ev_after.items()}}
                           for g in range(len(reps2))]
    timings["M2"] = time.perf_counter() - t0

    # ---- per member
    o = cfg.objective
    metrics, objective, fingerprints = [], [], []
    fp_cache: dict[tuple[str, int], str] = {}
    for i in range(k_all):
        metrics.append({s: group_metrics[s][int(index[s][i])] for s in STAGES})
        a = metrics[-1]["M2"]["exact_after"]
        omega = a["KL"] + a["safety"]
        objective.append({"L_SFT": a["L_SFT"], "L_RLHF": a["L_RLHF"], "Omega": omega,
                          "U": o.alpha * a["L_SFT"] + o.beta * a["L_RLHF"] + o.gamma * omega,
                          "alpha": o.alpha, "beta": o.beta, "gamma": o.gamma, "exact": exact})
        fp = {}
        for s in STAGES:
            g = int(index[s][i])
            if (s, g) not in fp_cache:
                fp_cache[(s, g)] = artifacts.fingerprint(_take(params[s], g))
            fp[s] = fp_cache[(s, g)]
        fingerprints.append(fp)
    return {"members": members, "configs": cfgs, "params": params, "index": index, "metrics": metrics,
            "objective": objective, "fingerprints": fingerprints, "guard": guard, "curves": curves,
            "timings": timings}


def member_params(result: dict, stage: str, i: int) -> Any:
    """Member ``i``'s parameters of ``stage`` (unstacked)."""
    return _take(result["params"][stage], int(result["index"][stage][i]))


# --------------------------------------------------------------------------- summaries
def flatten_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"M2.exact_after.tv_to_optimum": value, ...}: numbers only (no flags, no strings)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def summarise(result: dict) -> list[dict]:
    """Per setting (in grid order): its members, seeds, and the mean and std (numpy,
    ddof=0) over those seeds of every final metric ("stages.*" and "objective.*")."""
    import numpy as np

    by_setting: dict[tuple, list[int]] = {}
    for i, m in enumerate(result["members"]):
        by_setting.setdefault(m.settings, []).append(i)
    out = []
    for settings, idx in by_setting.items():
        flat = [flatten_metrics({"stages": result["metrics"][i], "objective": result["objective"][i]})
                for i in idx]
        names = [n for n in flat[0] if all(n in f for f in flat)]
        values = {n: np.asarray([f[n] for f in flat], np.float64) for n in names}
        out.append({"settings": dict(settings), "members": idx,
                    "seeds": [result["members"][i].seed for i in idx],
                    "mean": {n: float(np.mean(v)) for n, v in values.items()},
                    "std": {n: float(np.std(v)) for n, v in values.items()}})
    return out


def write_sweep(out_dir: str | pathlib.Path, result: dict, cfg, *, data_source: str = "",
                total_s: float | None = None) -> dict:
    """Writes OUT/members/<i>/summary.json, OUT/sweep.json and OUT/curves.npz; returns sweep.json's dict."""
    import io

    import numpy as np

    from codex_jax import artifacts
    from codex_jax.manifest import environment

    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CodexError(f"{out}: the output path exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    members = result["members"]
    for i, m in enumerate(members):
        artifacts.write_json(out / "members" / str(i) / "summary.json", {
            "index": i, "seed": m.seed, "settings": m.settings_dict, "model": cfg.model,
            "config_hash": result["configs"][i].config_hash(),
            "stages": result["metrics"][i], "objective": result["objective"][i],
            "fingerprints": result["fingerprints"][i], "guard": result["guard"][i]})
    settings: dict[str, list[float]] = {}
    for m in members:
        for k, v in m.settings:
            if v not in settings.setdefault(k, []):
                settings[k].append(v)
    record = {
        "model": cfg.model, "data_source": data_source, "num_members": len(members),
        "seeds": sorted({m.seed for m in members}), "settings": settings,
        "members": [{"index": i, "seed": m.seed, "settings": m.settings_dict, "guard": result["guard"][i]}
                    for i, m in enumerate(members)],
        "distinct_states": {s: int(np.max(result["index"][s])) + 1 for s in STAGES},
        "summary": summarise(result),
        "timings_s": {**result["timings"], **({"total": total_s} if total_s is not None else {})},
        "config": cfg.to_dict(), "versions": environment(),
    }
    artifacts.write_json(out / "sweep.json", record)
    arrays = {f"{label}/{name}": np.asarray(v) for label, c in result["curves"].items() for name, v in c.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    artifacts.atomic_write_bytes(out / "curves.npz", buf.getvalue())
    return record


# --------------------------------------------------------------------------- command line
def _floats_list(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CodexError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise CodexError(f"{flag} takes comma-separated numbers, got {text!r}")
    return values


FLAGS = {"kl_coef": "ppo.kl_coef", "lr": "ppo.lr", "sft_lr": "sft.lr", "rm_lr": "reward.lr",
         "pretrain_lr": "pretrain.lr", "safety_penalty": "ppo.safety_penalty"}


def cmd_sweep(args: argparse.Namespace) -> int:
    from codex_jax.cli import _enable_compilation_cache, _load_dataset
    from codex_jax.config import load_config
    from codex_jax.pipeline import prepare

    if args.seeds < 1:
        raise CodexError(f"--seeds must be >= 1, got {args.seeds}")
    cfg = load_config(args.config, model=args.model)
    first = cfg.seed if args.seed is None else args.seed
    settings = {}
    for attr, name in FLAGS.items():
        values = _floats_list(getattr(args, attr), "--" + attr.replace("_", "-"))
        if values is not None:
            settings[name] = values
    members = grid(list(range(first, first + args.seeds)), settings)
    for m in members:
        member_config(cfg, m)  # bad values fail here (ConfigError), before any work
    if args.eval_every < 0:
        raise CodexError(f"--eval-every must be >= 0, got {args.eval_every}")
    dataset = _load_dataset(args.data)
    _enable_compilation_cache()
    t0 = time.perf_counter()
    tokenizer, enc = prepare(dataset, cfg)
    log = (lambda msg: print(f"[   sweep] {msg}", file=sys.stderr)) if not args.quiet else None
    if log:
        log(f"{len(members)} member(s): seeds {first}..{first + args.seeds - 1} x "
            f"{len(members) // args.seeds} setting(s) ({cfg.model}; memory grows with the members)")
    result = run_sweep(enc, tokenizer, cfg, members, eval_every=args.eval_every, progress=not args.quiet, log=log)
    record = write_sweep(args.out, result, cfg, data_source=dataset.source, total_s=time.perf_counter() - t0)
    shown_metrics = (("TV*", "stages.M2.exact_after.tv_to_optimum"),  # unigram only
                     ("RM held-out acc", "stages.RM.heldout_accuracy"), ("L_RLHF", "objective.L_RLHF"),
                     ("KL", "stages.M2.exact_after.KL"), ("safety", "stages.M2.exact_after.safety"),
                     ("U", "objective.U"))
    for row in record["summary"]:
        m, s = row["mean"], row["std"]
        desc = ", ".join(f"{k}={v:g}" for k, v in row["settings"].items()) or "(config)"
        shown = [f"{name}={m[k]:.4g}±{s[k]:.2g}" for name, k in shown_metrics if k in m]
        print(f"{desc}: {' '.join(shown)} over {len(row['seeds'])} seed(s)")
    tripped = [i for i, g in enumerate(result["guard"]) if g]
    if tripped:
        print(f"codex-jax: warning: guards tripped in member(s) {tripped} (see members/<i>/summary.json)",
              file=sys.stderr)
    print(f"wrote {args.out}: {len(members)} members, {record['timings_s']['total']:.1f}s")
    return 0


def add_parser(subparsers: Any) -> None:
    """Registers ``sweep`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser(
        "sweep", help="train many seeds x settings at once (jax.vmap, one compiled call per stage)",
        description="Runs the pipeline for K seeds x the product of the given settings in one vmapped, "
                    "jitted call per stage chunk and writes OUT/members/<i>/summary.json, OUT/sweep.json "
                    "(mean/std over seeds per setting) and OUT/curves.npz. Member i equals, up to float rounding, "
                    "`codex-jax run` with its seed and settings. Training memory grows with the number "
                    "of members (mind it with --model transformer).")
    p.add_argument("--seeds", type=int, required=True, help="number of seeds: SEED, SEED+1, ..., SEED+K-1")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: the config's)")
    p.add_argument("--kl-coef", metavar="A,B,...", help="PPO (initial) KL coefficients")
    p.add_argument("--lr", metavar="A,B,...", help="PPO learning rates (base rate of its schedule)")
    p.add_argument("--sft-lr", metavar="A,B,...", help="SFT learning rates")
    p.add_argument("--rm-lr", metavar="A,B,...", help="reward-model learning rates")
    p.add_argument("--pretrain-lr", metavar="A,B,...", help="pretraining learning rates (gradient mode)")
    p.add_argument("--safety-penalty", metavar="A,B,...", help="penalties per unsafe token")
    p.add_argument("--eval-every", type=int, default=0,
                   help="unigram: exact objective terms every N PPO iterations into curves.npz (0: off)")
    p.add_argument("--data", help="data directory, as for `run` (default: the built-in data)")
    p.add_argument("--config", help="TOML or JSON pipeline config, as for `run`")
    p.add_argument("--model", choices=("unigram", "transformer"), default=None)
    p.add_argument("--out", default="runs/sweep", help="output directory (default: runs/sweep)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_sweep)
