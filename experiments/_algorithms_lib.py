"""Helpers of ``experiments/algorithms.py``: the shared M0 / M1 / RM, one M2 run with
exact evaluations, the estimator x placement runs on a small synthetic problem, and
the exact and sampled moments of the KL estimators.

Closed forms (``experiments/FIXED_POINTS.md``; the same as ``tests/test_kl.py``):
pi*(beta) ∝ pi_ref exp(r / beta); the reverse-KL (k3 in the loss) optimum
pi_k3(v) = beta pi_ref(v) / (lam - r_v) with lam by bisection; the water-filling
optimum of a bag-of-words reward with a repetition penalty (k1 in the loss).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config import OptimConfig
from codex_jax.config.algorithms import GRPOConfig, RLOOConfig
from codex_jax.core import kl
from codex_jax.core.scan import run_steps
from codex_jax.models import symbolic
from codex_jax.run import driver
from codex_jax.stages import grpo, rl, rloo
from codex_jax.stages.table import BASE_STAGES


# --------------------------------------------------------------------------- closed forms (float64)
def probs(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def tv(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def kl_optimum(ref_logits, r, beta) -> np.ndarray:
    """argmax <pi, r> - beta KL(pi || ref)."""
    return probs(np.log(probs(ref_logits)) + np.asarray(r, np.float64) / beta)


def reverse_kl_optimum(ref_logits, r, beta) -> np.ndarray:
    """argmax <pi, r> - beta KL(ref || pi): pi_v = beta q_v / (lam - r_v), lam by bisection."""
    q, r = probs(ref_logits), np.asarray(r, np.float64)
    lo, hi = r.max(), r.max() + beta
    for _ in range(200):
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if np.sum(beta * q / (lam - r)) > 1.0 else (lo, lam)
    p = beta * q / (0.5 * (lo + hi) - r)
    return p / p.sum()


REPETITION_C = 6.0


def repetition_scores(params, prompt, prompt_mask, response, mask):
    """R(y) = sum_t w[y_t] - (C/T) sum_v n_v(y)^2, written per token.  -> [B, T]."""
    del prompt, prompt_mask
    t = response.shape[-1]
    same = response[:, :, None] == response[:, None, :]
    before = jnp.tril(jnp.ones((t, t), bool), -1)[None]
    repeats = jnp.sum(same & before, axis=-1).astype(jnp.float32)
    return (params["w"][response] - REPETITION_C / t * (2.0 * repeats + 1.0)) * mask


def repetition_optimum(r, response_len: int, c: float = REPETITION_C) -> np.ndarray:
    """argmax T <pi, r> - c (T - 1) sum pi^2: pi_v = (r_v - mu)_+ / kappa (water-filling)."""
    r = np.asarray(r, np.float64)
    kappa = 2.0 * c * (response_len - 1) / response_len
    lo, hi = r.min() - kappa, r.max()
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        lo, hi = (mu, hi) if np.maximum(r - mu, 0.0).sum() / kappa > 1.0 else (lo, mu)
    p = np.maximum(r - 0.5 * (lo + hi), 0.0) / kappa
    return p / p.sum()


# --------------------------------------------------------------------------- (a) the default data
def base_stages(enc, tokenizer, cfg) -> tuple:
    """M0, M1 and RM once, exactly as ``run_stages`` trains them (same keys).
    -> (context holding their params, the per-purpose keys, seconds per stage)."""
    keys = driver.stage_keys(cfg)
    ctx = driver.make_context(enc, tokenizer, cfg)
    runner = driver.Runner(cfg=cfg, progress=False)
    params, timings = {}, {}
    for stage in BASE_STAGES:
        t0 = time.perf_counter()
        ctx = dataclasses.replace(ctx, params=dict(params))
        setup = stage.module.setup(ctx, keys[stage.label])
        state = setup.state
        if setup.total > 0:
            state = runner.train(stage, state, setup.data, setup.key, total=setup.total, log_every=setup.log_every)
        params[stage.name] = stage.module.export(state)
        timings[stage.name] = round(time.perf_counter() - t0, 2)
    return dataclasses.replace(ctx, params=dict(params)), keys, timings


def train_with_evals(module, setup, every: int, evaluate) -> dict:
    """``setup.total`` steps in chunks of ``every`` (bitwise the same as one call: keys
    depend on the absolute step), ``evaluate(state) -> dict`` after each chunk.  The
    clock counts only the compiled chunks (each ends in block_until_ready); the program
    is compiled first by one chunk from the start state, whose result is discarded."""
    state, data, key = setup.state, setup.data, setup.key
    fn = dict(step_fn=module.step, select_fn=module.select_batch, num_steps=every)
    t0 = time.perf_counter()
    jax.block_until_ready(run_steps(state, data, key, **fn))
    compile_s = time.perf_counter() - t0
    curve = {"step": [0], "wall_s": [0.0], **{k: [v] for k, v in evaluate(state).items()}}
    wall = 0.0
    for _ in range(setup.total // every):
        t0 = time.perf_counter()
        state, _ = run_steps(state, data, key, **fn)
        jax.block_until_ready(state.params)
        wall += time.perf_counter() - t0
        curve["step"].append(int(state.step))
        curve["wall_s"].append(round(wall, 4))
        for k, v in evaluate(state).items():
            curve[k].append(v)
    return {"curve": curve, "state": state, "compile_and_first_chunk_s": round(compile_s, 3)}


def exact_evaluator(vocab: int):
    """Exact TV to the state's own pi*(kl_coef) (with its RM and safety penalty) and the
    exact per-response KL and RM score (``stages.rl.exact_terms``)."""
    zeros = jnp.zeros((vocab,), jnp.float32)

    def evaluate(state):
        e = jax.device_get(rl.exact_terms(state, zeros))
        return {"tv": float(e["tv_to_optimum"]), "kl": float(e["KL"]), "rm_score": -float(e["L_RLHF"])}
    return evaluate


def fit_bradley_terry(pairs: dict, family, l2: float, steps: int) -> dict:
    """The bag-of-words RM fitted to convergence on ``pairs``: full-batch Adam, cosine,
    ``reward.loss_fn``.  -> {"w", "b", "max_abs_grad", "bt_loss", "accuracy"}."""
    from codex_jax.config import RewardConfig
    from codex_jax.stages import reward

    n = int(pairs["chosen"].shape[0])
    cfg = RewardConfig(steps=steps, batch_size=n, l2=l2, optim=OptimConfig(lr=0.05, schedule="cosine"))
    state = reward.init(jax.random.key(0), cfg, family)
    state, _ = run_steps(state, pairs, jax.random.key(1), step_fn=reward.step, select_fn=reward.select_batch,
                         num_steps=steps)
    (loss, m), g = jax.value_and_grad(reward.loss_fn, has_aux=True)(state.params, family, pairs, l2)
    return {"w": np.asarray(state.params["w"]), "b": float(state.params["b"]),
            "max_abs_grad": float(jnp.max(jnp.abs(g["w"]))), "bt_loss": float(m["bt_loss"]),
            "accuracy": float(m["accuracy"])}


def equal_length_pairs(pairs: dict) -> dict:
    """The pairs whose chosen and rejected completions have the same number of tokens:
    there the log-normalisers cancel and DPO on a unigram is exactly the RM's problem."""
    keep = np.flatnonzero(np.asarray(pairs["chosen_mask"]).sum(-1) == np.asarray(pairs["rejected_mask"]).sum(-1))
    return jax.tree_util.tree_map(lambda x: x[keep], pairs)


