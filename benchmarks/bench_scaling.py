"""Scaling over devices: the same compiled stage step on a data mesh of 1, 2 and 4
devices; prints ONE JSON line (and a Markdown table with --table).

    python benchmarks/bench_scaling.py [--devices 1,2,4] [--quick] [--table FILE.md]

Each device count runs in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=<max>`` (JAX fixes the device count
at start-up) and ``codex_jax.core.sharding.make_layout({"data": n})``, i.e. exactly what
``codex-jax run --mesh data=n`` does.  Workloads (all timed after a compiling call,
median of ``repeats`` calls of ``loop.run_steps``, ``block_until_ready``):

* ``pretrain_strong``: transformer pretraining steps with a fixed global batch
  (``batch`` rows of ``seq`` tokens) split over n devices;
* ``pretrain_weak``: the same with ``batch`` rows *per device* (global batch n x batch);
* ``reward_strong``: transformer reward-model (Bradley-Terry) steps, fixed global batch;
* ``ppo_strong``: one PPO iteration (rollouts with the KV cache, reference / value /
  reward passes, GAE, epochs x minibatches of updates), fixed number of rollouts;
* ``count``: the symbolic family's token count over a packed corpus split over n devices.

Reported per workload and n: seconds per call, tokens (or pairs) per second,
``speedup`` = throughput(n) / throughput(1) and ``efficiency`` = speedup / n.
Forced host devices are not extra hardware: they are XLA CPU "devices" that share
this machine's cores (``os.cpu_count()`` is recorded), and one device already uses
every core for its matmuls.  On a 2-core machine the ideal speed-up is therefore ~1
(efficiency ~1/n); the figure measures the overhead the sharded program adds
(collectives, per-device launch, smaller per-device matmuls), not a speed-up that
cores that are not there could give.  On a machine with n real accelerators, the same
command measures real scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

FULL = {"layers": 2, "d_model": 128, "heads": 4, "vocab": 2048, "seq": 128, "batch": 16, "steps": 3,
        "pairs": 32, "pair_len": 48, "rollouts": 32, "prompt_len": 32, "response_len": 32,
        "corpus_rows": 4096, "corpus_len": 256, "repeats": 5}
QUICK = {"layers": 1, "d_model": 64, "heads": 2, "vocab": 512, "seq": 64, "batch": 8, "steps": 2,
         "pairs": 16, "pair_len": 24, "rollouts": 8, "prompt_len": 8, "response_len": 8,
         "corpus_rows": 512, "corpus_len": 128, "repeats": 3}


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


def worker(n: int, p: dict) -> dict:
    """One device count, in this process (XLA_FLAGS already set by the parent)."""
    import jax
    import jax.numpy as jnp

    from codex_jax.config import LMConfig, OptimConfig, PPOConfig, RewardConfig, TransformerConfig
    from codex_jax.core import kernels
    from codex_jax.core.sharding import make_layout
    from codex_jax.models.registry import make_family
    from codex_jax.run import train as loop
    from codex_jax.stages import lm, ppo, reward

    layout = make_layout({"data": n, "model": 1})
    family = make_family("transformer", p["vocab"], TransformerConfig(
        layers=p["layers"], d_model=p["d_model"], heads=p["heads"],
        context_len=max(p["seq"], p["pair_len"], 1 + p["prompt_len"] + p["response_len"])))
    key = jax.random.key(0)
    out = {"devices": n}

    def lm_run(batch: int) -> tuple[float, float]:
        cfg = LMConfig(steps=10_000, batch_size=batch, optim=OptimConfig(lr=1e-3))
        tokens = jax.random.randint(key, (batch * 4, p["seq"]), 4, p["vocab"])
        data = layout.place_data(lm.make_data(tokens, jnp.ones(tokens.shape), batch))
        state = layout.place_state(lm.init(jax.random.fold_in(key, 1), cfg, family))
        run = lambda: loop.run_steps(state, data, key, step_fn=lm.step, select_fn=lm.select_batch,
                                     num_steps=p["steps"], layout=layout)
        sec, compile_s = _median_seconds(run, p["repeats"])
        return sec, compile_s, batch * p["seq"] * p["steps"] / sec

    for name, batch in (("pretrain_strong", p["batch"]), ("pretrain_weak", p["batch"] * n)):
        sec, compile_s, tps = lm_run(batch)
        out[name] = {"seconds": sec, "first_call_s": compile_s, "tokens_per_s": tps, "global_batch": batch}

    rcfg = RewardConfig(steps=10_000, batch_size=p["pairs"], optim=OptimConfig(lr=1e-3))
    m, length = p["pairs"] * 4, p["pair_len"]
    toks = jax.random.randint(jax.random.fold_in(key, 2), (3, m, length), 4, p["vocab"])
    ones = jnp.ones((m, length), jnp.float32)
    pairs = layout.place_data({"prompt": toks[0, :, :8], "prompt_mask": ones[:, :8], "chosen": toks[1],
                               "chosen_mask": ones, "rejected": toks[2], "rejected_mask": ones})
    rstate = layout.place_state(reward.init(jax.random.fold_in(key, 3), rcfg, family))
    sec, _ = _median_seconds(lambda: loop.run_steps(rstate, pairs, key, step_fn=reward.step,
                                                    select_fn=reward.select_batch, num_steps=p["steps"],
                                                    layout=layout), p["repeats"])
    out["reward_strong"] = {"seconds": sec, "pairs_per_s": p["pairs"] * p["steps"] / sec}

    qcfg = PPOConfig(iterations=10_000, rollouts=p["rollouts"], response_len=p["response_len"], epochs=2,
                     minibatches=2, ptx_batch_size=1, optim=OptimConfig(lr=1e-5))
    prompts = jax.random.randint(jax.random.fold_in(key, 5), (p["rollouts"] * 2, p["prompt_len"]), 4, p["vocab"])
    pdata = layout.place_data({"prompt": prompts, "prompt_mask": jnp.ones(prompts.shape, jnp.float32),
                               "ptx_tokens": prompts[:, :2], "ptx_mask": jnp.ones((prompts.shape[0], 2))})
    policy = family.init_policy(jax.random.fold_in(key, 6))
    qstate = layout.place_state(ppo.init(qcfg, family, policy, policy, rstate.params,
                                         jnp.zeros(p["vocab"], jnp.float32),
                                         value=family.init_value(jax.random.fold_in(key, 7))))
    sec, _ = _median_seconds(lambda: loop.run_steps(qstate, pdata, key, step_fn=ppo.step,
                                                    select_fn=ppo.select_batch, num_steps=1, layout=layout),
                             max(3, p["repeats"] // 2))
    out["ppo_strong"] = {"seconds": sec, "tokens_per_s": p["rollouts"] * p["response_len"] / sec}

    ids = jax.random.randint(jax.random.fold_in(key, 4), (p["corpus_rows"], p["corpus_len"]), 0, p["vocab"])
    placed = layout.place_data({"ids": ids, "mask": jnp.ones(ids.shape, jnp.float32)})
    count = jax.jit(kernels.batch_count_tokens, static_argnums=2)
    sec, _ = _median_seconds(lambda: count(placed["ids"], placed["mask"], p["vocab"]), p["repeats"] * 2)
    out["count"] = {"seconds": sec, "tokens_per_s": ids.size / sec}
    return out


RATE = {"pretrain_strong": "tokens_per_s", "pretrain_weak": "tokens_per_s", "reward_strong": "pairs_per_s",
        "ppo_strong": "tokens_per_s", "count": "tokens_per_s"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1,2,4", help="device counts (default 1,2,4)")
    ap.add_argument("--quick", action="store_true", help="a small config (smoke test)")
    ap.add_argument("--table", help="also write a Markdown table to this file")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = QUICK if args.quick else FULL
    if args.worker is not None:
        print(json.dumps(worker(args.worker, p)))
        return
    counts = [int(x) for x in args.devices.split(",")]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(counts)}",
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    runs = {}
    for n in counts:
        cmd = [sys.executable, __file__, "--worker", str(n)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_scaling: the {n}-device worker failed:\n{proc.stderr[-3000:]}")
        runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[scaling] {n} device(s) done", file=sys.stderr, flush=True)
    base = runs[counts[0]]
    result = {"benchmark": "scaling", "config": p, "cpu_count": os.cpu_count(),
              "platform": "forced host devices (XLA CPU)", "workloads": {}}
    for w, rate in RATE.items():
        rows = {}
        for n in counts:
            r = runs[n][w]
            # throughput ratio: strong scaling (same work) and weak scaling (work x n) alike
            speedup = r[rate] / base[w][rate]
            ideal = n / counts[0]
            rows[str(n)] = {**r, "speedup": speedup, "efficiency": speedup / ideal}
        result["workloads"][w] = rows
    print(json.dumps(result))
    if args.table:
        lines = ["| workload | " + " | ".join(f"{n} dev: rate, eff." for n in counts) + " |",
                 "|---|" + "---|" * len(counts)]
        for w, rows in result["workloads"].items():
            cells = [f"{rows[str(n)][RATE[w]]:,.0f}/s, {rows[str(n)]['efficiency']:.2f}" for n in counts]
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
        pathlib.Path(args.table).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
