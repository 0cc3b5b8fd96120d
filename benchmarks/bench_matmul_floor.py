"""How fast could a PPO / GRPO iteration go with XLA CPU's own matmuls?  Prints ONE JSON line.

    python benchmarks/bench_matmul_floor.py [--quick] [--dtypes fp32,bf16] [--repeats N]

The update (epochs x minibatches gradients) is ~86% of a PPO iteration's FLOPs on the
reference recipe.  For one minibatch gradient (PPO: policy + value; GRPO: policy) this
script compiles the gradient as the trainer does, reads every ``dot`` out of the compiled
HLO (shapes, contracting / batch dimensions, operand and result dtypes: after XLA's
fusion, CSE and layout passes, so exactly the matmuls that run), and times a program
that runs only those matmuls, on random operands, as independent ops XLA may overlap.
So per dtype:

  * ``minibatch.grad_s``: the real gradient; ``minibatch.matmuls_s``: its matmuls alone
    (each the median of 3 alternated rounds of ``--repeats`` calls after a warm-up);
    ``matmul_share`` = matmuls_s / grad_s.
  * ``minibatch.dot_flops`` (2 x the product of each dot's output and contracted
    sizes, summed) beside ``counted_flops`` (bench_transformer's pass-by-pass count):
    the two must agree, or the HLO walk missed or double-counted a matmul.
  * ``iteration_floor_s`` = (generation + scoring FLOPs) / the idle matmul peak
    + epochs x minibatches x ``matmuls_s``: no iteration on this recipe can run faster
    with these matmul kernels (nothing else counted: no sampler, softmax, LayerNorm,
    optimiser); ``peak_floor_s`` = all FLOPs / the idle peak.

A target iteration time below ``iteration_floor_s`` is out of reach for XLA CPU on this
machine whatever the rest of the program does.  Peaks and floors hold only on the machine
and run that measured them (``cpu`` is recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_transformer as bt  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_vs_trl import jax_peaks  # noqa: E402

from codex_jax.config import TransformerConfig  # noqa: E402
from codex_jax.run.manifest import cpu_model  # noqa: E402
from codex_jax.stages import group_rl, ppo  # noqa: E402

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+ = (\w+)\[([\d,]*)\][^ ]* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def hlo_dots(hlo: str) -> list[dict]:
    """Every dot of a loop-free compiled HLO module: operand shapes / dtypes, result
    dtype and dimension numbers.  Instruction names are unique in a module, so one
    table of name -> (dtype, shape) resolves the operands of dots inside fusions too."""
    shapes = {}
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m:
            shapes[m.group(1)] = (m.group(2), _dims(m.group(3)))
    if " while(" in hlo:
        raise ValueError("hlo_dots: the module has a while loop; its dots would need trip counts")

    def field(rest, name):
        m = re.search(name + r"=\{([\d,]*)\}", rest)
        return _dims(m.group(1)) if m else ()

    dots = []
    for line in hlo.splitlines():
        m = _DOT.match(line)
        if not m:
            continue
        out_dtype, lhs, rhs, rest = m.group(1), m.group(3), m.group(4), m.group(5)
        dots.append({"lhs": shapes[lhs], "rhs": shapes[rhs], "out_dtype": out_dtype,
                     "dims": ((field(rest, "lhs_contracting_dims"), field(rest, "rhs_contracting_dims")),
                              (field(rest, "lhs_batch_dims"), field(rest, "rhs_batch_dims")))})
    if not dots:  # GPU / TPU backends lower matmuls to library calls, not HLO dots
        raise ValueError("hlo_dots: no dot in the compiled module; the floor is an XLA CPU measurement")
    return dots


def dot_flops(d: dict) -> float:
    """2 x (batch x free lhs x free rhs x contracted) sizes."""
    (lc, rc), (lb, rb) = d["dims"]
    lshape, rshape = d["lhs"][1], d["rhs"][1]
    contracted = math.prod(lshape[i] for i in lc)
    batch = math.prod(lshape[i] for i in lb)
    free_l = math.prod(s for i, s in enumerate(lshape) if i not in lc and i not in lb)
    free_r = math.prod(s for i, s in enumerate(rshape) if i not in rc and i not in rb)
    return 2.0 * batch * free_l * free_r * contracted


def matmul_program(dots: list[dict], key: jax.Array):
    """The dots alone on random operands: (jitted fn, its operands).  All outputs are
    returned, so none is dead code; no output feeds another dot, so XLA may run them
    concurrently, as the real gradient's independent matmuls."""
    operands = []
    for i, d in enumerate(dots):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        operands.append((jax.random.normal(ka, d["lhs"][1], DTYPES[d["lhs"][0]]),
                         jax.random.normal(kb, d["rhs"][1], DTYPES[d["rhs"][0]])))

    def run(ops):
        return [jax.lax.dot_general(a, b, d["dims"], preferred_element_type=DTYPES[d["out_dtype"]])
                for (a, b), d in zip(ops, dots)]

    return jax.jit(run), operands


