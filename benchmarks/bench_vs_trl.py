"""codex-jax vs Hugging Face TRL, side by side in ONE run on THIS machine; prints ONE JSON line.

    python benchmarks/bench_vs_trl.py [--iterations N] [--quick] [--table FILE.md]
                                      [--ppo-python P] [--grpo-python P] [--dtypes fp32,bf16]
                                      [--floor]

One PPO iteration and one GRPO iteration of the transformer reference recipe
(bench_transformer's: 4 layers, d_model 256, 4 heads, vocab 8192; 32 rollouts of 64 prompt
+ 64 response tokens; 4 epochs x 4 minibatches of 8; GRPO: 8 prompts x 4 completions, no
value network), each measured here in its own fresh process:

  * codex-jax: ``run_steps(num_steps=1)`` of ``ppo.step`` / ``grpo.step`` - a compile +
    warm-up call, then ``--iterations`` timed calls (median);
  * TRL: benchmarks/peers/trl_bench.py in its own virtual environment (benchmarks/peers/
    README.md: PPOTrainer of TRL 1.12.0, GRPOTrainer of TRL 1.16.0, torch 2.13.0 CPU) - one
    warm-up iteration, then ``--iterations`` timed ones (median);
  * peak RSS of each process (``ru_maxrss``: model, optimiser, activations and the
    framework itself; for codex-jax it includes XLA compiling the iteration, so the RSS
    after the timed iterations is printed beside it) and the process's wall time;
  * the matmul peak of each framework and dtype measured at the start, idle (n = 2048:
    JAX ``jnp.dot`` with a float32 result, torch ``torch.mm``), and every iteration's MFU = FLOPs counted pass by
    pass (bench_transformer.ppo_flops / grpo_flops) / seconds / that framework's peak for
    the dtype it ran in.

``--floor`` then runs benchmarks/bench_matmul_floor.py in a fresh process and puts each
target's time budget (TRL fp32 s / 2 for fp32; TRL's fastest s / 3 for bf16) beside the
iteration's matmul floor on this machine: the time of its matmuls alone as XLA CPU runs them.

``ratio`` = TRL seconds / codex-jax seconds (> 1: codex-jax is faster).  bf16 rows run only
where the CPU has bf16 matmul instructions (avx512_bf16 or AMX; elsewhere both frameworks
emulate bf16 and the rows would only measure the emulation); the JSON says which.
Nothing here compares with a figure from another run or machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TORCH_PEAK = """
import json, time, torch
n = {n}; out = {{}}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    torch.mm(a, b)
    ts = []
    while len(ts) < 7 and sum(ts) < 20:  # an emulated bf16 mm can take seconds
        t = time.perf_counter(); torch.mm(a, b); ts.append(time.perf_counter() - t)
    out[name] = 2 * n ** 3 / sorted(ts)[len(ts) // 2] / 1e9
print(json.dumps({{"torch": torch.__version__, "threads": torch.get_num_threads(), "peak_gflops": out}}))
"""


def bf16_hardware() -> list[str]:
    """The CPU's bf16 matmul instruction sets (empty: none)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def jax_peaks(n: int) -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for name, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        ka, kb = jax.random.split(jax.random.key(0))
        a, b = jax.random.normal(ka, (n, n), dt), jax.random.normal(kb, (n, n), dt)
        # float32 results, as the model's matmuls (transformer.mixed_dot): XLA CPU computes a
        # bf16 dot with a bf16 result in float32, and would understate the bf16 peak
        dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        jax.block_until_ready(dot(a, b))
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            jax.block_until_ready(dot(a, b))
            ts.append(time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / statistics.median(ts) / 1e9
    return out


def child(algorithm: str, dtype: str, iterations: int, quick: bool) -> dict:
    """Runs in a fresh process: one codex-jax iteration timed, and this process's peak RSS."""
    import dataclasses

    sys.path.insert(0, str(HERE))
    import bench_transformer as bt
    import jax

    from codex_jax.config import TransformerConfig
    from codex_jax.run import train as loop
    from codex_jax.stages import grpo, ppo

    c = bt.QUICK if quick else bt.FULL
    cfg = dataclasses.replace(TransformerConfig(**c["model"]), dtype="bfloat16" if dtype == "bf16" else "float32")
    make, module, count = ((bt.make_ppo, ppo, bt.ppo_flops) if algorithm == "ppo" else
                           (bt.make_grpo, grpo, bt.grpo_flops))
    _, scfg, state, data = make(c, cfg)
    key = jax.random.key(11)
    res = bt.timed(lambda: loop.run_steps(state, data, key, step_fn=module.step, select_fn=module.select_batch,
                                          num_steps=1), iterations)
    flops = count(cfg, c["vocab"], c["rollouts"], c["prompt_len"], c["response_len"], scfg.epochs)["total"]
    return {"name": f"codex-jax {algorithm.upper()}", "dtype": dtype, "iteration_s": res["median"],
            "iteration_s_all": res["times"], "warmup_s": res["first_call"], "cores_used": res["cores_used"],
            "flops": flops, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_iterations_mb": _current_rss_mb()}  # the peak includes XLA's compile


def _current_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def _last_json(cmd: list[str], env=None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "process_wall_s": round(wall, 1)}
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise SystemExit(f"{' '.join(cmd)} printed no JSON line (exit {proc.returncode}):\n{tail}")


def table(r: dict) -> str:
    rows = ["| machine | work | dtype | codex-jax s / iteration (MFU) | TRL s / iteration (MFU) | ratio | "
            "peak RSS codex-jax (after the iterations) / TRL, MB |", "|---|---|---|---|---|---|---|"]
    for p in r["pairs"]:
        ours, peer = p["codex_jax"], p["trl"]
        rows.append(f"| {r['cpu']}, {r['cores']} cores | {p['work']} | {p['dtype']} | "
                    f"{ours['iteration_s']:.2f} ({ours['mfu']:.2f}) | {peer['iteration_s']:.2f} ({peer['mfu']:.2f}) | "
                    f"**{p['ratio']:.2f}x** | {ours['peak_rss_mb']:.0f} ({ours['rss_after_iterations_mb']:.0f}) / "
                    f"{peer['peak_rss_mb']:.0f} |")
    jp, tp = r["matmul_peak_gflops"]["jax"], r["matmul_peak_gflops"]["torch"]
    rows.append("")
    rows.append(f"Matmul peak measured idle at the start of this run (n = {r['matmul_n']}), GFLOP/s: "
                f"JAX fp32 {jp['fp32']:.0f} / bf16 {jp['bf16']:.0f}; "
                f"torch fp32 {tp['fp32']:.0f} / bf16 {tp['bf16']:.0f}. "
                f"bf16 matmul instructions: {', '.join(r['bf16_hardware']) or 'none'}.")
    for work, v in r.get("bf16_vs_trl_fastest", {}).items():
        rows.append(f"{work}: codex-jax bf16 against TRL's fastest setting here ({v['trl_fastest_dtype']}): "
                    f"**{v['ratio']:.2f}x**.")
    for p in r["pairs"]:
        if "target" in p:
            t = p["target"]
            rows.append(f"{p['work']} {p['dtype']}: {t['ratio']}x TRL {t['vs']} needs <= {t['budget_s']:.2f} s; "
                        f"the iteration's matmul floor here is {t['matmul_floor_s']:.2f} s "
                        f"({'within' if t['reachable'] else 'over'} the budget).")
    return "\n".join(rows)


# the targets: fp32 >= 2x TRL's fp32; bf16 >= 3x TRL's fastest setting
TARGET_RATIO = {"fp32": 2, "bf16": 3}


def set_targets(pairs: list[dict], floor: dict) -> None:
    """Each pair's target budget (s) beside the matmul floor of bench_matmul_floor.py."""
    for p in pairs:
        if p["dtype"] == "bf16":
            ref = min((q for q in pairs if q["work"] == p["work"]), key=lambda q: q["trl"]["iteration_s"])
        else:
            ref = p
        budget = ref["trl"]["iteration_s"] / TARGET_RATIO[p["dtype"]]
        fl = floor["results"][f"{p['work'].lower()}_{p['dtype']}"]["iteration_floor_s"]
        p["target"] = {"ratio": TARGET_RATIO[p["dtype"]], "vs": ref["dtype"], "budget_s": budget,
                       "matmul_floor_s": fl, "reachable": fl <= budget}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations per side (after one warm-up)")
    ap.add_argument("--quick", action="store_true", help="bench_transformer's quick recipe (a smoke run)")
    ap.add_argument("--table", metavar="FILE.md", help="also write the markdown table")
    ap.add_argument("--ppo-python", default=str(ROOT / ".peer-venv-ppo" / "bin" / "python"),
                    help="python of the TRL 1.12 venv (benchmarks/peers/README.md)")
    ap.add_argument("--grpo-python", default=str(ROOT / ".peer-venv-grpo" / "bin" / "python"),
                    help="python of the current-TRL venv")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (bf16 only on bf16 hardware)")
    ap.add_argument("--floor", action="store_true",
                    help="also run bench_matmul_floor.py and put each target's budget beside the matmul floor")
    ap.add_argument("--child", nargs=2, metavar=("ALGORITHM", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.iterations < 1:
        ap.error("--iterations must be >= 1")
    if args.child:
        print(json.dumps(child(*args.child, args.iterations, args.quick)))
        return {}
    for py in (args.ppo_python, args.grpo_python):
        if not pathlib.Path(py).exists():
            raise SystemExit(f"{py}: no such interpreter; set up the peer venvs (benchmarks/peers/README.md)")
    hardware = bf16_hardware()
    dtypes = [d for d in args.dtypes.split(",") if d == "fp32" or (d == "bf16" and hardware)]
    n = 1024 if args.quick else 2048
    load_before = os.getloadavg()
    peaks = {"jax": jax_peaks(n), "torch": _last_json([args.ppo_python, "-c", TORCH_PEAK.format(n=n)])["peak_gflops"]}
    quick = ["--quick"] if args.quick else []
    pairs = []
    for work, peer_py in (("PPO", args.ppo_python), ("GRPO", args.grpo_python)):
        for dtype in dtypes:
            ours = _last_json([sys.executable, __file__, "--child", work.lower(), dtype,
                               "--iterations", str(args.iterations), *quick])
            peer = _last_json([peer_py, str(HERE / "peers" / "trl_bench.py"), "--trainer", work.lower(),
                               "--dtype", dtype, "--iterations", str(args.iterations), *quick])
            ours["mfu"] = ours["flops"] / ours["iteration_s"] / (peaks["jax"][dtype] * 1e9)
            peer["mfu"] = ours["flops"] / peer["iteration_s"] / (peaks["torch"][dtype] * 1e9)  # same work
            pairs.append({"work": work, "dtype": dtype, "codex_jax": ours, "trl": peer,
                          "ratio": peer["iteration_s"] / ours["iteration_s"]})
            print(f"{work} {dtype}: codex-jax {ours['iteration_s']:.2f} s, TRL {peer['iteration_s']:.2f} s "
                  f"-> {pairs[-1]['ratio']:.2f}x", file=sys.stderr)
    # the bf16 target compares with TRL's FASTEST setting on this machine, fp32 or bf16
    vs_fastest = {}
    for work in ("PPO", "GRPO"):
        done = {p["dtype"]: p for p in pairs if p["work"] == work}
        if "bf16" in done:
            fastest = min(done.values(), key=lambda p: p["trl"]["iteration_s"])
            vs_fastest[work] = {"trl_fastest_dtype": fastest["dtype"],
                                "ratio": fastest["trl"]["iteration_s"] / done["bf16"]["codex_jax"]["iteration_s"]}
    floor = None
    if args.floor:
        floor = _last_json([sys.executable, str(HERE / "bench_matmul_floor.py"), "--dtypes", ",".join(dtypes),
                            *quick])
        set_targets(pairs, floor)
    sys.path.insert(0, str(HERE))
    from bench_transformer import cpu_model

    result = {"bench": "vs_trl", "quick": bool(args.quick), "cpu": cpu_model(), "cores": os.cpu_count(),
              "bf16_hardware": hardware, "dtypes_run": dtypes, "iterations": args.iterations,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "matmul_n": n,
              "matmul_peak_gflops": peaks, "pairs": pairs, "bf16_vs_trl_fastest": vs_fastest,
              "matmul_floor": floor}
    if args.table:
        pathlib.Path(args.table).write_text(table(result) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