def dpo_targets(module, setup, ctx, l2_rm: float, fit_steps: int, others: dict) -> tuple:
    """DPO's reference points on its own training pairs: the section-8 optimum
    pi_DPO* ∝ pi_ref exp(w_pairs / beta) (w_pairs = the RM with l2 = l2_D / beta^2 fitted
    to convergence on the same pairs) and DPO's own loss minimised full batch.
    -> (evaluate(state) -> {"tv" (to pi_DPO*), "tv_to_converged_dpo", "tv_to_<other>"}, info)."""
    cfg, pairs, ref = setup.state.cfg, setup.data, setup.extra["start"].extras["ref"]
    n = int(pairs["chosen"].shape[0])
    rm_fit = fit_bradley_terry(pairs, ctx.family, cfg.l2 / cfg.beta ** 2, fit_steps)
    target = symbolic.kl_regularised_optimum(ref["logits"], jnp.asarray(rm_fit["w"]), 0.0, cfg.beta)
    full = dataclasses.replace(cfg, steps=fit_steps, batch_size=n, optim=dataclasses.replace(cfg.optim,
                                                                                          schedule="cosine"))
    conv = module.init(None, full, ctx.family, setup.extra["start"].params, ref)
    conv, _ = run_steps(conv, pairs, jax.random.key(2), step_fn=module.step, select_fn=module.select_batch,
                        num_steps=fit_steps)
    grad = jax.grad(lambda p: module.loss_fn(p, ref, ctx.family, pairs, full)[0])(conv.params)["logits"]
    conv_logits = conv.params["logits"]
    lengths = np.asarray(pairs["chosen_mask"]).sum(-1) - np.asarray(pairs["rejected_mask"]).sum(-1)
    targets = {"converged_dpo": conv_logits, **others}

    def evaluate(state):
        lg = state.params["logits"]
        return {"tv": float(symbolic.total_variation(lg, target)),
                **{f"tv_to_{k}": float(symbolic.total_variation(lg, v)) for k, v in targets.items()}}

    info = {"optimum": (f"pi_DPO* ∝ pi_ref exp(w_pairs / {cfg.beta:g}), w_pairs the Bradley-Terry RM (l2 "
                        f"{cfg.l2 / cfg.beta ** 2:g}) fitted full batch ({fit_steps} Adam steps, cosine) on DPO's "
                        f"{n} training pairs; no safety penalty"),
            "reference_fits": {"rm_on_dpo_pairs": {k: v for k, v in rm_fit.items() if k != "w"},
                               "converged_dpo_max_abs_grad": float(jnp.max(jnp.abs(grad))),
                               "tv_pi_dpo_star_to_converged_dpo": float(symbolic.total_variation(target, conv_logits)),
                               **{f"tv_pi_dpo_star_to_{k}": float(symbolic.total_variation(target, v))
                                  for k, v in others.items()},
                               "train_pairs": n, "pairs_equal_length": float(np.mean(lengths == 0)),
                               "mean_abs_length_difference": float(np.mean(np.abs(lengths))),
                               "l2_rm_equivalent": l2_rm}}
    return evaluate, info


