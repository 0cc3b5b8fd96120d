"""Helpers of ``experiments/execution_rl.py``: the config, SFT with early stopping on the
held-out problems, held-out pass@k of a policy, RL in chunks with evaluations, the figure.

Nothing here runs model-written code itself: completions go through
``codex_jax.execute`` (the sandboxed executor), as in the library.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from codex_jax.run.execution import ExecutionReward

EVAL_KS = (1, 10)


def make_config(quick: bool, *, sft_max_steps: int, ppo: dict):
    """The default transformer config on the task set: tasks on, no content-hash held-out
    split, prompt / response lengths sized to the task set (prompts <= 24 BPE ids,
    completions <= 15 + EOS), SFT's horizon ``sft_max_steps`` (early stopping ends it),
    and the PPO settings in ``ppo`` (a dict of PPOConfig fields; "lr" sets the optimiser)."""
    from codex_jax.config import PipelineConfig, default_config, from_dict

    d = default_config("transformer").to_dict()
    d["checkpoint_every"] = 0
    d["data"].update(max_prompt_len=24, max_response_len=16, heldout_fraction=0.0)
    d["tasks"]["enabled"] = True
    d["sft"]["steps"] = sft_max_steps
    if quick:
        d["pretrain"].update(steps=30, log_every=10)
        d["reward"].update(steps=10, log_every=10)
    ppo = dict(ppo)
    lr = ppo.pop("lr", None)
    d["ppo"].update(response_len=16, **ppo)
    if lr is not None:
        d["ppo"]["optim"]["lr"] = lr
    return from_dict(PipelineConfig, d)


def with_reward(cfg, reward: str):
    """The same config with ``[tasks] reward`` set."""
    return dataclasses.replace(cfg, tasks=dataclasses.replace(cfg.tasks, reward=reward))


class RecordingReward(ExecutionReward):
    """The library's execution reward on a shared executor, recording the mean raw
    execution reward (fraction of asserts) of every call, i.e. of every RL iteration's
    rollouts.  With ``[tasks] reward = "rm"`` its weight is 0 (``rm_weight`` 1): the RL
    update sees the RM score alone and the record is a diagnostic only."""

    def __init__(self, tokenizer, problems, cfg, executor):
        super().__init__(tokenizer, problems, cfg)
        self.executor = executor
        self.history: list[float] = []
        self.pass_history: list[float] = []

    def start(self):
        return self.executor

    def __call__(self, prompt_ids, responses):
        r = super().__call__(prompt_ids, responses)
        self.history.append(float(r.mean()))
        self.pass_history.append(float((r == 1.0).mean()))
        return r

    def close(self):  # the executor is the caller's
        pass


def heldout_demo_data(tokenizer, problems, cfg) -> dict:
    """The held-out problems' canonical solutions as SFT rows (prompt masked), cut as
    ``encode_dataset`` cuts demonstrations, as ``stages.lm`` evaluation data."""
    from codex_jax.data.encode import sft_rows
    from codex_jax.stages import lm

    prompts = [p[: cfg.data.max_prompt_len] for p in tokenizer.encode_many([q["prompt"] for q in problems])]
    bodies = [c[: cfg.data.max_response_len]
              for c in tokenizer.encode_many([q["canonical_solution"] for q in problems])]
    tokens, mask = sft_rows(prompts, bodies)
    return lm.make_data(tokens, mask, 1)


def train_to(module, state, data, key, total: int, label: str, log_every: int, records: list):
    """Trains ``module``'s stage from ``state.step`` to ``total`` (the library's host loop;
    keys depend on the absolute step, so chunks equal one uninterrupted run)."""
    from codex_jax.run import train as host_loop

    if int(state.step) >= total:
        return state
    state, recs = host_loop.train(state, data, key, total_steps=total, log_every=log_every, step_fn=module.step,
                                  select_fn=module.select_batch, label=label, progress=False)
    records.extend(recs)
    return state


def sft_early_stopping(ctx, key, held, *, every: int, patience: int, min_delta: float, log=print):
    """SFT (``stages.sft``) in chunks of ``every`` steps up to ``cfg.sft.steps``; after each
    chunk the held-out loss (``lm.evaluate``, nats per completion token).  Stops after
    ``patience`` evaluations without an improvement of more than ``min_delta`` over the
    best; M1 is the state at the best evaluation.  -> (M1 params, record)."""
    from codex_jax.stages import lm, sft

    setup = sft.setup(ctx, key)
    state, fam = setup.state, ctx.family
    curve = [(0, float(lm.evaluate(state.params, fam, held)["nll"]))]
    best_step, best_loss, best_params, waited, train_records = 0, curve[0][1], state.params, 0, []
    while int(state.step) < setup.total and waited < patience:
        total = min(int(state.step) + every, setup.total)
        state = train_to(sft, state, setup.data, setup.key, total, "sft", min(every, setup.log_every), train_records)
        loss = float(lm.evaluate(state.params, fam, held)["nll"])
        curve.append((int(state.step), loss))
        if loss < best_loss - min_delta:
            best_step, best_loss, best_params, waited = int(state.step), loss, state.params, 0
        else:
            waited += 1
        log(f"  sft step {int(state.step):4d}: held-out loss {loss:.4f} (best {best_loss:.4f} at {best_step})")
    stopped = "plateau" if waited >= patience else "max_steps"
    return best_params, {
        "heldout_loss": curve, "train_loss": [(r["step"], r["loss"]) for r in train_records],
        "best_step": best_step, "best_heldout_loss": best_loss, "steps_run": int(state.step),
        "stopped_by": stopped, "every": every, "patience": patience, "min_delta": min_delta,
        "heldout_demos": int(held["tokens"].shape[0])}


def passk(family, tokenizer, params, problems, *, n: int, temperature: float, key, executor, cfg) -> dict:
    """Held-out pass@k (unbiased estimator over n samples per problem; k <= n) and the
    empty-completion rate of one policy, through ``run.functional.functional_eval``."""
    from codex_jax.run.functional import functional_eval

    t0 = time.perf_counter()
    ks = tuple(k for k in EVAL_KS if k <= n)
    rep = functional_eval(family, tokenizer, {"policy": params}, problems, n=n, temperature=temperature, key=key,
                          ks=ks, executor=executor, max_prompt_len=cfg.data.max_prompt_len,
                          response_len=cfg.data.max_response_len, batch_size=128)
    st = rep["stages"]["policy"]
    flat = [c for row in rep["completions"]["policy"] for c in row]
    out = {f"pass@{k}": st[f"pass@{k}"] for k in ks}
    out.update(empty_rate=st["empty_rate"], passed=st["outcomes"]["passed"], programs=st["programs"],
               mean_chars=float(np.mean([len(c) for c in flat])), isolation=st["isolation"],
               seconds=round(time.perf_counter() - t0, 2))
    fams: dict[str, list] = {}
    for r in rep["results"]["policy"]:
        fams.setdefault(r["task_id"].split("/")[1], []).append(r["passed"])
    out["pass@1_by_family"] = {f: round(float(np.mean(v)), 4) for f, v in fams.items()}
    out["examples"] = [{"task_id": problems[i]["task_id"], "completion": rep["completions"]["policy"][i][0]}
                       for i in range(0, len(problems), max(1, len(problems) // 6))][:6]
    return out


def rl_run(module, ctx, key, evaluate, *, iterations: int, every: int, log=print) -> dict:
    """RL (``module``: ``stages.ppo``) from ``ctx.params["M1"]``, ``every`` iterations per
    chunk; after each chunk ``evaluate(params)`` (held-out pass@k, empty rate).  The
    reward is ``ctx.host_reward`` (a RecordingReward) and/or the RM by its weights."""
    setup = module.setup(ctx, key)
    state, records, evals = setup.state, [], []
    t_train = t_eval = 0.0
    while int(state.step) < iterations:
        t0 = time.perf_counter()
        state = train_to(module, state, setup.data, setup.key, min(int(state.step) + every, iterations),
                         module.__name__.rsplit(".", 1)[-1], every, records)
        t1 = time.perf_counter()
        ev = evaluate(module.export(state))
        t_train, t_eval = t_train + t1 - t0, t_eval + time.perf_counter() - t1
        evals.append({"iteration": int(state.step), **ev})
        host = ctx.host_reward
        log(f"  iteration {int(state.step):4d}: held-out pass@1 {ev['pass@1']:.4f}, empty {ev['empty_rate']:.3f}; "
            f"rollout execution reward {np.mean(host.history[-every:]):.3f}, "
            f"KL {records[-1]['kl']:.3f}, kl_coef {records[-1]['kl_coef']:.4f}")
    host = ctx.host_reward
    metrics = ("rm_score", "kl", "kl_coef", "return", "response_len", "pg_loss", "value_loss", "clip_fraction",
               "approx_kl")
    curves = {m: [r[m] for r in records if m in r] for m in metrics}
    curves = {m: v for m, v in curves.items() if v}
    return {"params": module.export(state), "evals": evals,
            "train": {"iteration": [r["step"] for r in records], **curves,
                      "execution_reward": list(host.history), "execution_pass": list(host.pass_history)},
            "skipped_updates": int(state.skipped), "final_kl_coef": float(state.extras["kl_coef"]),
            "timings_s": {"train": round(t_train, 2), "evaluate": round(t_eval, 2)}}


def key_record(keys: dict) -> dict:
    return {k: np.asarray(jax.random.key_data(v)).ravel().tolist() for k, v in keys.items()}


def figure(plt, colors, sft: dict, runs: dict, m1: dict, n: int, temperature: float, train_temperature: float,
           m1_greedy: tuple[float, float] | None = None):
    """2 x 2: SFT held-out loss; held-out pass@1, empty rate and rollout execution reward
    against RL iteration, one line per reward (iteration 0 = M1); ``m1_greedy`` =
    (temperature, M1's pass@1 there), drawn as a reference line on the pass@1 panel."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    x, y = np.asarray(sft["heldout_loss"]).T
    ax.plot(x, y, "o-", color=colors[0], markersize=3, label="held-out problems (canonical bodies)")
    if sft["train_loss"]:
        tx, ty = np.asarray(sft["train_loss"]).T
        ax.plot(tx, ty, color=colors[0], alpha=0.35, linewidth=0.8, label="training batches")
    ax.axvline(sft["best_step"], color="0.4", linestyle=":",
               label=f"M1 = step {sft['best_step']} (best held-out {sft['best_heldout_loss']:.3f})")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("cross-entropy per completion token (nats)")
    ax.set_title(f"SFT, stopped by {sft['stopped_by']} (patience {sft['patience']} x {sft['every']} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    panels = ((axes[0, 1], "pass@1", f"held-out pass@1 (n = {n}, T = {temperature:g})"),
              (axes[1, 0], "empty_rate", "held-out empty-completion rate"))
    for ax, metric, title in panels:
        for (name, run), color in zip(runs.items(), colors[1:]):
            xs = [0] + [e["iteration"] for e in run["evals"]]
            ys = [m1[metric]] + [e[metric] for e in run["evals"]]
            ax.plot(xs, ys, "o-", color=color, markersize=3, label=f"reward = {name}")
        ax.axhline(m1[metric], color="0.5", linestyle=":", label="M1")
        if metric == "pass@1" and m1_greedy is not None:
            ax.axhline(m1_greedy[1], color="0.3", linestyle="--", linewidth=0.8,
                       label=f"M1 at T = {m1_greedy[0]:g} (near-greedy, n = 1)")
        ax.set_xlabel("RL (PPO) iteration")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[1, 1]
    for (name, run), color in zip(runs.items(), colors[1:]):
        r = np.asarray(run["train"]["execution_reward"], np.float64)
        it = np.arange(1, r.size + 1)
        ax.plot(it, r, color=color, alpha=0.3, linewidth=0.8)
        w = np.minimum(it, 10)
        c = np.cumsum(np.insert(r, 0, 0.0))
        ax.plot(it, (c[it] - c[it - w]) / w, color=color, label=f"reward = {name} (moving mean of 10)")
    ax.set_xlabel("RL (PPO) iteration")
    ax.set_ylabel("mean fraction of asserts passed")
    ax.set_title(f"Execution reward of the PPO rollouts (training problems, T = {train_temperature:g})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
