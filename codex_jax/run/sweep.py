"""``codex-jax sweep``: many seeds and hyperparameter settings in one compiled call per stage.

Every stage is a pure function of (state, data, key), so K members -- seeds x settings
-- train at once: the K states are stacked along a leading axis and one
``jax.jit(jax.vmap(scan.run_steps))`` runs them all (PureJaxRL-style).  The sweep
walks the same stage table as a run (``stages.table.pipeline_stages``) and calls the
same ``setup`` / ``report`` / ``export`` of each stage module, so member ``i`` with
seed ``s`` and settings ``x`` equals ``codex-jax run`` with seed ``s`` and ``x``
written into the config (``member_config``), up to float rounding of batched kernels:

* keys: each member's stage keys are ``driver.stage_keys`` of its seed;
* settings that vary across members are *dynamic* leaves of the stacked state, never
  static config: every ``*.lr`` is the base rate held in the optimiser state
  (``optim.set_learning_rate``); the others are set by the stage module's
  ``SWEEP_SETTERS`` (PPO: ``extras["kl_coef"]``, ``extras["penalty"]``);
* data are shared, except where a stage's data depend on its key (``seeded_data``:
  the reward model's train / held-out split), which are stacked.

A stage trains only as many distinct states as it has distinct inputs (its seed if
it uses it, its own settings, the groups of the stages it starts from): a sweep over
3 seeds x 4 KL coefficients trains 3 reward models and 12 policies, and a closed-form
stage is computed once.  Numerical guards are checked per member after each chunk; a
member that trips one is reported ("guard") and the others go on.  No checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.core import optim
from codex_jax.core.scan import run_steps
from codex_jax.errors import ConfigError
from codex_jax.run import artifacts
from codex_jax.run.driver import make_context, stage_keys
from codex_jax.run.guards import GuardError, make_guard
from codex_jax.run.train import Progress
from codex_jax.stages import rl
from codex_jax.stages.table import BASE_STAGES, RL_STAGES, STAGE_NAMES, objective, pipeline_stages


def _settings() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (stage name, config path) for every sweepable setting of the table."""
    out = {}
    for stage in BASE_STAGES + tuple(RL_STAGES.values()):
        for s in stage.settings:
            path = (stage.section, "optim", "lr") if s == "lr" else (stage.section, s)
            out[f"{stage.section}.{s}"] = (stage.name, path)
    return out


SETTINGS = _settings()


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


def _put(obj, path, value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _put(getattr(obj, path[0]), path[1:], value)})


def _get(obj, path):
    for p in path:
        obj = getattr(obj, p)
    return obj


def member_config(cfg, member: Member):
    """The single-run config this member equals: ``cfg`` with its seed and settings."""
    out = dataclasses.replace(cfg, seed=member.seed)
    for name, value in member.settings:
        out = _put(out, SETTINGS[name][1], value)
    return out


# --------------------------------------------------------------------------- compiled pieces
@functools.partial(jax.jit, static_argnames=("step_fn", "select_fn", "num_steps", "data_axis"))
def _vmapped_run_steps(states, data, keys, *, step_fn, select_fn, num_steps, data_axis):
    """``scan.run_steps`` vmapped over (state, key), data shared or stacked."""
    one = lambda s, d, k: run_steps(s, d, k, step_fn=step_fn, select_fn=select_fn, num_steps=num_steps)  # noqa: E731
    return jax.vmap(one, in_axes=(0, data_axis, 0))(states, data, keys)


@jax.jit
def _exact_terms_each(states, demo_counts):
    """Exact objective terms of every stacked RL member, one at a time (``lax.map``)."""
    return jax.lax.map(lambda s: rl.exact_terms(s, demo_counts), states)


def stack(trees: list) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def take(tree: Any, idx) -> Any:
    idx = np.asarray(idx)
    return jax.tree_util.tree_map(lambda x: x[idx], tree)


def train_members(label: str, states: Any, data: Any, keys: Any, *, total: int, chunk: int,
                  step_fn: Callable, select_fn: Callable, data_axis: int | None = None,
                  guards: list | None = None, progress: bool = False,
                  show: tuple[str, ...] = (), on_chunk: Callable[[int, Any], None] | None = None):
    """Trains G stacked states ``total`` steps in vmapped chunks of ``chunk`` steps.

    Returns (states, metrics {name: numpy [G, total]}, guard messages [G] (None = ok)).
    ``guards``: one ``guards.make_guard`` closure per member, fed that member's records
    after each chunk (a tripped member is reported, the others go on).
    """
    g = int(np.shape(states.step)[0])
    tripped: list[str | None] = [None] * g
    parts: list[dict] = []
    bar = Progress(f"{label}x{g}", total, enabled=progress)
    step = 0
    if on_chunk is not None:
        on_chunk(0, states)
    while step < total:
        n = min(chunk, total - step)
        states, metrics = _vmapped_run_steps(states, data, keys, step_fn=step_fn, select_fn=select_fn,
                                             num_steps=n, data_axis=data_axis)
        host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}  # one sync per chunk
        parts.append(host)
        step += n
        for i, check in enumerate(guards or []):
            if tripped[i] is None:
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
def _apply_settings(stage, states, ctx, values: dict[str, list[float]]):
    """Writes the groups' setting values into the stacked states (dynamic leaves)."""
    for name, vals in values.items():
        setting = name.split(".", 1)[1]
        if setting == "lr":
            states = states.replace(opt_state=optim.set_learning_rate(states.opt_state, jnp.asarray(vals, jnp.float32)))
        else:
            states = stage.module.SWEEP_SETTERS[setting](states, jnp.asarray(vals, jnp.float32), ctx)
    return states


