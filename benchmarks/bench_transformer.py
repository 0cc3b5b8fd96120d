"""Speed benchmark of the transformer family: pretraining tokens/s, one PPO iteration and
one GRPO iteration, each as model-FLOP utilisation (MFU) against the machine's measured fp32 matmul peak;
prints ONE JSON line.

    python benchmarks/bench_transformer.py [--quick] [--table FILE.md] [--repeats N]
                                           [--profile DIR] [--ptx-rows R --ptx-len L]

What is measured (all compiled, all after a warm-up call, each the median of >= 3 timed
calls - ``--repeats`` PPO iterations, >= 5 of everything cheaper - every call ending in
``block_until_ready``):

  * ``matmul_peak``: ``jax.jit(jnp.dot)`` of two n x n float32 matrices (n = 2048; 1024
    with --quick), 2 n^3 FLOPs per call, the median of 9 samples taken at the start of
    the run before any workload, on an otherwise idle machine (the 1-minute load average
    then is recorded; at >= 0.5 the script warns that the peak is understated).  The
    headline ``pretrain_mfu_vs_idle_peak`` / ``ppo_mfu_vs_idle_peak`` are against it.
  * Secondary MFU figures for a shared machine, where other jobs take cores mid-run:
    ``pretrain_mfu`` / ``ppo_mfu`` are the median over the timed calls of (FLOPs /
    seconds) / (mean of the peak samples just before and just after that call), and
    ``*_vs_run_peak`` / ``*_vs_best_peak`` use the median / best of all samples; with the
    load average, the Linux CPU pressure (PSI), the cores this process got during the
    timed calls (``cores_used``) and ``contended`` (< 1.5 cores, or samples spread > 1.5x).
  * No figure of another library or machine is built in: ``--peer-cmd CMD`` runs a peer's
    benchmark of the same work in this run, on this machine, and only then is a ratio printed.
  * Pretraining: ``loop.run_steps(step_fn=lm.step, select_fn=lm.select_batch)`` of
    ``pretrain_steps`` steps on uniformly random token rows (ids 4..V-1, full masks).
    FLOPs per step = ``transformer.count_flops(cfg, V, batch, L, kind="train")``, which
    is forward + backward = 3 x forward =
        6 * N * tokens + 12 * layers * d * L^2 * batch
    with N = layers * (4 + 2 * mlp_ratio) * d^2 + d * V the matmul weights (QKV, attention
    output, the two MLP matrices and the tied LM head; embedding gathers, LayerNorms,
    biases, softmaxes and the optimiser are not counted) and the attention term counted
    over the full L x L square (the dense implementation computes it; the causal half is
    masked).  This is the PaLM-appendix MFU convention (6N + 12 * layers * d * L per
    token).  The script checks the identity and that N equals the number of kernel /
    embedding weights in the initialised parameters.
  * PPO: one ``ppo.step`` (``run_steps`` with num_steps=1), ``ppo.rollout`` alone and
    ``family.sample`` alone, each jitted, on the same state / prompts / key.
        scoring_s = rollout_s - generation_s   (ref, value and reward passes + GAE)
        update_s  = iteration_s - rollout_s    (epochs x minibatches of fwd + bwd + Adam)
    ``breakdown`` times the pieces separately (prefill, the decode scan, one decode step,
    each scoring pass, one minibatch gradient, one optimiser update) to show where the
    time goes.
    PPO FLOPs are counted pass by pass as the implementation computes them
    (``ppo_flops``): generation = prefill of [BOS] + prompt into a cache of S = P + T slots
    (LM head only on the last prompt position) + (T - 1) single-token decode steps that
    attend over all S slots (the old log-probs are read off these logits: no pass of their
    own); teacher-forced passes run the trunk over 1 + P + T tokens (full square
    attention) except the last block, whose queries, output projection and MLP run only on
    the rows read (T for log-probs and values, 1 for the reward), and the LM head only on
    the T response positions.  The update counts epochs x rollouts rows of
    (policy + value) forward + backward = 3 x forward.  The reference config gives
    0.037 (generation) + 0.082 (scoring) + 0.713 (update) = 0.832 TFLOP.  ``ppo_tflop_countflops`` is the
    coarser ``count_flops`` view (head on every one of the P + T tokens, ``decode`` over
    P + T steps) - the ~1.0 TFLOP figure quoted for the reference config.

  * GRPO: one ``grpo.step`` (``run_steps``, num_steps=1) on the same model, the same
    reference and reward networks and the same number of generated tokens (``rollouts``
    responses of ``response_len`` tokens: ``rollouts / group_size`` prompts x
    ``group_size``, group_size 4), epochs and minibatches, timed like the PPO iteration.
    Its FLOPs (``grpo_flops``) are PPO's passes without the value network: generation,
    reference log-probs and the reward pass (scoring), then epochs x rollouts
    rows of policy forward + backward (update).  ``grpo_mfu_vs_idle_peak`` is against the
    same idle peak; ``ppo_over_grpo_time`` = PPO iteration s / GRPO iteration s.

At ``ptx_coef = 0`` the PPO-ptx term is left out of every minibatch gradient (it is
static config) and its loss is reported from one forward pass per iteration over the
demonstration batch; the benchmark feeds one 2-token demonstration row
(``ptx_batch_size = 1``), and ``--ptx-rows R --ptx-len L`` measures what that one
reporting pass costs for a realistic batch.

``--profile DIR`` traces one pretraining gradient and one PPO iteration with
``jax.profiler`` and adds ``profile``: thunk time per op category (from the HLO op_name
metadata) and the top single ops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config import LMConfig, OptimConfig, PPOConfig, TransformerConfig
from codex_jax.config.algorithms import GRPOConfig
from codex_jax.core.optim import apply_gradients
from codex_jax.models import generate
from codex_jax.models import transformer as tf
from codex_jax.models.registry import make_family
from codex_jax.run import train as loop
from codex_jax.run.manifest import cpu_model
from codex_jax.stages import grpo, lm, ppo

PRETRAIN_TARGET_MFU = 0.50
PPO_TARGET_MFU = 0.40
ISSUE_PPO_TFLOP = 1.0
GRPO_GROUP_SIZE = 4  # 32 rollouts = 8 prompts x 4 responses (quick: 2 x 4)

FULL = {
    "model": {"layers": 4, "d_model": 256, "heads": 4, "context_len": 256},
    "vocab": 8192,
    "pretrain_len": 256, "pretrain_batch": 8, "pretrain_steps": 5,
    "prompt_len": 64, "response_len": 64, "rollouts": 32, "epochs": 4, "minibatches": 4,
    "matmul_n": 2048,
}
QUICK = {
    "model": {"layers": 2, "d_model": 128, "heads": 4, "context_len": 64},
    "vocab": 2048,
    "pretrain_len": 64, "pretrain_batch": 8, "pretrain_steps": 3,
    "prompt_len": 16, "response_len": 16, "rollouts": 8, "epochs": 2, "minibatches": 2,
    "matmul_n": 1024,
}


# --------------------------------------------------------------------------- timing
class Peak:
    """The fp32 matmul peak, sampled throughout the run: ``jax.jit(jnp.dot)`` of two n x n
    matrices, 2 n^3 FLOPs per call.  On a shared machine the available compute drifts
    (here by up to 2x within a minute), so every timed workload call is bracketed by a
    sample before and after it and its MFU is taken against that local peak."""

    def __init__(self, n: int):
        ka, kb = jax.random.split(jax.random.key(123))
        self.n = n
        self.a = jax.random.normal(ka, (n, n), jnp.float32)
        self.b = jax.random.normal(kb, (n, n), jnp.float32)
        self.dot = jax.jit(jnp.dot)
        jax.block_until_ready(self.dot(self.a, self.b))
        self.samples: list[float] = []

    def sample(self) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(self.dot(self.a, self.b))
        gflops = 2.0 * self.n ** 3 / (time.perf_counter() - t0) / 1e9
        self.samples.append(gflops)
        return gflops

    def block(self, repeats: int) -> float:
        """Median of ``repeats`` back-to-back samples."""
        return statistics.median([self.sample() for _ in range(repeats)])


def timed(fn, repeats: int, peak: Peak | None = None) -> dict:
    """Warm-up (compile) call, then ``repeats`` timed calls, each bracketed by matmul
    peak samples when ``peak`` is given.  -> seconds (median, all) and local peaks."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times, peaks, cores = [], [], []
    for _ in range(repeats):
        before = peak.sample() if peak else None
        c0, t0 = os.times(), time.perf_counter()
        jax.block_until_ready(fn())
        c1, t1 = os.times(), time.perf_counter()
        times.append(t1 - t0)
        cores.append((c1.user + c1.system - c0.user - c0.system) / (t1 - t0))
        if peak:
            peaks.append(0.5 * (before + peak.sample()))
    out = {"median": statistics.median(times), "min": min(times), "times": times, "first_call": first,
           "cores_used": statistics.median(cores)}
    if peak:
        out["peaks_gflops"] = peaks
    return out


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 60 s in which runnable tasks waited for a CPU (None if absent)."""
    try:
        with open("/proc/pressure/cpu") as fh:
            return float(fh.readline().split("avg60=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def paired_mfu(flops: float, t: dict) -> float:
    """Median over the timed calls of (flops / seconds) / (the peak sampled around it)."""
    return statistics.median(flops / s / (p * 1e9) for s, p in zip(t["times"], t["peaks_gflops"]))


# --------------------------------------------------------------------------- FLOP model
def matmul_weights(cfg: TransformerConfig, vocab: int, head: str = "lm") -> int:
    """N of count_flops: layers * (4 + 2 mlp_ratio) d^2 (+ d V for the tied LM head)."""
    d = cfg.d_model
    return cfg.layers * (4 + 2 * cfg.mlp_ratio) * d * d + (d * vocab if head == "lm" else d)


def param_matmul_weights(params) -> int:
    """Kernel + embedding weights of initialised parameters (biases, norms excluded)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(int(x.size) for path, x in flat
               if getattr(path[-1], "key", None) in ("kernel", "embedding"))