def first_reach(curve: dict, x: str, threshold: float):
    """The first ``x`` at which the TV curve is <= threshold (None if never)."""
    for xv, t in zip(curve[x], curve["tv"]):
        if t <= threshold:
            return xv
    return None


# --------------------------------------------------------------------------- (b) estimator x placement
V_SYN, T_SYN, G_SYN = 8, 8, 8


def synthetic_problem(seed: int = 0, w_scale: float = 1.0, penalty: float = 1.0):
    """``tests/test_kl.rl_problem``: V = 8 reference logits, a planted bag-of-words reward,
    a safety penalty on token 3, a dummy prompt pool.  -> (ref, rm, s, data, r = w - s)."""
    k = jax.random.PRNGKey(seed)
    ref = {"logits": jax.random.normal(jax.random.fold_in(k, 1), (V_SYN,))}
    rm = {"w": w_scale * jax.random.normal(jax.random.fold_in(k, 2), (V_SYN,)), "b": jnp.zeros(())}
    s = rl.penalty_vector(V_SYN, [3], penalty)
    data = {"prompt": jnp.zeros((4, 1), jnp.int32), "prompt_mask": jnp.ones((4, 1)),
            "ptx_tokens": jnp.zeros((4, 2), jnp.int32), "ptx_mask": jnp.ones((4, 2))}
    return ref, rm, s, data, np.asarray(rm["w"] - s, np.float64)


OBJECTIVES = {
    ("k1", "reward"): ("E[R] - beta KL(pi||ref)", "pi*(beta)"),
    ("k2", "reward"): ("E[R] - beta sum_v phi_k2(pi_v), phi concave below ref (no divergence)", "collapse"),
    ("k3", "reward"): ("E[R] - beta [KL(pi||ref) - KL(ref||pi)] (concave below ref)", "collapse"),
    ("k1", "loss"): ("E[R] (the k1 loss has zero expected gradient)", "water-filling"),
    ("k2", "loss"): ("E[R] - beta_eff KL(pi||ref)", "pi*(beta_eff)"),
    ("k3", "loss"): ("E[R] - beta_eff KL(ref||pi) (reverse KL)", "pi_k3(beta_eff)"),
}


