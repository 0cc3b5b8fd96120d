"""Fixed vs adaptive KL coefficient: the reward / KL trade-off of PPO on the unigram.

    python experiments/kl_control.py [--quick]

Setup: the default data and the default unigram pipeline (PPO 300 iterations x 512
rollouts of 16 tokens, reference = M1, safety penalty 5 per unsafe token).

* fixed: one sweep over seeds x ``ppo.kl_coef`` (the coefficient stays put);
* adaptive: the controller of Ziegler et al. (2019), ``ppo.kl_target`` = T, which moves
  the coefficient by at most ±0.2 * rollouts / kl_horizon (here ±1%) per iteration
  towards a sampled KL of T.  ``kl_target`` is static config, so each target is its own
  sweep over seeds x initial coefficients (0.3 and 3).

Every point is the exact (closed-form) KL(pi || ref) and the exact expected reward
minus safety penalty of a final policy, per 16-token response; the black curve is the
analytic frontier: the optimum pi_beta ∝ ref exp((w - s)/beta) for every beta, which no
policy can beat (drawn for seed 0's RM and reference; each point's gap below it,
``gap_to_own_frontier``, is taken against its own seed's frontier).
"""

from __future__ import annotations

import dataclasses
import sys

import _common as C
import numpy as np


def main() -> int:
    args = C.parse(C.parser(__doc__))
    C.enable_cache()
    import jax
    import jax.numpy as jnp

    from codex_jax.config import PipelineConfig
    from codex_jax.core import kernels
    from codex_jax.models import symbolic
    from codex_jax.run import driver, pipeline, sweep

    timer = C.Timer()
    seeds = [0, 1] if args.quick else [0, 1, 2]
    fixed_coefs = [0.1, 0.3, 1.0, 3.0] if args.quick else [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
    targets = [2.0, 16.0] if args.quick else [1.0, 4.0, 16.0]
    inits = [0.3, 3.0]
    base = PipelineConfig()
    if args.quick:
        base = dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, iterations=60))
    dataset = C.default_dataset()
    tokenizer, enc = pipeline.prepare(dataset, base)
    T = base.ppo.response_len

    def point(res, i):
        a = res["metrics"][i]["M2"]["exact_after"]
        return a["KL"], -a["L_RLHF"] - a["safety"]

    fixed = sweep.run_sweep(enc, tokenizer, base, sweep.grid(seeds, {"ppo.kl_coef": fixed_coefs}), progress=True)
    adaptive = {}
    for t in targets:
        cfg = dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, kl_target=t))
        adaptive[t] = sweep.run_sweep(enc, tokenizer, cfg, sweep.grid(seeds, {"ppo.kl_coef": inits}), progress=True)

    # the analytic frontier of each seed's own reference (M1) and RM (both depend on the seed only)
    s = np.zeros(enc.vocab_size, np.float32)
    s[driver.unsafe_ids(tokenizer, base.ppo.unsafe_tokens)] = base.ppo.safety_penalty
    betas = np.geomspace(0.02, 20, 80)

    def frontier(i: int) -> np.ndarray:
        """(KL, reward) of pi_beta for every beta, for member i's reference and RM.  [len(betas), 2]"""
        ref = sweep.member_params(fixed, "M1", i)["logits"]
        w = sweep.member_params(fixed, "RM", i)["w"]
        b = float(sweep.member_params(fixed, "RM", i)["b"])
        out = []
        for beta in betas:
            logits = symbolic.kl_regularised_optimum(ref, w, jnp.asarray(s), beta)
            p = jax.nn.softmax(logits)
            out.append((T * float(kernels.categorical_kl(logits, ref)), b + T * float(jnp.dot(p, w - s))))
        return np.asarray(out)

    fronts = {}
    for i, m in enumerate(fixed["members"]):
        fronts.setdefault(m.seed, frontier(i))
    front = fronts[seeds[0]]

    def gap(seed: int, kl: float, reward: float) -> float:
        """How far below its own seed's frontier a point lies (KL falls as beta grows)."""
        f = fronts[seed]
        return float(np.interp(kl, f[::-1, 0], f[::-1, 1]) - reward)

    fig, axes = C.plt.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    ax.plot(front[:, 0], front[:, 1], color="k", linewidth=1, label=f"analytic optimum (seed {seeds[0]})")
    record = {"setup": {"data": "default (Python standard library)", "config": "PipelineConfig() defaults"
                        + (", ppo.iterations=60" if args.quick else ""),
                        "iterations": base.ppo.iterations, "rollouts": base.ppo.rollouts, "response_len": T,
                        "kl_horizon": base.ppo.kl_horizon, "seeds": seeds, "fixed_kl_coefs": fixed_coefs,
                        "kl_targets": targets, "adaptive_initial_kl_coefs": inits,
                        "reward": "exact E[RM score] - E[safety penalty] per response",
                        "kl": "exact T * KL(pi || ref) per response"},
              "fixed": {}, "adaptive": {}, "frontier": {"beta": betas.tolist(), "kl": front[:, 0].tolist(),
                                                        "reward": front[:, 1].tolist(), "seed": seeds[0]}}
    pts = []
    for c in fixed_coefs:
        idx = [i for i, m in enumerate(fixed["members"]) if m.settings_dict["ppo.kl_coef"] == c]
        kl, r = np.asarray([point(fixed, i) for i in idx]).T
        pts.append((kl.mean(), r.mean(), kl.std(), r.std()))
        gaps = [gap(fixed["members"][i].seed, k, rr) for i, k, rr in zip(idx, kl, r)]
        record["fixed"][f"{c:g}"] = {"kl": C.stats(kl), "reward": C.stats(r),
                                     # each member against the frontier of its own reference and RM
                                     "gap_to_frontier": float(np.mean(gaps)), "gap_to_own_frontier": C.stats(gaps)}
    pts = np.asarray(pts)
    ax.errorbar(pts[:, 0], pts[:, 1], xerr=pts[:, 2], yerr=pts[:, 3], fmt="o-", color=C.COLORS[0],
                markersize=4, capsize=2, label="fixed kl_coef (mean ± std)")
    for c, (x, y, *_) in zip(fixed_coefs, pts):
        ax.annotate(f"{c:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=C.COLORS[0])
    for j, t in enumerate(targets):
        res = adaptive[t]
        kl, r = np.asarray([point(res, i) for i in range(len(res["members"]))]).T
        final_coef = [m["M2"]["final_kl_coef"] for m in res["metrics"]]
        ax.scatter(kl, r, marker="^", color=C.COLORS[1 + j], zorder=3, s=25,
                   label=f"adaptive, target {t:g}")
        ax.axvline(t, color=C.COLORS[1 + j], linestyle=":", linewidth=0.8)
        sampled = res["curves"]["ppo"]["kl"]
        tail = sampled[:, -max(1, sampled.shape[1] // 5):].mean(1)
        record["adaptive"][f"{t:g}"] = {
            "kl": C.stats(kl), "reward": C.stats(r), "final_kl_coef": C.stats(final_coef),
            "sampled_kl_last_fifth": C.stats(tail),
            "gap_to_own_frontier": C.stats([gap(m.seed, k, rr) for m, k, rr in zip(res["members"], kl, r)]),
            "members": [{"seed": m.seed, "initial_kl_coef": m.settings_dict["ppo.kl_coef"],
                         "final_kl_coef": fc, "kl": float(k), "reward": float(rr)}
                        for m, fc, k, rr in zip(res["members"], final_coef, kl, r)]}
        steps = np.arange(1, sampled.shape[1] + 1)
        for i, m in enumerate(res["members"]):
            style = "-" if m.settings_dict["ppo.kl_coef"] == inits[0] else "--"
            lab = f"target {t:g}, start {m.settings_dict['ppo.kl_coef']:g}" if m.seed == seeds[0] else None
            axes[1].plot(steps, sampled[i], style, color=C.COLORS[1 + j], linewidth=0.7, alpha=0.7, label=lab)
            axes[2].plot(steps, res["curves"]["ppo"]["kl_coef"][i], style, color=C.COLORS[1 + j], linewidth=0.8,
                         alpha=0.8, label=lab)
        axes[1].axhline(t, color=C.COLORS[1 + j], linestyle=":", linewidth=1.2)
    for c_i, c in enumerate(fixed_coefs):
        if c in (min(fixed_coefs), max(fixed_coefs)):
            axes[2].axhline(c, color=C.COLORS[0], linewidth=0.8, alpha=0.6)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("KL(pi || ref) per response (exact)")
    ax.set_ylabel("RM score - safety penalty per response (exact)")
    ax.set_title("Reward vs KL: fixed and adaptive coefficients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("PPO iteration")
    axes[1].set_ylabel("sampled KL per response")
    axes[1].set_title("Adaptive: sampled KL vs target (dotted)")
    axes[1].grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=6, ncol=1)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("PPO iteration")
    axes[2].set_ylabel("kl_coef")
    axes[2].set_title(f"Adaptive coefficient (blue: fixed {min(fixed_coefs):g} and {max(fixed_coefs):g})")
    axes[2].grid(alpha=0.3, which="both")
    fig.tight_layout()
    record["timings_s"] = {"total": timer()}
    C.save(fig, args.out, "kl_control", record)
    for c, r in record["fixed"].items():
        print(f"fixed {c}: KL {r['kl']['mean']:.3g} reward {r['reward']['mean']:.4g} "
              f"(gap to frontier {r['gap_to_frontier']:.3g})")
    for t, r in record["adaptive"].items():
        print(f"adaptive target {t}: exact KL {r['kl']['mean']:.3g} ± {r['kl']['std']:.2g}, sampled KL (last 20%) "
              f"{r['sampled_kl_last_fifth']['mean']:.3g}, reward {r['reward']['mean']:.4g}, final coef "
              f"{r['final_kl_coef']['min']:.3g}..{r['final_kl_coef']['max']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