def check_count_flops(cfg: TransformerConfig, vocab: int, batch: int, length: int, params) -> dict:
    """count_flops(train) == 6 N tokens + 12 layers d L^2 batch, N == the params' kernels."""
    n = matmul_weights(cfg, vocab)
    tokens = batch * length
    attention = 12.0 * cfg.layers * cfg.d_model * length * length * batch
    expected = 6.0 * n * tokens + attention
    got = tf.count_flops(cfg, vocab, batch, length, kind="train")
    n_params = param_matmul_weights(params)
    return {"count_flops_train": got, "six_n_tokens": 6.0 * n * tokens, "attention_flops": attention,
            "attention_share": attention / got, "identity_ok": abs(got - expected) <= 1e-9 * expected,
            "n_matmul_weights": n, "n_matmul_weights_from_params": n_params, "n_ok": n == n_params,
            "n_params_total": tf.num_params(params)}


def ppo_flops(cfg: TransformerConfig, vocab: int, b: int, p: int, t: int, epochs: int) -> dict:
    """FLOPs of one PPO iteration, pass by pass, as the implementation computes them."""
    d, layers = cfg.d_model, cfg.layers
    trunk = matmul_weights(cfg, vocab, head="none") - d  # layers (4 + 2r) d^2
    per_layer = trunk // layers

    def dense(rows, lm_rows):  # trunk over `rows` tokens, LM head over `lm_rows`
        return 2.0 * trunk * rows + 2.0 * d * vocab * lm_rows

    def attn(queries, keys):  # scores + mixing, per layer 4 d q k
        return 4.0 * layers * d * queries * keys

    def forced(rows, read):
        """A teacher-forced trunk pass over `rows` tokens whose caller reads `read` rows:
        the last block runs its fused QKV projection on every row but attention queries,
        the output projection and the MLP only on the read rows (transformer.hidden_states)."""
        last_all, last_read = 3 * d * d, per_layer - 3 * d * d
        dense_flops = 2.0 * ((layers - 1) * per_layer * rows + last_all * rows + last_read * read)
        attn_flops = 4.0 * d * ((layers - 1) * rows * rows + read * rows)
        return dense_flops + attn_flops

    slots = p + max(t, 1)
    length = 1 + p + t
    prefill = b * (dense(p + 1, 1) + attn(p + 1, slots))
    decode = (t - 1) * b * (dense(1, 1) + attn(1, slots))
    # old log-probs come from the sampling pass (no FLOPs of their own)
    policy_fwd = b * (forced(length, t) + 2.0 * d * vocab * t)  # ref log-probs, update
    scalar_fwd = b * (forced(length, t) + 2.0 * d * t)  # value (T heads)
    reward_fwd = b * (forced(length, 1) + 2.0 * d)  # the score at the last response token
    out = {
        "generation_prefill": prefill,
        "generation_decode": decode,
        "old_logprobs": 0.0,
        "ref_logprobs": policy_fwd,
        "value": scalar_fwd,
        "reward": reward_fwd,
        "update_policy": 3.0 * epochs * policy_fwd,
        "update_value": 3.0 * epochs * scalar_fwd,
    }
    out["generation"] = prefill + decode
    out["scoring"] = policy_fwd + scalar_fwd + reward_fwd
    out["update"] = out["update_policy"] + out["update_value"]
    out["total"] = out["generation"] + out["scoring"] + out["update"]
    # the coarse count_flops view: every pass over P + T tokens, LM head on all of them
    def cf(kind, head):
        return tf.count_flops(cfg, vocab, b, p + t, kind=kind, head=head)

    out["countflops_total"] = (cf("decode", "lm") + 2 * cf("forward", "lm") + 2 * cf("forward", "scalar")
                               + epochs * (cf("train", "lm") + cf("train", "scalar")))
    return out