def placement_runs(quick: bool, seed: int, beta: float = 1.0) -> list[dict]:
    """Dr. GRPO and RLOO for every estimator x placement (+ GRPO with std scaling, k3 in
    the loss: the DeepSeekMath recipe), each measured against every analytic candidate.
    Optimisers as FIXED_POINTS.md section 7 prescribes: Adam for KL in the reward, SGD on
    large on-policy batches for KL in the loss."""
    reward_run = dict(iterations=150 if quick else 300, rollouts=512, optim=OptimConfig(lr=0.1, schedule="cosine"))
    loss_run = dict(iterations=200 if quick else 600, rollouts=1024 if quick else 2048, epochs=1, minibatches=1,
                    optim=OptimConfig(name="sgd", lr=2.0, schedule="cosine"))
    variants = [(alg, est, pl) for pl in ("reward", "loss") for est in kl.ESTIMATORS for alg in ("dr_grpo", "rloo")]
    variants.append(("grpo", "k3", "loss"))
    rows = []
    for alg, est, place in variants:
        t0 = time.perf_counter()
        repetition = est == "k1" and place == "loss"
        ref, rm, s, data, r = synthetic_problem(0, *((0.5, 0.5) if repetition else (1.0, 1.0)))
        fam = symbolic.unigram_family(V_SYN)
        if repetition:
            fam = fam._replace(reward_token_scores=repetition_scores)
        common = dict(group_size=G_SYN, response_len=T_SYN, kl_coef=beta, kl_estimator=est, kl_placement=place,
                      **(reward_run if place == "reward" else loss_run))
        if alg == "rloo":
            module, cfg = rloo, RLOOConfig(**common)
        else:
            module = grpo
            cfg = GRPOConfig.dr_grpo(**common) if alg == "dr_grpo" else GRPOConfig(**common)
        c = 1.0 if alg == "rloo" else (G_SYN - 1) / G_SYN
        beta_eff = beta / c
        state = module.init(cfg, fam, ref, ref, rm, s)
        out, metrics = run_steps(state, data, jax.random.PRNGKey(seed + 11), step_fn=module.step,
                                 select_fn=module.select_batch, num_steps=cfg.iterations)
        p, q = probs(out.params["policy"]["logits"]), probs(ref["logits"])
        cand = {"pi*(beta)": kl_optimum(ref["logits"], r, beta),
                "pi*(beta_eff)": kl_optimum(ref["logits"], r, beta_eff),
                "pi_k3(beta_eff)": reverse_kl_optimum(ref["logits"], r, beta_eff),
                "water-filling" if repetition else "vertex argmax r":
                    repetition_optimum(r, T_SYN) if repetition else np.eye(V_SYN)[np.argmax(r)]}
        pi_star = cand["pi*(beta)"]
        dropped = (p < 1e-3) & (pi_star > 0.02)
        objective, own = OBJECTIVES[(est, place)]
        if alg == "grpo":
            objective, own = "no fixed objective (std-scaled advantages); fitted beta below", "pi_k3(fitted beta)"
            betas = np.geomspace(0.3, 10, 400)
            fits = [tv(p, reverse_kl_optimum(ref["logits"], r, b)) for b in betas]
            cand["pi_k3(fitted beta)"] = reverse_kl_optimum(ref["logits"], r, betas[int(np.argmin(fits))])
        own_key = {"water-filling": "water-filling" if repetition else "vertex argmax r"}.get(own, own)
        rows.append({
            "algorithm": alg, "estimator": est, "placement": place, "beta": beta, "beta_eff": beta_eff,
            "problem": "repetition-penalty reward" if repetition else "linear bag-of-words reward",
            "optimizer": f"{cfg.optim.name} lr {cfg.optim.lr} {cfg.optim.schedule}",
            "iterations": cfg.iterations, "rollouts": cfg.rollouts, "epochs": cfg.epochs,
            "minibatches": cfg.minibatches, "objective": objective, "predicted_fixed_point": own,
            "tv": {k: tv(p, v) for k, v in cand.items()},
            "tv_to_predicted": None if own == "collapse" else tv(p, cand[own_key]),
            "tv_start_to_predicted": None if own == "collapse" else tv(q, cand[own_key]),
            "fitted_beta": float(betas[int(np.argmin(fits))]) if alg == "grpo" else None,
            "collapse": {"dropped_tokens": np.flatnonzero(dropped).tolist(),
                         "pi_star_mass_dropped": float(pi_star[dropped].sum()),
                         "survivors_above_ref": bool(np.all(p[p > 1e-3] > q[p > 1e-3]))},
            "skipped": int(np.asarray(metrics["skipped"]).sum()), "seconds": round(time.perf_counter() - t0, 2)})
    return rows