def run_sweep(enc, tokenizer, cfg, members: list[Member], *, eval_every: int = 0, progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict:
    """Runs every stage of the table for every member, one vmapped compiled call per
    chunk of each stage.  ``eval_every`` > 0 (unigram): exact objective terms of every
    RL member every ``eval_every`` iterations (``curves["<label>_eval"]``).

    Returns {"members", "configs", "params" {stage: stacked [G_stage]}, "index"
    {stage: group of each member [K]}, "metrics" [K], "objective" [K], "fingerprints" [K],
    "guard" [K], "curves" {label: {name: [K, steps]}}, "timings" {stage: s}}.
    """
    if not members:
        raise ConfigError("sweep: no members")
    cfgs = [member_config(cfg, m) for m in members]
    k_all = len(members)
    keys = {s: stage_keys(dataclasses.replace(cfg, seed=s)) for s in sorted({m.seed for m in members})}
    base = make_context(enc, tokenizer, cfg)
    exact = base.family.exact_objective is not None
    params, index, group_metrics, timings, curves = {}, {}, {}, {}, {}
    guard: list[str | None] = [None] * k_all
    say = log or (lambda _msg: None)
    for stage in pipeline_stages(cfg):
        t0 = time.perf_counter()
        own = [f"{stage.section}.{s}" for s in stage.settings]
        uses_seed = stage.module.seed_independence(base) is None
        group_keys = [((m.seed if uses_seed else None),) + tuple(_get(c, SETTINGS[n][1]) for n in own)
                      + tuple(int(index[s][i]) for s in stage.starts_from)
                      for i, (m, c) in enumerate(zip(members, cfgs))]
        order = list(dict.fromkeys(group_keys))
        of = [order.index(k) for k in group_keys]
        reps = [of.index(g) for g in range(len(order))]
        ctxs = [dataclasses.replace(base, params={s: take(params[s], index[s][r]) for s in params}) for r in reps]
        setups = [stage.module.setup(c, keys[members[r].seed][stage.label]) for c, r in zip(ctxs, reps)]
        states = _apply_settings(stage, stack([s.state for s in setups]), base,
                                 {n: [_get(cfgs[r], SETTINGS[n][1]) for r in reps] for n in own})
        for g, s in enumerate(setups):  # each group's start, settings included (reports read it)
            s.state = take(states, g)
            if "start" in s.extra:
                s.extra["start"] = s.state
        if setups[0].total > 0:
            data = stack([s.data for s in setups]) if stage.seeded_data else setups[0].data
            evals: list[tuple[int, dict]] = []
            want_curve = exact and eval_every and stage.name == "M2"
            counts = jnp.bincount(enc.sft_tokens.ravel(), weights=enc.sft_mask.ravel(), length=enc.vocab_size)

            def on_chunk(step, st):
                if step % eval_every == 0 or step == setups[0].total:
                    evals.append((step, jax.device_get(_exact_terms_each(st, counts))))

            say(f"{stage.name}: training {len(reps)} distinct {stage.label} state(s)")
            states, m, tripped = train_members(
                stage.label, states, data, jnp.stack([s.key for s in setups]), total=setups[0].total,
                chunk=eval_every if want_curve else setups[0].log_every, step_fn=stage.module.step,
                select_fn=stage.module.select_batch, data_axis=0 if stage.seeded_data else None,
                guards=[make_guard(stage.label, cfg.max_consecutive_skips, stage.config(cfg)) for _ in reps],
                progress=progress, show=stage.show, on_chunk=on_chunk if want_curve else None)
            curves[stage.label] = {k: v[np.asarray(of)] for k, v in m.items()}
            for i, g in enumerate(of):
                if tripped[g] is not None and guard[i] is None:
                    guard[i] = tripped[g]
            if evals:
                curve = {"step": np.asarray([s for s, _ in evals])}
                for name in evals[0][1]:
                    curve[name] = np.stack([e[name] for _, e in evals], axis=1)[np.asarray(of)]
                curves[f"{stage.label}_eval"] = curve
        finals = [take(states, g) for g in range(len(reps))]
        params[stage.name] = stack([stage.module.export(f) for f in finals])
        index[stage.name] = np.asarray(of)
        group_metrics[stage.name] = [stage.module.report(c, s, f) for c, s, f in zip(ctxs, setups, finals)]
        timings[stage.name] = time.perf_counter() - t0

    metrics, objectives, fingerprints = [], [], []
    fp_cache: dict[tuple[str, int], str] = {}
    for i in range(k_all):
        metrics.append({s: group_metrics[s][int(index[s][i])] for s in STAGE_NAMES})
        objectives.append(objective(cfgs[i], metrics[-1], exact))
        fp = {}
        for s in STAGE_NAMES:
            g = int(index[s][i])
            if (s, g) not in fp_cache:
                fp_cache[(s, g)] = artifacts.fingerprint(take(params[s], g))
            fp[s] = fp_cache[(s, g)]
        fingerprints.append(fp)
    return {"members": members, "configs": cfgs, "params": params, "index": index, "metrics": metrics,
            "objective": objectives, "fingerprints": fingerprints, "guard": guard, "curves": curves,
            "timings": timings}


def member_params(result: dict, stage: str, i: int) -> Any:
    """Member ``i``'s parameters of ``stage`` (unstacked)."""
    return take(result["params"][stage], int(result["index"][stage][i]))