def grpo_flops(cfg: TransformerConfig, vocab: int, b: int, p: int, t: int, epochs: int) -> dict:
    """FLOPs of one GRPO iteration, pass by pass (``ppo_flops``' passes, no value network):
    generation, reference log-probs, the reward pass, and epochs x b rows of
    policy forward + backward."""
    f = ppo_flops(cfg, vocab, b, p, t, epochs)
    out = {k: f[k] for k in ("generation_prefill", "generation_decode", "old_logprobs", "ref_logprobs", "reward",
                             "update_policy", "generation")}
    out["scoring"] = f["old_logprobs"] + f["ref_logprobs"] + f["reward"]
    out["update"] = f["update_policy"]
    out["total"] = out["generation"] + out["scoring"] + out["update"]
    return out


# --------------------------------------------------------------------------- pretraining
def bench_pretrain(c: dict, cfg: TransformerConfig, repeats: int, peak: Peak) -> dict:
    vocab, length, batch, steps = c["vocab"], c["pretrain_len"], c["pretrain_batch"], c["pretrain_steps"]
    family = make_family("transformer", vocab, cfg)
    lcfg = LMConfig(steps=1000, batch_size=batch, log_every=steps, optim=OptimConfig(lr=1e-3))
    state = lm.init(jax.random.key(0), lcfg, family)
    rows = np.random.default_rng(0).integers(4, vocab, size=(batch * steps, length), dtype=np.int32)
    data = lm.make_data(rows, np.ones(rows.shape, np.float32), batch)
    key = jax.random.key(1)
    run = lambda: loop.run_steps(state, data, key, step_fn=lm.step,
                                 select_fn=lm.select_batch, num_steps=steps)
    t = timed(run, repeats, peak)
    flops_step = tf.count_flops(cfg, vocab, batch, length, kind="train")
    step_s = t["median"] / steps
    out = {"batch": batch, "seq_len": length, "steps_per_call": steps,
           "step_s": step_s, "step_s_all": [x / steps for x in t["times"]],
           "peaks_gflops": t["peaks_gflops"], "cores_used": t["cores_used"],
           "compile_and_first_call_s": t["first_call"],
           "tokens_per_s": batch * length / step_s,
           "flops_per_step": flops_step, "achieved_gflops": flops_step / step_s / 1e9,
           "mfu_paired": paired_mfu(steps * flops_step, t),
           "count_flops_check": check_count_flops(cfg, vocab, batch, length, state.params)}
    # the gradient alone (forward + backward, no optimiser, no scan) for comparison
    batch_data = {**data, "tokens": data["tokens"][:batch], "mask": data["mask"][:batch]}
    grad = jax.jit(lambda p, bd: jax.grad(lm.loss_fn, has_aux=True)(p, family, bd)[0])
    out["grad_only_s"] = timed(lambda: grad(state.params, batch_data), repeats)["median"]
    out["_profile"] = (grad, (state.params, batch_data))
    return out


