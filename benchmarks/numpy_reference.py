"""A plain NumPy implementation of the symbolic pipeline, for speed and agreement checks.

It runs the same algorithm as ``codex_jax.run.pipeline.run_stages`` with the unigram
policy and the bag-of-words reward model, on the same ``EncodedData``:

* M0   smoothed maximum likelihood from token counts (``np.bincount``);
* M1   SFT: masked next-token cross-entropy divided by the data-set constant
       ``denom``, epoch-wise shuffled batches (remainder dropped), Adam written
       out by hand with optax's update rule, schedule and non-finite skip;
* RM   Bradley-Terry + L2, scores by gather, gradient of w by ``np.add.at``
       (the transpose of the gather), same steps / batch size / held-out split
       fraction;
* M2   PPO: inverse-CDF sampling (``np.searchsorted``), per-token rewards
       RM - safety - kl_coef * (log pi_old - log pi_ref), GAE, whitening,
       ``epochs`` x ``minibatches`` clipped-surrogate Adam updates with the same
       cosine schedule over all updates, optional PPO-ptx and KL controller;
* the exact objective terms of ``symbolic.exact_objective``.

Randomness (batch order, held-out split, samples) comes from a NumPy Generator,
so results agree with JAX in distribution, not bitwise.  Gradients are the
closed forms of the same losses (for a context-free unigram the gradient of a
gathered log-prob is a scatter of counts minus the softmax), and the optimiser
runs in float32 like optax.

Nothing here imports JAX.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

F32 = np.float32
EPS = 1e-8  # kernels.EPS


# --------------------------------------------------------------------------- math
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, F32)
    z = x - x.max()
    return z - np.log(np.exp(z).sum(dtype=F32))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(F32(0.0), x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (F32(0.5) * (np.tanh(F32(0.5) * x) + F32(1.0))).astype(F32)


def all_finite(tree: dict) -> bool:
    return all(bool(np.all(np.isfinite(v))) for v in tree.values())


# --------------------------------------------------------------------------- optimiser
def learning_rate(ocfg, total_steps: int, count: int) -> float:
    """optax schedule of ``optim.learning_rate`` at update ``count`` (0-based)."""
    warm = ocfg.warmup_steps
    if warm and count < warm:
        return ocfg.lr * count / warm  # linear 0 -> lr
    c = count - warm
    if ocfg.schedule == "cosine":
        decay = float(max(total_steps - warm, 1))
        c = min(float(c), decay)
        cos = 0.5 * (1.0 + math.cos(math.pi * c / decay))
        return ocfg.lr * ((1.0 - ocfg.final_lr_fraction) * cos + ocfg.final_lr_fraction)
    return ocfg.lr


class Optimizer:
    """optax.adam / adamw / sgd (+ clip_by_global_norm) on a dict of float32 arrays,
    with ``updates.apply_gradients``' rule: a non-finite gradient changes nothing."""

    b1, b2, eps = 0.9, 0.999, 1e-8

    def __init__(self, ocfg, total_steps: int, params: dict):
        self.cfg, self.total = ocfg, total_steps
        self.count = 0  # optax's count: number of applied updates
        self.skipped = 0
        self.mu = {k: np.zeros_like(v, F32) for k, v in params.items()}
        self.nu = {k: np.zeros_like(v, F32) for k, v in params.items()}

    def apply(self, params: dict, grads: dict) -> dict:
        if not all_finite(grads):
            self.skipped += 1
            return params
        cfg = self.cfg
        if cfg.grad_clip > 0:
            norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=F32))) for g in grads.values()))
            if not norm < cfg.grad_clip:
                grads = {k: (g / F32(norm) * F32(cfg.grad_clip)).astype(F32) for k, g in grads.items()}
        lr = F32(learning_rate(cfg, self.total, self.count))
        self.count += 1
        out = {}
        if cfg.name == "sgd":
            for k, p in params.items():
                out[k] = (p - lr * grads[k]).astype(F32)
            return out
        b1, b2 = F32(self.b1), F32(self.b2)
        # optax's bias correction 1 - b**count is computed in float32 (0.999 -> 0.99900001)
        c1 = F32(1.0) - b1 ** F32(self.count)
        c2 = F32(1.0) - b2 ** F32(self.count)
        for k, p in params.items():
            g = grads[k]
            mu = F32(1.0 - self.b1) * g + b1 * self.mu[k]  # optax: (1 - decay) in Python floats
            nu = F32(1.0 - self.b2) * (g * g) + b2 * self.nu[k]
            self.mu[k], self.nu[k] = mu, nu
            upd = (mu / c1) / (np.sqrt(nu / c2) + F32(self.eps))
            if cfg.name == "adamw":
                upd = upd + F32(cfg.weight_decay) * p
            out[k] = (p - lr * upd).astype(F32)
        return out


