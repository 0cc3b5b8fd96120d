"""Which XLA CPU options and thread settings speed up one PPO iteration; prints ONE JSON line.

    python benchmarks/bench_xla_flags.py [--quick] [--repeats N] [--sets NAME,NAME]

Each setting runs in its own fresh process (XLA reads ``XLA_FLAGS`` once, when the
backend starts), on bench_transformer's PPO reference recipe (``--quick``: its quick
recipe): one compile + warm-up iteration, then ``--repeats`` timed iterations; the
median is reported beside XLA's default setting measured in the same run, on
the same machine (``ratio_vs_default`` = default s / setting s; > 1 is faster).  The
library sets no XLA option of its own: an option earns a place only by a figure here that
beats the noise between repeated runs of the default (README "Speed").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent

# name -> (environment, what it is)
SETTINGS = {
    "default": ({}, "XLA's defaults (what the library runs with)"),
    "xnnpack": ({"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"},
                "XNNPACK for dots and convolutions"),
    "onednn": ({"XLA_FLAGS": "--xla_cpu_use_onednn=true"}, "oneDNN for dots"),
    "concurrency_scheduler": ({"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"},
                              "the scheduler that overlaps independent ops"),
    "xnnpack+scheduler": ({"XLA_FLAGS": "--xla_cpu_use_xnnpack=true "
                           "--xla_cpu_enable_concurrency_optimized_scheduler=true"}, "both of the above"),
    "legacy_emitters": ({"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"},
                        "XLA's older loop-fusion code generation (compiles faster)"),
    "one_thread": ({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
                   "single-threaded Eigen (a thread-count check)"),
}


def child(quick: bool, repeats: int) -> dict:
    """Runs in the subprocess: times PPO iterations under this process's XLA options."""
    sys.path.insert(0, str(HERE))
    import bench_transformer as bt
    import jax

    from codex_jax.config import TransformerConfig
    from codex_jax.run import train as loop
    from codex_jax.stages import ppo

    c = bt.QUICK if quick else bt.FULL
    cfg = TransformerConfig(**c["model"])
    family, pcfg, state, data = bt.make_ppo(c, cfg)
    key = jax.random.key(11)
    iteration = lambda: loop.run_steps(state, data, key, step_fn=ppo.step, select_fn=ppo.select_batch, num_steps=1)
    res = bt.timed(iteration, repeats)
    return {"iteration_s": res["median"], "iteration_s_all": res["times"], "first_call_s": res["first_call"],
            "cores_used": res["cores_used"], "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bench_transformer's quick recipe")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sets", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.quick, args.repeats)))
        return {}
    names = [s for s in args.sets.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or args.repeats < 1:
        ap.error(f"unknown --sets {unknown} (know {list(SETTINGS)})" if unknown else "--repeats must be >= 1")
    if "default" not in names:
        names.insert(0, "default")
    rows = {}
    for name in names:
        env_add, what = SETTINGS[name]
        env = {**os.environ, **env_add}
        if "XLA_FLAGS" not in env_add:
            env.pop("XLA_FLAGS", None)
        t0 = time.perf_counter()
        quick = ["--quick"] if args.quick else []
        cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats), *quick]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            rows[name] = {"what": what, "error": proc.stderr.strip().splitlines()[-1:] or ["exit %d" % proc.returncode]}
        else:
            rows[name] = {"what": what, **json.loads(proc.stdout.strip().splitlines()[-1])}
        rows[name]["process_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {rows[name].get('iteration_s', rows[name].get('error'))}", file=sys.stderr)
    base = rows["default"]["iteration_s"]
    for row in rows.values():
        if "iteration_s" in row:
            row["ratio_vs_default"] = base / row["iteration_s"]
    sys.path.insert(0, str(HERE))
    from bench_transformer import cpu_model
    result = {"benchmark": "xla_flags", "recipe": "quick" if args.quick else "reference", "cpu": cpu_model(),
              "cores": os.cpu_count(), "load_avg": os.getloadavg(), "repeats": args.repeats,
              "default_s": base, "settings": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