# --------------------------------------------------------------------------- PPO
def make_ppo(c: dict, cfg: TransformerConfig, ptx_rows: int = 1, ptx_len: int = 2):
    """Family, config, state and a prompt pool of the reference recipe."""
    vocab, b, p, t = c["vocab"], c["rollouts"], c["prompt_len"], c["response_len"]
    family = make_family("transformer", vocab, cfg)
    pcfg = PPOConfig(iterations=1000, rollouts=b, response_len=t, epochs=c["epochs"],
                     minibatches=c["minibatches"], gamma=1.0, gae_lambda=0.95,
                     ptx_batch_size=ptx_rows, optim=OptimConfig(lr=1e-5, schedule="constant"))
    k_policy, k_value, k_reward = jax.random.split(jax.random.key(7), 3)
    policy = family.init_policy(k_policy)
    ref = jax.tree_util.tree_map(jnp.copy, policy)  # the frozen reference: a copy
    reward = family.init_reward(k_reward)
    penalty = ppo.penalty_vector(vocab, [5, 6], 5.0)
    state = ppo.init(pcfg, family, policy, ref, reward, penalty, value=family.init_value(k_value))
    rng = np.random.default_rng(1)
    data = {"prompt": jnp.asarray(rng.integers(4, vocab, size=(b, p), dtype=np.int32)),
            "prompt_mask": jnp.ones((b, p), jnp.float32),
            "ptx_tokens": jnp.asarray(rng.integers(4, vocab, size=(ptx_rows, ptx_len), dtype=np.int32)),
            "ptx_mask": jnp.ones((ptx_rows, ptx_len), jnp.float32)}
    return family, pcfg, state, data


def bench_ppo(c: dict, cfg: TransformerConfig, repeats: int, peak: Peak, breakdown: bool,
              ptx_rows: int = 1, ptx_len: int = 2) -> dict:
    family, pcfg, state, data = make_ppo(c, cfg, ptx_rows, ptx_len)
    vocab, b, p, t = c["vocab"], c["rollouts"], c["prompt_len"], c["response_len"]
    key = jax.random.key(11)
    # the very batch / sample key that run_steps uses for step 0 (see loop.run_steps)
    batch = ppo.select_batch(state, data, jax.random.fold_in(jax.random.fold_in(key, 0), 0))
    k_sample = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 1), 0))[0]

    iteration = lambda: loop.run_steps(state, data, key, step_fn=ppo.step,
                                       select_fn=ppo.select_batch, num_steps=1)
    rollout = jax.jit(ppo.rollout)
    sample = jax.jit(family.sample, static_argnums=(4,))
    res = {
        "iteration": timed(iteration, repeats, peak),
        "rollout": timed(lambda: rollout(state, batch, k_sample), max(repeats, 5), peak),
        "generation": timed(lambda: sample(state.params["policy"], k_sample, batch["prompt"], batch["prompt_mask"],
                                           t, pcfg.temperature), max(repeats, 5), peak),
    }
    it, ro, gen = (res[k]["median"] for k in ("iteration", "rollout", "generation"))
    scoring, update = ro - gen, it - ro
    flops = ppo_flops(cfg, vocab, b, p, t, pcfg.epochs)
    out = {
        "iteration_s": it, "rollout_s": ro, "generation_s": gen, "scoring_s": scoring, "update_s": update,
        **{f"{k}_s_all": v["times"] for k, v in res.items()},
        "iteration_peaks_gflops": res["iteration"]["peaks_gflops"],
        "cores_used": {k: v["cores_used"] for k, v in res.items()},
        "compile_and_first_call_s": {k: v["first_call"] for k, v in res.items()},
        "generation_share": gen / it, "scoring_share": scoring / it, "update_share": update / it,
        "generated_tokens_per_s": b * t / it, "generation_tokens_per_s": b * t / gen,
        "flops": flops,
        "achieved_gflops": flops["total"] / it / 1e9,
        "mfu_paired": paired_mfu(flops["total"], res["iteration"]),
        "mfu_countflops_paired": paired_mfu(flops["countflops_total"], res["iteration"]),
        "phase_gflops": {"generation": flops["generation"] / gen / 1e9,
                         "scoring": flops["scoring"] / max(scoring, 1e-9) / 1e9,
                         "update": flops["update"] / max(update, 1e-9) / 1e9},
        "generation_mfu_paired": paired_mfu(flops["generation"], res["generation"]),
        "_profile": (jax.jit(lambda s, d, k: loop.run_steps(s, d, k, step_fn=ppo.step,
                                                            select_fn=ppo.select_batch, num_steps=1)),
                     (state, data, key)),
    }
    if breakdown:
        out["breakdown"] = ppo_breakdown(family, pcfg, state, batch, k_sample, repeats)
    return out


def make_grpo(c: dict, cfg: TransformerConfig):
    """Family, config, state and prompt pool of GRPO on the reference recipe: the PPO
    benchmark's policy, reference and reward network (no value network)."""
    vocab, b, p, t = c["vocab"], c["rollouts"], c["prompt_len"], c["response_len"]
    family = make_family("transformer", vocab, cfg)
    gcfg = GRPOConfig(iterations=1000, rollouts=b, group_size=GRPO_GROUP_SIZE, response_len=t, epochs=c["epochs"],
                      minibatches=c["minibatches"], optim=OptimConfig(lr=1e-5, schedule="constant"))
    k_policy, _, k_reward = jax.random.split(jax.random.key(7), 3)  # PPO's policy and reward inits
    policy = family.init_policy(k_policy)
    ref = jax.tree_util.tree_map(jnp.copy, policy)
    state = grpo.init(gcfg, family, policy, ref, family.init_reward(k_reward), ppo.penalty_vector(vocab, [5, 6], 5.0))
    rng = np.random.default_rng(1)
    data = {"prompt": jnp.asarray(rng.integers(4, vocab, size=(b, p), dtype=np.int32)),
            "prompt_mask": jnp.ones((b, p), jnp.float32)}
    return family, gcfg, state, data