# --------------------------------------------------------------------------- (c) estimator moments
def exact_moments(p_logits, q_logits) -> dict:
    """``core.kl.categorical_expectations`` in float64 (NumPy): far from the reference,
    r = q / pi reaches e^50 on tokens pi* nearly removes, and Var k3 overflows float32."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        m = x.max()
        return x - m - np.log(np.sum(np.exp(x - m)))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    p, log_r = np.exp(lp), lq - lp
    ks = {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": np.expm1(log_r) - log_r}
    out = {"kl": float(np.sum(p * -log_r)), "reverse_kl": float(np.sum(np.exp(lq) * log_r))}
    for e, k in ks.items():
        out[f"mean_{e}"] = float(np.sum(p * k))
        out[f"var_{e}"] = float(np.sum(p * np.square(k - out[f"mean_{e}"])))
    return out


def estimator_moments(ref_logits, w, s, betas, n_batches: int, rollouts: int, length: int, key) -> list[dict]:
    """For pi = pi*(beta) (growing KL to the reference as beta falls): the exact mean and
    std of k1, k2, k3 per token (``core.kl.categorical_expectations``) and the sampled
    ones over n_batches x rollouts x length tokens drawn as the RL stages draw them,
    plus the spread of one iteration's mean (rollouts x length tokens) across batches."""
    fam = symbolic.unigram_family(int(ref_logits.shape[0]))
    draw = jax.jit(lambda lg, k: fam.sample({"logits": lg}, k, jnp.zeros((rollouts, 1), jnp.int32), None, length))
    ref_logp = jax.nn.log_softmax(ref_logits)
    rows = []
    for i, beta in enumerate(betas):
        logits = symbolic.kl_regularised_optimum(ref_logits, w, s, beta)
        exact = exact_moments(logits, ref_logits)
        f32 = jax.device_get(kl.categorical_expectations(logits, ref_logits))
        logp = jax.nn.log_softmax(logits)
        sums = {e: [] for e in kl.ESTIMATORS}
        sq = {e: 0.0 for e in kl.ESTIMATORS}
        for b in range(n_batches):
            y = draw(logits, jax.random.fold_in(jax.random.fold_in(key, i), b))
            for e in kl.ESTIMATORS:
                k = np.asarray(kl.estimate(e, logp[y], ref_logp[y]), np.float64)
                sums[e].append(k.mean())
                sq[e] += float(np.square(k).mean())
        row = {"beta": float(beta), "kl": exact["kl"], "reverse_kl": exact["reverse_kl"],
               "f32_categorical_expectations": {k: float(v) if np.isfinite(v) else str(float(v))
                                                for k, v in f32.items()},
               "tokens": n_batches * rollouts * length, "batch_tokens": rollouts * length}
        for e in kl.ESTIMATORS:
            mean = float(np.mean(sums[e]))
            row[e] = {"exact_mean": exact[f"mean_{e}"], "exact_std": float(np.sqrt(exact[f"var_{e}"])),
                      "exact_bias": exact[f"mean_{e}"] - exact["kl"],
                      "sampled_mean": mean, "sampled_std": float(np.sqrt(max(sq[e] / n_batches - mean ** 2, 0.0))),
                      "sampled_bias": mean - exact["kl"],
                      "batch_mean_std": float(np.std(sums[e], ddof=1)),
                      "batch_mean_std_exact": float(np.sqrt(exact[f"var_{e}"] / (rollouts * length)))}
        rows.append(row)
    return rows
