"""Speed-up of one vmapped sweep over K sequential single runs; prints ONE JSON line.

    python benchmarks/bench_sweep.py [--k 8] [--max-files N] [--config FILE]

The symbolic pipeline (default config) on the default data (``--max-files`` caps the
standard-library files for a quicker run), K seeds 0..K-1, everything in one process:

  1. a fresh, empty persistent compilation cache (as the CLI uses one), prepare once;
  2. cold: K sequential ``pipeline.run_stages`` (the first one compiles), then one
     ``sweep.run_sweep`` of the K seeds (compiles its vmapped stages);
  3. warm: the same two again (nothing left to compile);
  4. a check of each sweep member against its sequential run: stages equal bit for
     bit, largest relative parameter difference per stage (RM bias excluded: its
     gradient is zero up to rounding), TV between the two M2 policies and between
     their TVs to the analytic optimum.

Sequential runs also pay per-run evaluation and sample decoding; the sweep's
evaluations run per member too (``lax.map``).  Exact pretraining (a closed form) is
computed once by the sweep and K times sequentially.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax

_CACHE_DIR = tempfile.mkdtemp(prefix="codex-jax-bench-sweep-xla-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import numpy as np

from codex_jax.config import load_config
from codex_jax.data import records as data_mod
from codex_jax.data import stdlib as default_data
from codex_jax.models import symbolic
from codex_jax.run import artifacts, pipeline, sweep
from codex_jax.run.manifest import environment

STAGES = ("M0", "M1", "RM", "M2")


def load_data(max_files):
    if max_files is None:
        return data_mod.load_dataset(default_data.default_data_dir())
    out = pathlib.Path(tempfile.mkdtemp(prefix="codex-jax-bench-sweep-data-"))
    default_data.build_default_data(out, max_files=max_files)
    return data_mod.load_dataset(out)


def sequential(enc, tok, cfg, members):
    t0 = time.perf_counter()
    stages = dict.fromkeys(STAGES, 0.0)
    runs = []
    for m in members:
        r = pipeline.run_stages(enc, tok, sweep.member_config(cfg, m))
        jax.block_until_ready(r["params"])
        for s in STAGES:
            stages[s] += r["timings"][s]
        runs.append(r)
    return time.perf_counter() - t0, stages, runs


def swept(enc, tok, cfg, members):
    t0 = time.perf_counter()
    r = sweep.run_sweep(enc, tok, cfg, members)
    jax.block_until_ready(r["params"])
    return time.perf_counter() - t0, dict(r["timings"]), r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8, help="seeds (members), default 8")
    ap.add_argument("--max-files", type=int, default=None, help="cap the stdlib files of the default data")
    ap.add_argument("--config", default=None, help="pipeline config (default: the unigram defaults)")
    args = ap.parse_args()

    cfg = load_config(args.config)
    dataset = load_data(args.max_files)
    tok, enc = pipeline.prepare(dataset, cfg)
    members = sweep.grid(list(range(args.k)))

    seq_cold, seq_cold_stages, _ = sequential(enc, tok, cfg, members)
    sw_cold, sw_cold_stages, _ = swept(enc, tok, cfg, members)
    seq_warm, seq_warm_stages, runs = sequential(enc, tok, cfg, members)
    sw_warm, sw_warm_stages, res = swept(enc, tok, cfg, members)

    # member i vs sequential run i: M0/M1 agree bit for bit here; batched float
    # rounding in the RM, amplified by PPO's discrete sampling over 300 iterations,
    # leaves statistically equivalent but not identical policies
    bitwise = {s: 0 for s in STAGES}
    rel_diff = dict.fromkeys(STAGES, 0.0)
    tv_policies, tv_diff = 0.0, 0.0
    for i, r in enumerate(runs):
        a = r["metrics"]["M2"]["exact_after"]["tv_to_optimum"]
        b = res["metrics"][i]["M2"]["exact_after"]["tv_to_optimum"]
        tv_diff = max(tv_diff, abs(a - b))
        for s in STAGES:
            mine = sweep.member_params(res, s, i)
            bitwise[s] += int(res["fingerprints"][i][s] == artifacts.fingerprint(r["params"][s]))
            for x, y in zip(jax.tree_util.tree_leaves(r["params"][s]), jax.tree_util.tree_leaves(mine)):
                if s == "RM" and np.ndim(x) == 0:
                    continue  # the RM bias: its Bradley-Terry gradient is 0 up to rounding
                x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
                rel_diff[s] = max(rel_diff[s], float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-12)))
        tv_policies = max(tv_policies, float(symbolic.total_variation(
            r["params"]["M2"]["logits"], sweep.member_params(res, "M2", i)["logits"])))
    rnd = lambda d: {k: round(v, 3) for k, v in d.items()}
    env = environment()
    print(json.dumps({
        "benchmark": "sweep_vs_sequential", "k": args.k, "model": cfg.model,
        "data": {"source": "default" if args.max_files is None else f"default, max_files={args.max_files}",
                 "vocab_size": enc.vocab_size, "corpus_tokens": enc.num_corpus_tokens,
                 "demos": int(enc.sft_tokens.shape[0]), "pairs": int(enc.pairs["chosen"].shape[0])},
        "config": {"sft_steps": cfg.sft.steps, "reward_steps": cfg.reward.steps,
                   "ppo_iterations": cfg.ppo.iterations, "ppo_rollouts": cfg.ppo.rollouts},
        "cold": {"sequential_s": round(seq_cold, 3), "sweep_s": round(sw_cold, 3),
                 "speedup": round(seq_cold / sw_cold, 2),
                 "sequential_stages_s": rnd(seq_cold_stages), "sweep_stages_s": rnd(sw_cold_stages)},
        "warm": {"sequential_s": round(seq_warm, 3), "sweep_s": round(sw_warm, 3),
                 "speedup": round(seq_warm / sw_warm, 2),
                 "sequential_stages_s": rnd(seq_warm_stages), "sweep_stages_s": rnd(sw_warm_stages)},
        "check": {"bitwise_equal_members": bitwise, "max_rel_param_diff": rel_diff,
                  "max_tv_between_m2_policies": tv_policies, "max_abs_diff_tv_to_optimum": tv_diff,
                  "mean_tv_to_optimum": float(np.mean([r["metrics"]["M2"]["exact_after"]["tv_to_optimum"]
                                                       for r in runs]))},
        "env": {"backend": env.get("backend"), "device_kind": env.get("device_kind"), "jax": env.get("jax"),
                "cpu_count": __import__("os").cpu_count()},
    }))


if __name__ == "__main__":
    sys.exit(main())