def minibatch_gradient(algorithm: str, c: dict, cfg: TransformerConfig):
    """One minibatch gradient on a real rollout of the reference recipe -> (jitted grad
    fn, its args, its FLOPs counted pass by pass, the iteration's FLOP count by pass,
    gradients per iteration)."""
    vocab, b, p, t = c["vocab"], c["rollouts"], c["prompt_len"], c["response_len"]
    if algorithm == "ppo":
        _, scfg, state, data = bt.make_ppo(c, cfg)
        batch = ppo.select_batch(state, data, jax.random.key(5))
        roll = jax.jit(ppo.rollout)(state, batch, jax.random.key(3))
        fields = ("prompt", "prompt_mask", "response", "mask", "old_logp", "old_values", "returns", "advantages")
        ptx = {"ptx_tokens": batch["ptx_tokens"], "ptx_mask": batch["ptx_mask"]}
        trainable = {"policy": state.params["policy"], "value": state.params["value"]}
        loss = lambda tr, mb: ppo.loss_fn(tr, state, mb, ptx)
        flops = bt.ppo_flops(cfg, vocab, b, p, t, scfg.epochs)
    else:
        _, scfg, state, data = bt.make_grpo(c, cfg)
        batch = group_rl.select_batch(state, data, jax.random.key(5))
        roll = jax.jit(group_rl.rollout)(state, batch, jax.random.key(3))
        fields = group_rl.MINIBATCH_FIELDS
        trainable = {"policy": state.params["policy"]}
        loss = lambda tr, mb: group_rl.loss_fn(tr, state, mb)
        flops = bt.grpo_flops(cfg, vocab, b, p, t, scfg.epochs)
    mb = {k: roll[k][: scfg.minibatch_size] for k in fields}
    grad = jax.jit(lambda tr, mb: jax.grad(loss, has_aux=True)(tr, mb)[0])
    steps = scfg.epochs * scfg.minibatches
    return grad, (trainable, mb), flops["update"] / steps, flops, steps


def measure(algorithm: str, c: dict, cfg: TransformerConfig, repeats: int, peak_gflops: float) -> dict:
    grad, args, counted, flops, steps = minibatch_gradient(algorithm, c, cfg)
    dots = hlo_dots(grad.lower(*args).compile().as_text())
    program, operands = matmul_program(dots, jax.random.key(0))
    # alternate the two so that drift on a shared machine hits both alike
    grad_s, mm_s = [], []
    for _ in range(3):
        grad_s.append(bt.timed(lambda: grad(*args), repeats)["median"])
        mm_s.append(bt.timed(lambda: program(operands), repeats)["median"])
    grad_s, mm_s = statistics.median(grad_s), statistics.median(mm_s)
    found = sum(dot_flops(d) for d in dots)
    if abs(found / counted - 1) >= 0.01:
        print(f"WARNING: the compiled gradient's dots do {found:.4g} FLOPs, the pass-by-pass count "
              f"{counted:.4g}: the floor below is not this gradient's", file=sys.stderr)
    rest = flops["total"] - flops["update"]  # generation + scoring
    peak = peak_gflops * 1e9
    return {
        "minibatch": {"grad_s": grad_s, "matmuls_s": mm_s, "matmul_share": mm_s / grad_s, "dots": len(dots),
                      "dot_flops": found, "counted_flops": counted, "flops_agree": abs(found / counted - 1) < 0.01,
                      "matmul_gflops": found / mm_s / 1e9},
        "gradients_per_iteration": steps,
        "iteration_tflop": flops["total"] / 1e12,
        "iteration_floor_s": rest / peak + steps * mm_s,
        "peak_floor_s": flops["total"] / peak,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small config smoke run")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--algorithms", default="ppo,grpo", help="comma list of ppo, grpo")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    args = ap.parse_args(argv)
    c = dict(bt.QUICK if args.quick else bt.FULL)
    base = TransformerConfig(**c["model"])
    out = {"bench": "matmul_floor", "quick": args.quick, "cpu": cpu_model(), "jax": jax.__version__,
           "cpu_count": os.cpu_count(), "results": {}}
    peaks = jax_peaks(c["matmul_n"])  # idle, before any workload: GFLOP/s per dtype
    out["matmul_peak_gflops"] = peaks
    for name in args.dtypes.split(","):
        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(name)
        if dtype is None:
            ap.error(f"--dtypes: {name!r} is not fp32 or bf16")
        peak = peaks[name]
        cfg = dataclasses.replace(base, dtype=dtype)
        for algorithm in args.algorithms.split(","):
            if algorithm not in ("ppo", "grpo"):
                ap.error(f"--algorithms: {algorithm!r} is not ppo or grpo")
            res = measure(algorithm, c, cfg, max(3, args.repeats), peak)
            out["results"][f"{algorithm}_{name}"] = {"matmul_peak_gflops": peak, **res}
            mb = res["minibatch"]
            print(f"{algorithm} {name}: floor {res['iteration_floor_s']:.2f} s; one minibatch gradient "
                  f"{mb['grad_s'] * 1e3:.0f} ms, its matmuls alone {mb['matmuls_s'] * 1e3:.0f} ms", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