def bench_grpo(c: dict, cfg: TransformerConfig, repeats: int, peak: Peak) -> dict:
    """One GRPO iteration on the reference recipe: the PPO benchmark's policy, reference,
    reward network and prompt pool, the same generated tokens, epochs and minibatches."""
    vocab, b, p, t = c["vocab"], c["rollouts"], c["prompt_len"], c["response_len"]
    family, gcfg, state, data = make_grpo(c, cfg)
    key = jax.random.key(11)
    iteration = lambda: loop.run_steps(state, data, key, step_fn=grpo.step, select_fn=grpo.select_batch,
                                       num_steps=1)
    res = timed(iteration, repeats, peak)
    flops = grpo_flops(cfg, vocab, b, p, t, gcfg.epochs)
    it = res["median"]
    return {"group_size": gcfg.group_size, "prompts": gcfg.groups, "rollouts": b, "response_len": t,
            "epochs": gcfg.epochs, "minibatches": gcfg.minibatches,
            "kl": f"{gcfg.kl_estimator} in the {gcfg.kl_placement}",
            "iteration_s": it, "iteration_s_all": res["times"], "iteration_peaks_gflops": res["peaks_gflops"],
            "cores_used": res["cores_used"], "compile_and_first_call_s": res["first_call"],
            "generated_tokens_per_s": b * t / it, "flops": flops, "achieved_gflops": flops["total"] / it / 1e9,
            "mfu_paired": paired_mfu(flops["total"], res)}


def ppo_breakdown(family, pcfg, state, batch, k_sample, repeats: int) -> dict:
    """Each piece of the iteration on its own (jitted; median seconds)."""
    cfg_t, vocab = family.sample.args[0], family.vocab_size  # partial(generate.sample, cfg, V)
    prompt, pmask, t, params = batch["prompt"], batch["prompt_mask"], pcfg.response_len, state.params["policy"]
    reps, many = max(repeats, 5), max(repeats, 15)
    out = {}
    response = jax.jit(family.sample, static_argnums=(4,))(params, k_sample, prompt, pmask, t, 1.0)
    mask = ppo.response_mask(response, family.eos_id)

    pre = jax.jit(generate.prefill, static_argnums=(0, 1, 5))
    out["prefill_s"] = timed(lambda: pre(cfg_t, vocab, params, prompt, pmask, t), reps)["median"]
    logits, cache, valid, n = pre(cfg_t, vocab, params, prompt, pmask, t)
    step = jax.jit(generate.decode_step, static_argnums=(0, 1, 6))
    out["decode_step_s"] = timed(lambda: step(cfg_t, vocab, params, cache, valid, n, prompt.shape[1],
                                              response[:, 0], jnp.int32(0)), many)["median"]
    # the sampler alone: top-k / top-p filter + inverse-CDF draw over [B, V]
    choose = jax.jit(lambda lg, k: generate.inverse_cdf_draw(
        jax.random.uniform(k, lg.shape[:1]), generate.filter_logits(lg, cfg_t.top_k, cfg_t.top_p)))
    out["sampler_step_s"] = timed(lambda: choose(logits, k_sample), many)["median"]
    # prefill + (T - 1) teacher-forced decode steps: sampling without the sampler
    dl = jax.jit(generate.decode_logits, static_argnums=(0, 1))
    out["decode_scan_no_sampler_s"] = timed(lambda: dl(cfg_t, vocab, params, prompt, pmask, response),
                                            reps)["median"]

    lp = jax.jit(family.response_logprobs)
    out["logprob_pass_s"] = timed(lambda: lp(params, prompt, pmask, response, 1.0), reps)["median"]
    vals = jax.jit(family.values)
    out["value_pass_s"] = timed(lambda: vals(state.params["value"], prompt, pmask, response), reps)["median"]
    rew = jax.jit(family.reward_token_scores)
    out["reward_pass_s"] = timed(lambda: rew(state.extras["reward"], prompt, pmask, response, mask), reps)["median"]

    # one minibatch: gradient of the PPO loss (policy + value forward + backward), then Adam
    roll = jax.jit(ppo.rollout)(state, batch, k_sample)
    fields = ("prompt", "prompt_mask", "response", "mask", "old_logp", "old_values", "returns", "advantages")
    mb = {k: roll[k][:pcfg.minibatch_size] for k in fields}
    ptx = {"ptx_tokens": batch["ptx_tokens"], "ptx_mask": batch["ptx_mask"]}
    trainable = {"policy": state.params["policy"], "value": state.params["value"]}
    grad = jax.jit(lambda tr, s, m, x: jax.grad(ppo.loss_fn, has_aux=True)(tr, s, m, x)[0])
    out["minibatch_grad_s"] = timed(lambda: grad(trainable, state, mb, ptx), reps)["median"]
    grads = grad(trainable, state, mb, ptx)
    upd = jax.jit(lambda tr, o, g: apply_gradients(state.tx, tr, o, g))
    out["optimizer_update_s"] = timed(lambda: upd(trainable, state.opt_state, grads), reps)["median"]
    out["minibatches_per_iteration"] = pcfg.epochs * pcfg.minibatches
    # derived: how generation and the update split
    steps = t - 1
    out["sampler_share_of_generation_est"] = steps * out["sampler_step_s"] / max(
        out["decode_scan_no_sampler_s"] + steps * out["sampler_step_s"], 1e-9)
    out["update_est_s"] = out["minibatches_per_iteration"] * (out["minibatch_grad_s"] + out["optimizer_update_s"])
    return out