# --------------------------------------------------------------------------- batching
class EpochBatches:
    """Batch ``step`` of an epoch-wise shuffle without replacement, remainder dropped
    (``kernels.epoch_batch_indices``); one permutation per epoch."""

    def __init__(self, rng: np.random.Generator, num_items: int, batch_size: int):
        self.rng, self.n, self.bs = rng, num_items, min(batch_size, num_items)
        self.per_epoch = self.n // self.bs
        self.perm, self.epoch = None, -1

    def __call__(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.perm, self.epoch = self.rng.permutation(self.n), epoch
        return self.perm[within * self.bs:(within + 1) * self.bs]


# --------------------------------------------------------------------------- stages
def token_counts(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Masked token frequencies (float64 [V])."""
    return np.bincount(np.asarray(tokens).ravel(), weights=np.asarray(mask, np.float64).ravel(),
                       minlength=vocab_size)[:vocab_size]


def fit_exact(counts: np.ndarray, smoothing: float) -> dict:
    """Smoothed MLE: logits = log((c + a) / (N + aV))."""
    probs = (counts + smoothing) / (counts.sum() + smoothing * counts.shape[0])
    return {"logits": np.log(probs).astype(F32)}


def counts_nll(logits: np.ndarray, counts: np.ndarray) -> float:
    """Unsmoothed masked mean NLL from token counts (``lm.evaluate``)."""
    logp = log_softmax(logits).astype(np.float64)
    return float(-(counts @ logp) / max(counts.sum(), EPS))


def train_lm(params: dict, tokens: np.ndarray, mask: np.ndarray, lcfg, vocab_size: int,
             rng: np.random.Generator, label_smoothing: float = 0.0) -> tuple[dict, Optimizer, list]:
    """``lcfg.steps`` Adam steps on the label-smoothed masked cross-entropy / denom.

    loss = -(1/denom) sum_{b,l} m [(1-eps) logp[y] + eps mean_v logp_v]
    d/dlogits = -(1/denom) [(1-eps)(c - C p) + eps C (1/V - p)],  c = batch counts.
    """
    n = tokens.shape[0]
    denom = F32(mask.sum(dtype=np.float64) * lcfg.batch_size / n)
    eps = F32(label_smoothing)
    opt = Optimizer(lcfg.optim, lcfg.steps, params)
    batches = EpochBatches(rng, n, lcfg.batch_size)
    losses = []
    for step in range(lcfg.steps):
        idx = batches(step)
        t, m = tokens[idx], mask[idx]
        c = np.bincount(t.ravel(), weights=m.ravel(), minlength=vocab_size).astype(F32)
        C = c.sum()
        logp = log_softmax(params["logits"])
        p = np.exp(logp)
        losses.append(float(-((1 - eps) * (c @ logp) + eps * C * logp.mean()) / denom))
        g = -((F32(1.0) - eps) * (c - C * p) + eps * C * (F32(1.0 / vocab_size) - p)) / denom
        params = opt.apply(params, {"logits": g.astype(F32)})
    return params, opt, losses


def reward_scores(w: np.ndarray, b: F32, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """r(y) = b + sum_t w[y_t] (b only on a non-empty response, like ``is_last``)."""
    return (w[ids] * mask).sum(-1) + b * (mask.sum(-1) > 0)


def pair_metrics(margin: np.ndarray) -> dict:
    correct = (margin > 0).astype(F32) + F32(0.5) * (margin == 0).astype(F32)
    return {"bt_loss": float(np.mean(softplus(-margin))), "accuracy": float(np.mean(correct)),
            "margin": float(np.mean(margin))}


def reward_margins(params: dict, pairs: dict) -> np.ndarray:
    w, b = params["w"], params["b"]
    return (reward_scores(w, b, pairs["chosen"], pairs["chosen_mask"])
            - reward_scores(w, b, pairs["rejected"], pairs["rejected_mask"]))


def split_pairs(pairs: dict, rng: np.random.Generator, heldout_fraction: float) -> tuple[dict, dict]:
    """Held-out = the first ``int(n * fraction)`` items of a random permutation."""
    n = pairs["chosen"].shape[0]
    n_held = int(n * heldout_fraction)
    if n - n_held < 1:
        raise ValueError(f"prefs: {n} preference pair(s) leave none for training")
    perm = rng.permutation(n)
    held, train = perm[:n_held], perm[n_held:]
    return ({k: v[train] for k, v in pairs.items()}, {k: v[held] for k, v in pairs.items()})


def train_reward(pairs: dict, rcfg, vocab_size: int, rng: np.random.Generator,
                 scatter: str = "add.at") -> tuple[dict, Optimizer, list]:
    """Bradley-Terry + l2/2 |w|^2 with Adam; ``scatter`` = "add.at" or "bincount"
    (the same scatter-add of the gather's cotangent, two NumPy spellings)."""
    V = vocab_size
    params = {"w": np.zeros((V,), F32), "b": np.zeros((), F32)}
    opt = Optimizer(rcfg.optim, rcfg.steps, params)
    n = pairs["chosen"].shape[0]
    batches = EpochBatches(rng, n, rcfg.batch_size)
    l2 = F32(rcfg.l2)
    losses = []
    for step in range(rcfg.steps):
        idx = batches(step)
        ch, chm = pairs["chosen"][idx], pairs["chosen_mask"][idx]
        rj, rjm = pairs["rejected"][idx], pairs["rejected_mask"][idx]
        w, b = params["w"], params["b"]
        has_c, has_r = (chm.sum(-1) > 0).astype(F32), (rjm.sum(-1) > 0).astype(F32)
        margin = ((w[ch] * chm).sum(-1) + b * has_c) - ((w[rj] * rjm).sum(-1) + b * has_r)
        B = margin.shape[0]
        losses.append(float(np.mean(softplus(-margin)) + l2 * F32(0.5) * np.sum(w * w)))
        g = (-sigmoid(-margin) / F32(B)).astype(F32)  # dL/dmargin
        gc, gr = g[:, None] * chm, g[:, None] * rjm
        if scatter == "add.at":
            gw = np.zeros((V,), F32)
            np.add.at(gw, ch, gc)
            np.add.at(gw, rj, -gr)
        else:
            gw = (np.bincount(ch.ravel(), weights=gc.ravel(), minlength=V)
                  - np.bincount(rj.ravel(), weights=gr.ravel(), minlength=V)).astype(F32)
        grads = {"w": gw + l2 * w, "b": F32(np.sum(g * (has_c - has_r)))}
        params = opt.apply(params, grads)
    return params, opt, losses


def penalty_vector(tokenizer, qcfg, vocab_size: int) -> np.ndarray:
    """s[v] = safety_penalty on the unsafe tokens in the vocabulary (``pipeline.unsafe_ids``)."""
    lower = getattr(tokenizer.config, "lowercase", False)
    forms = [t.lower() if lower else t for t in qcfg.unsafe_tokens]
    # the word and its byte-level-BPE space-prefixed form ("\u0120eval")
    ids = sorted({i for i in (tokenizer.token_id(f) for t in forms for f in (t, "\u0120" + t)) if i >= 4})
    s = np.zeros((vocab_size,), F32)
    s[ids] = qcfg.safety_penalty
    return s


def gae(rewards: np.ndarray, mask: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``kernels.gae`` with values = 0 (critic-free), vectorised over rows.  [B, T]."""
    deltas = rewards * mask
    if gamma * lam == 0.0:
        adv = deltas * mask
    else:
        adv = np.zeros_like(deltas)
        carry = np.zeros(deltas.shape[0], F32)
        m_next = np.concatenate([mask[:, 1:], np.zeros((mask.shape[0], 1), F32)], axis=1)
        for t in range(deltas.shape[1] - 1, -1, -1):
            carry = (deltas[:, t] + F32(gamma * lam) * carry * m_next[:, t]) * mask[:, t]
            adv[:, t] = carry
    return adv, adv * mask


def whiten(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = max(float(mask.sum()), EPS)
    mean = F32((x * mask).sum() / n)
    var = F32((np.square(x - mean) * mask).sum() / n)
    return ((x - mean) / np.sqrt(var + F32(EPS)) * mask).astype(F32)


def _d_clip(ratio: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """d clip(ratio, lo, hi) / d ratio with JAX's max/min tie rule (0.5 at a bound)."""
    inside = (ratio > lo) & (ratio < hi)
    bound = (ratio == lo) | (ratio == hi)
    return inside.astype(F32) + F32(0.5) * bound.astype(F32)


def sample_unigram(logits: np.ndarray, rng: np.random.Generator, shape, temperature: float) -> np.ndarray:
    """Inverse-CDF sampling, as ``symbolic.sample``."""
    probs = softmax(logits / F32(temperature))
    cdf = np.cumsum(probs, dtype=F32)
    u = rng.random(shape, dtype=F32) * cdf[-1]
    ids = np.searchsorted(cdf, u, side="right")
    last = probs.shape[0] - 1 - int(np.argmax(probs[::-1] > 0))
    return np.minimum(ids, last).astype(np.int32)


def exact_objective(policy, ref, reward, penalty, demo_counts, response_len, kl_coef) -> dict:
    """``symbolic.exact_objective`` in NumPy (float32 like JAX)."""
    logp = log_softmax(policy)
    p = np.exp(logp)
    logq = log_softmax(ref)
    dc = demo_counts.astype(F32)
    opt = log_softmax(log_softmax(ref) + (reward["w"] - penalty) / F32(kl_coef))
    return {
        "L_SFT": float(-np.sum(dc * logp) / max(float(dc.sum()), 1.0)),
        "L_RLHF": float(-(reward["b"] + response_len * np.dot(p, reward["w"]))),
        "KL": float(response_len * np.sum(p * (logp - logq))),
        "safety": float(response_len * np.dot(p, penalty)),
        "tv_to_optimum": float(0.5 * np.sum(np.abs(p - softmax(opt)))),
    }


def train_ppo(policy: np.ndarray, ref: np.ndarray, reward: dict, penalty: np.ndarray,
              ptx_tokens: np.ndarray, ptx_mask: np.ndarray, qcfg, vocab_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, float, Optimizer, list]:
    """``qcfg.iterations`` PPO iterations (``ppo.step``); returns the policy logits."""
    V, T, R = vocab_size, qcfg.response_len, qcfg.rollouts
    temp, clip = F32(qcfg.temperature), qcfg.clip
    lo, hi = F32(1.0 - clip), F32(1.0 + clip)
    params = {"logits": np.asarray(policy, F32)}
    opt = Optimizer(qcfg.optim, qcfg.iterations * qcfg.epochs * qcfg.minibatches, params)
    ref_logp = log_softmax(np.asarray(ref, F32) / temp)
    w, b = reward["w"], reward["b"]
    kl_coef = F32(qcfg.kl_coef)
    mask = np.ones((R, T), F32)  # fixed-length responses
    mb_size = R // qcfg.minibatches
    M = F32(max(mb_size * T, EPS))  # masked_mean denominator of a minibatch
    stats = []
    for _ in range(qcfg.iterations):
        # the unigram ignores prompts; draw a PPO-ptx batch only where it is used
        if qcfg.ptx_coef > 0:
            d_idx = rng.integers(0, ptx_tokens.shape[0], qcfg.ptx_batch_size)
            ptx_c = np.bincount(ptx_tokens[d_idx].ravel(), weights=ptx_mask[d_idx].ravel(),
                                minlength=V).astype(F32)
            ptx_C = F32(max(float(ptx_c.sum()), EPS))
        # ---- rollout
        resp = sample_unigram(params["logits"], rng, (R, T), qcfg.temperature)
        old_logp = log_softmax(params["logits"] / temp)[resp]
        rm = w[resp] * mask
        rm[:, -1] += b  # b on the last valid token
        if getattr(qcfg, "whiten_rewards", False):  # scale by the std of the sequence scores
            seq = rm.sum(-1)
            rm = rm / np.sqrt(np.mean(np.square(seq - seq.mean())) + F32(EPS))
        safety = penalty[resp] * mask
        kl = (old_logp - ref_logp[resp]) * mask
        rewards = rm - safety - kl_coef * kl
        adv, returns = gae(rewards, mask, qcfg.gamma, qcfg.gae_lambda)
        if qcfg.whiten_advantages:
            adv = whiten(adv, mask)
        kl_mean = float(kl.sum(-1).mean())
        it = {"rm_score": float(rm.sum(-1).mean()), "safety_penalty": float(safety.sum(-1).mean()),
              "kl": kl_mean, "return": float(returns[:, 0].mean())}
        max_kl = getattr(qcfg, "max_kl", None)
        if max_kl is not None and kl_mean > max_kl and qcfg.kl_guard == "stop":
            raise RuntimeError(f"ppo: KL to the reference {kl_mean:.4g} exceeds ppo.max_kl={max_kl}")
        snapshot = (params, dict(opt.mu), dict(opt.nu), opt.count)
        # ---- epochs x minibatches of clipped-surrogate updates
        clip_frac = approx_kl = 0.0
        for _ in range(qcfg.epochs):
            perm = rng.permutation(R).reshape(qcfg.minibatches, mb_size)
            for idx in perm:
                y, old, A = resp[idx], old_logp[idx], adv[idx]
                logp_all = log_softmax(params["logits"] / temp)
                log_ratio = logp_all[y] - old
                ratio = np.exp(log_ratio)
                unc = ratio * A
                clp = np.clip(ratio, lo, hi) * A
                # d min(unc, clp) / d ratio, with JAX's rule for min / clip (0.5 on a tie)
                dclp = _d_clip(ratio, lo, hi) * A
                dmin = np.where(unc < clp, A, np.where(unc == clp, F32(0.5) * (A + dclp), dclp))
                g_lp = (-dmin * ratio / M).astype(F32)  # d pg_loss / d logp(y)
                p = np.exp(logp_all)
                g = (np.bincount(y.ravel(), weights=g_lp.ravel(), minlength=V).astype(F32)
                     - p * g_lp.sum()) / temp
                if qcfg.ptx_coef > 0:
                    p0 = softmax(params["logits"])
                    g = g + F32(qcfg.ptx_coef) * -(ptx_c - ptx_c.sum() * p0) / ptx_C
                clip_frac += float(np.mean(np.abs(ratio - 1.0) > clip))
                approx_kl += float(np.mean(ratio - 1.0 - log_ratio))
                params = opt.apply(params, {"logits": g.astype(F32)})
        n_mb = qcfg.epochs * qcfg.minibatches
        it.update(clip_fraction=clip_frac / n_mb, approx_kl=approx_kl / n_mb, kl_coef=float(kl_coef))
        stats.append(it)
        if max_kl is not None and kl_mean > max_kl:  # kl_guard "skip": drop this iteration
            params, opt.mu, opt.nu, opt.count = snapshot
            continue
        if qcfg.kl_target is not None:
            err = min(max(kl_mean / qcfg.kl_target - 1.0, -0.2), 0.2)
            kl_coef = F32(kl_coef * (1.0 + err * R / qcfg.kl_horizon))
    return params["logits"], float(kl_coef), opt, stats


# --------------------------------------------------------------------------- driver
def run_numpy_pipeline(enc, tokenizer, cfg, *, seed: int | None = None, rm_scatter: str = "add.at",
                       pair_split: tuple[dict, dict] | None = None) -> dict[str, Any]:
    """M0 -> M1 -> RM -> M2 in NumPy on ``enc``; returns timings, metrics, objective, params.

    ``seed`` (default ``cfg.seed``) seeds one NumPy Generator per stage.  ``pair_split``
    = (train_pairs, heldout_pairs) fixes the RM's split (e.g. the one the JAX run drew,
    so both models are scored on the same held-out pairs); by default it is drawn
    like ``pipeline.split_pairs`` (first ``int(n * heldout_fraction)`` of a permutation).
    """
    if cfg.model != "unigram":
        raise ValueError(f"the NumPy reference implements the unigram family only, got {cfg.model!r}")
    V = enc.vocab_size
    seeds = np.random.SeedSequence(cfg.seed if seed is None else seed).spawn(4)
    rngs = dict(zip(("pretrain", "sft", "reward", "ppo"), map(np.random.default_rng, seeds)))
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    params: dict[str, Any] = {}
    cpu: dict[str, float] = {}  # process CPU seconds: robust to other load on the machine
    t_all, c_all = time.perf_counter(), time.process_time()

    # ---- M0
    t0, c0 = time.perf_counter(), time.process_time()
    pcfg = cfg.pretrain
    corpus_counts = token_counts(enc.corpus_tokens, enc.corpus_mask, V)
    if pcfg.mode == "exact":
        m0 = fit_exact(corpus_counts, pcfg.smoothing)
    else:
        n_tok = float(enc.corpus_mask.sum())
        eps = pcfg.smoothing * V / (n_tok + pcfg.smoothing * V)
        m0, _, _ = train_lm({"logits": np.zeros((V,), F32)}, enc.corpus_tokens, enc.corpus_mask,
                            pcfg, V, rngs["pretrain"], label_smoothing=eps)
    metrics["M0"] = {"mode": pcfg.mode, "nll": counts_nll(m0["logits"], corpus_counts)}
    params["M0"] = m0
    timings["M0"] = time.perf_counter() - t0
    cpu["M0"] = time.process_time() - c0

    # ---- M1
    t0, c0 = time.perf_counter(), time.process_time()
    demo_counts = token_counts(enc.sft_tokens, enc.sft_mask, V)
    before = counts_nll(m0["logits"], demo_counts)
    m1, opt1, _ = train_lm(dict(m0), enc.sft_tokens, enc.sft_mask, cfg.sft, V, rngs["sft"])
    metrics["M1"] = {"demo_nll_before": before, "demo_nll_after": counts_nll(m1["logits"], demo_counts),
                     "skipped_updates": opt1.skipped}
    params["M1"] = m1
    timings["M1"] = time.perf_counter() - t0
    cpu["M1"] = time.process_time() - c0

    # ---- RM
    t0, c0 = time.perf_counter(), time.process_time()
    rcfg = cfg.reward
    if pair_split is None:
        train_pairs, held_pairs = split_pairs(enc.pairs, rngs["reward"], rcfg.heldout_fraction)
    else:
        train_pairs, held_pairs = ({k: np.asarray(v) for k, v in part.items()} for part in pair_split)
    rm, opt_rm, _ = train_reward(train_pairs, rcfg, V, rngs["reward"], scatter=rm_scatter)
    rm_metrics = {"train_pairs": int(train_pairs["chosen"].shape[0]),
                  "heldout_pairs": int(held_pairs["chosen"].shape[0]),
                  **{f"train_{k}": v for k, v in pair_metrics(reward_margins(rm, train_pairs)).items()}}
    if held_pairs["chosen"].shape[0]:
        rm_metrics.update({f"heldout_{k}": v
                           for k, v in pair_metrics(reward_margins(rm, held_pairs)).items()})
    metrics["RM"] = {**rm_metrics, "skipped_updates": opt_rm.skipped}
    params["RM"] = rm
    timings["RM"] = time.perf_counter() - t0
    cpu["RM"] = time.process_time() - c0

    # ---- M2
    t0, c0 = time.perf_counter(), time.process_time()
    qcfg = cfg.ppo
    ref = m0["logits"] if qcfg.reference == "pretrain" else m1["logits"]
    penalty = penalty_vector(tokenizer, qcfg, V)
    start = exact_objective(m1["logits"], ref, rm, penalty, demo_counts, qcfg.response_len, qcfg.kl_coef)
    m2, kl_coef, opt2, stats = train_ppo(m1["logits"], ref, rm, penalty, enc.sft_tokens, enc.sft_mask,
                                         qcfg, V, rngs["ppo"])
    end = exact_objective(m2, ref, rm, penalty, demo_counts, qcfg.response_len, kl_coef)
    metrics["M2"] = {"reference": qcfg.reference, "final_kl_coef": kl_coef,
                     "skipped_updates": opt2.skipped, "unsafe_token_ids": int((penalty > 0).sum()),
                     "exact_before": start, "exact_after": end, "last_iteration": stats[-1]}
    params["M2"] = {"logits": m2}
    timings["M2"] = time.perf_counter() - t0
    cpu["M2"] = time.process_time() - c0
    timings["total"] = time.perf_counter() - t_all
    cpu["total"] = time.process_time() - c_all

    o = cfg.objective
    omega = end["KL"] + end["safety"]
    objective = {"L_SFT": end["L_SFT"], "L_RLHF": end["L_RLHF"], "KL": end["KL"], "safety": end["safety"],
                 "Omega": omega, "U": o.alpha * end["L_SFT"] + o.beta * end["L_RLHF"] + o.gamma * omega,
                 "tv_to_optimum": end["tv_to_optimum"]}
    return {"timings": timings, "cpu_timings": cpu, "metrics": metrics, "objective": objective, "params": params,
            "rm_heldout_accuracy": metrics["RM"].get("heldout_accuracy")}