# --------------------------------------------------------------------------- profile
def profile_ops(fn, args, trace_dir: str, top: int = 12) -> dict:
    """One traced call (``jax.profiler``); thunk durations summed by coarse op category
    (from the HLO op_name metadata) and the top single instructions.  Durations are
    summed over the thread pool, so they can exceed wall time where ops overlap."""
    import collections
    import glob
    import re

    hlo = fn.lower(*args).compile().as_text()
    meta = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo)}
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        wall = time.perf_counter() - t0
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))

    def category(name: str) -> str:
        op = meta.get(name, "")
        bwd = ":bwd" if "transpose(" in op else ""
        if "_uniform" in op or "threefry" in op or "choose" in op or "inverse_cdf_draw" in op:
            return "sampler (rng + inverse-CDF draw over V)"
        if "transpose(jvp())/div" in op or "transpose(jvp(jit(log_softmax)))" == op.rsplit("/", 1)[-1] \
                or op.endswith("transpose(jvp(jit(log_softmax)))"):
            return "lm_head: d logits transposed copy [V, tokens]"
        if "log_softmax" in op or "take_along_axis" in op or "logsumexp" in op:
            return "log_softmax / gather over V" + bwd
        if "Transformer.logits" in op:
            return "lm_head matmul" + bwd
        for k in ("qkv", "attn_out", "mlp_in", "mlp_out"):
            if f"/{k}/" in op:
                return f"{k} matmul" + bwd
        if "bhqd,bhkd" in op or "bhqk,bhkd" in op or (name.startswith("dot") and not op):
            return "attention einsums" + bwd
        if "/ln_" in op or "final_norm" in op:
            return "layernorm" + bwd
        if "softmax" in op:
            return "attention softmax" + bwd
        if "_where" in op or "isfinite" in op or "adam" in op or "optax" in op:
            return "optimizer + non-finite guard (where)"
        if "_trunk/blocks_" in op and "add_any" in op:
            return "qkv split / residual grads (pad + add)"
        if "_trunk/blocks_" in op and ("concatenate" in op or "/sin" in op or "/cos" in op):
            return "rotary" + bwd
        if "_trunk/blocks_" in op and ("tanh" in op or "/mul" in op or "gelu" in op):
            return "gelu / elementwise" + bwd
        if "_trunk/blocks_" in op and "reduce_sum" in op:
            return "bias / norm reductions" + bwd
        if "dynamic_update_slice" in op or "dynamic_slice" in op:
            return "kv cache / slicing"
        return "other" + bwd

    by_cat, by_name = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "while", "call", "conditional")):
                    continue
                by_cat[category(ev.name)] += ev.duration_ns / 1e6
                by_name[ev.name] += ev.duration_ns / 1e6
    total = sum(by_cat.values())
    return {"wall_ms": 1e3 * wall, "op_ms_total": total,
            "by_category_ms": {k: round(v, 1) for k, v in by_cat.most_common()},
            "top_ops": [{"op": k, "ms": round(v, 1), "op_name": meta.get(k, "")[-100:]}
                        for k, v in by_name.most_common(top)]}


def run_peer(cmd: str) -> dict:
    """Runs a peer's benchmark command now and returns the last JSON object it printed."""
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.strip().startswith("{"):
            peer = json.loads(line)
            if "iteration_s" in peer:
                return peer
    raise SystemExit(f"--peer-cmd printed no JSON line with 'iteration_s' (exit {proc.returncode}): "
                     f"{proc.stderr.strip()[-500:]}")


# --------------------------------------------------------------------------- report
def table(r: dict) -> str:
    pt, pp, f, g = r["pretrain"], r["ppo"], r["ppo"]["flops"], r["grpo"]
    rows = [
        ("config", ", ".join(f"{k}={v}" for k, v in r["config"].items())),
        ("load average (1/5/15 min) before / after", f"{r['loadavg_before']} / {r['loadavg_after']}"),
        ("CPU pressure (PSI some avg60, %) before / after",
         f"{r['cpu_pressure_avg60_before']} / {r['cpu_pressure_avg60_after']}"),
        (f"cores this process used during the PPO iterations (of {r['cpu_count']})",
         f"{pp['cores_used']['iteration']:.2f}"),
        ("contended (cores used < 1.5 or peak samples spread > 1.5x)", str(r["contended"])),
        ("CPU", r["cpu"]),
        (f"fp32 matmul peak measured idle at the start of this run, jnp.dot {r['matmul_n']}x{r['matmul_n']} "
         f"@ {r['matmul_n']}x{r['matmul_n']}, GFLOP/s (1-min load then: "
         f"{r['matmul_peak']['loadavg_1min_at_measurement']})", f"{r['matmul_peak']['gflops']:.1f}"),
        ("MFU vs that idle peak: pretrain / PPO",
         f"{r['pretrain_mfu_vs_idle_peak']:.3f} / {r['ppo_mfu_vs_idle_peak']:.3f}"),
        ("fp32 matmul peak, all samples in the run, GFLOP/s (median; min-max of samples)",
         (f"{r['matmul_peak_gflops']:.1f} ({r['matmul_peak_min_gflops']:.0f}-{r['matmul_peak_max_gflops']:.0f}, "
         f"{r['matmul_peak_samples']} samples)")),
        ("pretrain: batch x seq, step s", f"{pt['batch']} x {pt['seq_len']}, {pt['step_s']:.3f}"),
        ("pretrain: tokens/s", f"{r['pretrain_tokens_per_s']:.0f}"),
        ("pretrain: GFLOP/s (count_flops train)", f"{pt['achieved_gflops']:.1f}"),
        (f"**pretrain MFU** (target >= {PRETRAIN_TARGET_MFU})",
         (f"**{r['pretrain_mfu']:.3f}** ({'meets' if r['meets_pretrain_target'] else 'misses'}; "
         f"vs run-median peak {r['pretrain_mfu_vs_run_peak']:.3f}; "
         f"vs best peak {r['pretrain_mfu_vs_best_peak']:.3f})")),
        ("PPO: iteration s", f"{r['ppo_iteration_s']:.2f}"),
        ("PPO: generation s (share)", f"{r['generation_s']:.2f} ({r['generation_share']:.0%})"),
        ("PPO: scoring s (share)", f"{r['scoring_s']:.2f} ({r['scoring_share']:.0%})"),
        ("PPO: update s (share)", f"{r['update_s']:.2f} ({r['update_share']:.0%})"),
        ("PPO: generated tokens/s (per iteration / generation alone)",
         f"{r['generated_tokens_per_s']:.0f} / {r['generation_tokens_per_s']:.0f}"),
        ("PPO: TFLOP per iteration (as implemented / count_flops view)",
         f"{r['ppo_tflop_per_iteration']:.3f} / {r['ppo_tflop_countflops']:.3f}"),
        ("PPO: TFLOP generation / scoring / update",
         f"{f['generation'] / 1e12:.3f} / {f['scoring'] / 1e12:.3f} / {f['update'] / 1e12:.3f}"),
        ("PPO: GFLOP/s generation / scoring / update",
         " / ".join(f"{pp['phase_gflops'][k]:.1f}" for k in ("generation", "scoring", "update"))),
        (f"**PPO MFU** (target >= {PPO_TARGET_MFU})",
         (f"**{r['ppo_mfu']:.3f}** ({'meets' if r['meets_ppo_target'] else 'misses'}; "
         f"vs run-median peak {r['ppo_mfu_vs_run_peak']:.3f}; vs best peak {r['ppo_mfu_vs_best_peak']:.3f}; "
         f"count_flops view {r['ppo_mfu_countflops']:.3f})")),
        ("PPO: iteration s at the target MFU (run-median peak)", f"{r['ppo_iteration_s_at_target']:.2f}"),
        (f"GRPO: iteration s ({g['prompts']} prompts x {g['group_size']}, same generated tokens, epochs and "
         f"minibatches; {g['kl']}; no value network)", f"{r['grpo_iteration_s']:.2f}"),
        ("GRPO: TFLOP per iteration, generation / scoring / update / total",
         " / ".join(f"{g['flops'][k] / 1e12:.3f}" for k in ("generation", "scoring", "update", "total"))),
        ("**GRPO MFU** vs the idle peak (paired; vs run-median peak)",
         f"**{r['grpo_mfu_vs_idle_peak']:.3f}** ({r['grpo_mfu']:.3f}; {r['grpo_mfu_vs_run_peak']:.3f})"),
        (f"PPO / GRPO iteration time (cores used in GRPO iterations: {g['cores_used']:.2f})",
         f"{r['ppo_over_grpo_time']:.2f}x"),
    ]
    if r.get("peer"):
        peer = r["peer"]
        rows.append((f"peer in this run: {peer.get('name', 'peer')} ({peer.get('dtype', '?')})",
                     f"{peer['iteration_s']:.2f} s / iteration; codex-jax is {r['peer_ratio']:.2f}x faster"))
    for k, v in pp.get("breakdown", {}).items():
        rows.append((f"breakdown: {k}", f"{v:.4f}" if isinstance(v, float) else str(v)))
    if "ptx_at_zero_coef" in pp:
        x = pp["ptx_at_zero_coef"]
        rows.append((f"PPO iteration with {x['rows']} x {x['len']} ptx rows at ptx_coef=0, s",
                     f"{x['iteration_s']:.2f} (+{x['extra_s']:.2f})"))
    lines = ["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small config smoke run (< 60 s)")
    ap.add_argument("--table", metavar="FILE.md", help="also write a markdown table")
    ap.add_argument("--repeats", type=int, default=3, help="timed PPO iterations (>= 3; cheaper calls use >= 5)")
    ap.add_argument("--pretrain-batch", type=int, default=None, help="rows per pretraining step")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-piece PPO timings")
    ap.add_argument("--profile", metavar="DIR", help="also trace one pretraining gradient and one PPO "
                    "iteration with jax.profiler into DIR and report time per op category")
    ap.add_argument("--ptx-rows", type=int, default=0,
                    help="also time an iteration with R demonstration rows (ptx_coef stays 0)")
    ap.add_argument("--ptx-len", type=int, default=256)
    ap.add_argument("--peer-cmd", metavar="CMD",
                    help="run CMD (a peer library's benchmark of the same work) after this one and print the ratio; "
                         "CMD must print a JSON line with 'iteration_s' (and 'name', 'dtype')")
    args = ap.parse_args(argv)

    c = dict(QUICK if args.quick else FULL)
    if args.pretrain_batch:
        c["pretrain_batch"] = args.pretrain_batch
    repeats = max(3, args.repeats)
    cfg = TransformerConfig(**c["model"])
    t_start = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    psi_before = cpu_pressure()

    if load_before[0] >= 0.5:
        print(f"warning: load average {load_before[0]} before the peak measurement: the machine is not idle, "
              "so the peak (and every MFU against it) is understated", file=sys.stderr)
    peak = Peak(c["matmul_n"])
    peak_start = peak.block(9)
    idle_peak = peak_start
    pretrain = bench_pretrain(c, cfg, max(repeats, 5), peak)
    ppo_res = bench_ppo(c, cfg, repeats, peak, breakdown=not (args.quick or args.no_breakdown))
    grpo_res = bench_grpo(c, cfg, repeats, peak)
    if args.ptx_rows:
        with_ptx = bench_ppo(c, cfg, repeats, peak, breakdown=False, ptx_rows=args.ptx_rows,
                             ptx_len=args.ptx_len)
        with_ptx.pop("_profile")
        ppo_res["ptx_at_zero_coef"] = {"rows": args.ptx_rows, "len": args.ptx_len,
                                       "iteration_s": with_ptx["iteration_s"],
                                       "extra_s": with_ptx["iteration_s"] - ppo_res["iteration_s"]}
    peak_end = peak.block(9)
    profiles = {}
    for name, res in (("pretrain_grad", pretrain), ("ppo_iteration", ppo_res)):
        fn, fargs = res.pop("_profile")
        if args.profile:
            profiles[name] = profile_ops(fn, fargs, os.path.join(args.profile, name))

    samples = sorted(peak.samples)
    peak_gflops = statistics.median(samples)
    peak_flops = peak_gflops * 1e9
    flops = ppo_res["flops"]
    result = {
        "bench": "transformer", "quick": bool(args.quick),
        "config": {**c["model"], "vocab": c["vocab"], "prompt_len": c["prompt_len"],
                   "response_len": c["response_len"], "rollouts": c["rollouts"], "epochs": c["epochs"],
                   "minibatches": c["minibatches"], "dtype": cfg.dtype, "positions": cfg.positions},
        "jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "repeats": repeats,
        "loadavg_before": load_before,
        "cpu_pressure_avg60_before": psi_before,
        "matmul_n": c["matmul_n"],
        "matmul_peak_gflops": peak_gflops,
        "matmul_peak_start_gflops": peak_start,
        "matmul_peak_end_gflops": peak_end,
        "matmul_peak_min_gflops": samples[0],
        "matmul_peak_max_gflops": samples[-1],
        "matmul_peak_samples": len(samples),
        "pretrain_tokens_per_s": pretrain["tokens_per_s"],
        "pretrain_step_s": pretrain["step_s"],
        "pretrain_mfu": pretrain["mfu_paired"],
        "pretrain_mfu_vs_run_peak": pretrain["achieved_gflops"] * 1e9 / peak_flops,
        "ppo_iteration_s": ppo_res["iteration_s"],
        "rollout_s": ppo_res["rollout_s"],
        "generation_s": ppo_res["generation_s"],
        "scoring_s": ppo_res["scoring_s"],
        "update_s": ppo_res["update_s"],
        "generation_share": ppo_res["generation_share"],
        "scoring_share": ppo_res["scoring_share"],
        "update_share": ppo_res["update_share"],
        "generated_tokens_per_s": ppo_res["generated_tokens_per_s"],
        "generation_tokens_per_s": ppo_res["generation_tokens_per_s"],
        "ppo_tflop_per_iteration": flops["total"] / 1e12,
        "ppo_tflop_countflops": flops["countflops_total"] / 1e12,
        "issue_ppo_tflop": ISSUE_PPO_TFLOP,
        "ppo_mfu": ppo_res["mfu_paired"],
        "ppo_mfu_vs_run_peak": flops["total"] / ppo_res["iteration_s"] / peak_flops,
        "ppo_mfu_countflops": ppo_res["mfu_countflops_paired"],
        "pretrain_mfu_vs_best_peak": pretrain["achieved_gflops"] * 1e9 / (samples[-1] * 1e9),
        "ppo_mfu_vs_best_peak": flops["total"] / ppo_res["iteration_s"] / (samples[-1] * 1e9),
        "contended": bool(min(pretrain["cores_used"], ppo_res["cores_used"]["iteration"]) < 1.5
                          or max(samples) > 1.5 * min(samples)),
        "pretrain_target_mfu": PRETRAIN_TARGET_MFU,
        "ppo_target_mfu": PPO_TARGET_MFU,
        "meets_pretrain_target": bool(pretrain["achieved_gflops"] / idle_peak >= PRETRAIN_TARGET_MFU),
        "meets_ppo_target": bool(flops["total"] / ppo_res["iteration_s"] / (idle_peak * 1e9) >= PPO_TARGET_MFU),
        "ppo_iteration_s_at_target": flops["total"] / (PPO_TARGET_MFU * peak_flops),
        "cpu": cpu_model(),
        "matmul_peak": {"gflops": idle_peak, "dtype": "float32", "shapes": [[c["matmul_n"], c["matmul_n"]]] * 2,
                        "op": "jax.jit(jnp.dot)", "samples": 9,
                        "measured": "at the start of this run, before any workload",
                        "loadavg_1min_at_measurement": load_before[0]},
        "idle_at_peak_measurement": bool(load_before[0] < 0.5),
        "pretrain_mfu_vs_idle_peak": pretrain["achieved_gflops"] * 1e9 / (idle_peak * 1e9),
        "ppo_mfu_vs_idle_peak": flops["total"] / ppo_res["iteration_s"] / (idle_peak * 1e9),
        "grpo_iteration_s": grpo_res["iteration_s"],
        "grpo_tflop_per_iteration": grpo_res["flops"]["total"] / 1e12,
        "grpo_mfu": grpo_res["mfu_paired"],
        "grpo_mfu_vs_idle_peak": grpo_res["flops"]["total"] / grpo_res["iteration_s"] / (idle_peak * 1e9),
        "grpo_mfu_vs_run_peak": grpo_res["flops"]["total"] / grpo_res["iteration_s"] / peak_flops,
        "ppo_over_grpo_time": ppo_res["iteration_s"] / grpo_res["iteration_s"],
        "pretrain": pretrain,
        "ppo": ppo_res,
        "grpo": grpo_res,
    }
    if profiles:
        result["profile"] = profiles
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["cpu_pressure_avg60_after"] = cpu_pressure()
    result["wall_s"] = time.perf_counter() - t_start
    if args.peer_cmd:  # a peer is compared only when it runs here, in this run, on this machine
        result["peer"] = run_peer(args.peer_cmd)
        ours = result["grpo"]["iteration_s"] if "grpo" in result["peer"].get("name", "").lower() else \
            result["ppo_iteration_s"]  # a GRPO peer is compared with our GRPO iteration
        result["peer_ratio"] = result["peer"]["iteration_s"] / ours
    if args.table:
        with open(args.table, "w") as fh:
            fh.write(table(result))
    print(json.dumps(result, default=float))
    return result


if __name__ == "__main__":
    main()
