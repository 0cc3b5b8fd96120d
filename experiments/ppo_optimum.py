"""PPO on the unigram policy converges to the analytic KL-regularised optimum.

    python experiments/ppo_optimum.py [--quick]

Setup: the default data (Python standard library) and the default unigram pipeline
(exact M0, SFT, Bradley-Terry RM, PPO: 300 iterations x 512 rollouts of 16 tokens,
reference = M1).  One ``codex_jax.run.sweep`` call trains seeds x KL coefficients, every
member with its own seed's SFT policy, reward model and reference.  Every 10 PPO
iterations the exact total-variation distance between each member's policy and its
own analytic optimum

    pi*(v) ∝ pi_ref(v) exp((w_v - s_v) / kl_coef)

(w: that member's RM weights, s: the safety penalty) is recorded.  Figure: TV vs
iteration (mean over seeds, band = min..max over seeds) per KL coefficient; and the
final policy against pi* token by token for seed 0.
"""

from __future__ import annotations

import sys

import _common as C
import numpy as np


def main() -> int:
    args = C.parse(C.parser(__doc__))
    C.enable_cache()
    import dataclasses

    import jax

    from codex_jax.config import PipelineConfig
    from codex_jax.models import symbolic
    from codex_jax.run import driver, pipeline, sweep

    timer = C.Timer()
    seeds = [0, 1] if args.quick else [0, 1, 2, 3]
    kl_coefs = [0.3, 1.0, 3.0] if args.quick else [0.1, 0.3, 1.0, 3.0]
    cfg = PipelineConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, iterations=60))
    eval_every = 5 if args.quick else 10
    dataset = C.default_dataset()
    tokenizer, enc = pipeline.prepare(dataset, cfg)
    members = sweep.grid(seeds, {"ppo.kl_coef": kl_coefs})
    print(f"{len(members)} members: seeds {seeds} x kl_coef {kl_coefs}", file=sys.stderr)
    res = sweep.run_sweep(enc, tokenizer, cfg, members, eval_every=eval_every, progress=True)
    ev = res["curves"]["ppo_eval"]
    steps = ev["step"].tolist()
    tv = ev["tv_to_optimum"]  # [K, evals]

    fig, (ax, ax2) = C.plt.subplots(1, 2, figsize=(11, 4.2))
    record = {"setup": {"data": "default (Python standard library)", "vocab_size": enc.vocab_size,
                        "config": "PipelineConfig() defaults (unigram)" + (", ppo.iterations=60" if args.quick else ""),
                        "ppo_iterations": cfg.ppo.iterations, "rollouts": cfg.ppo.rollouts,
                        "response_len": cfg.ppo.response_len, "reference": cfg.ppo.reference,
                        "safety_penalty": cfg.ppo.safety_penalty, "seeds": seeds, "kl_coefs": kl_coefs,
                        "eval_every": eval_every, "band": "min..max over seeds"},
              "results": {}}
    for j, kl in enumerate(kl_coefs):
        idx = [i for i, m in enumerate(members) if m.settings_dict["ppo.kl_coef"] == kl]
        curve = tv[idx]
        color = C.COLORS[j]
        ax.plot(steps, curve.mean(0), color=color, label=f"kl_coef = {kl:g}")
        ax.fill_between(steps, curve.min(0), curve.max(0), color=color, alpha=0.25, linewidth=0)
        record["results"][f"{kl:g}"] = {
            "tv_start": C.stats(curve[:, 0]), "tv_final": C.stats(curve[:, -1]),
            "kl_final": C.stats([res["metrics"][i]["M2"]["exact_after"]["KL"] for i in idx]),
            "rm_score_final": C.stats([-res["metrics"][i]["M2"]["exact_after"]["L_RLHF"] for i in idx]),
            "curve": {"step": steps, "mean": curve.mean(0).tolist(), "min": curve.min(0).tolist(),
                      "max": curve.max(0).tolist()}}
        # seed 0: final policy vs its analytic optimum, token by token
        i0 = idx[0]
        policy = sweep.member_params(res, "M2", i0)["logits"]
        ref = sweep.member_params(res, "M1", i0)["logits"]
        w = sweep.member_params(res, "RM", i0)["w"]
        penalty = driver.unsafe_ids(tokenizer, cfg.ppo.unsafe_tokens)
        s = np.zeros(enc.vocab_size, np.float32)
        s[penalty] = cfg.ppo.safety_penalty
        opt = np.asarray(jax.nn.softmax(symbolic.kl_regularised_optimum(ref, w, s, kl)))
        got = np.asarray(jax.nn.softmax(policy))
        keep = opt > 1e-7
        ax2.scatter(opt[keep], got[keep], s=2, color=color, alpha=0.5, rasterized=True, label=f"{kl:g}")
    ax.set_yscale("log")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("TV(pi, pi*)")
    ax.set_title(f"Distance to the analytic optimum ({len(seeds)} seeds, band = min..max)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    lo = 1e-7
    ax2.plot([lo, 1], [lo, 1], color="k", linewidth=0.8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlim(lo, 1)
    ax2.set_ylim(lo, 1)
    ax2.set_xlabel("pi*(v), analytic optimum")
    ax2.set_ylabel("pi(v), PPO policy")
    ax2.set_title(f"Final policy vs optimum, seed {seeds[0]} ({enc.vocab_size} tokens)")
    ax2.legend(title="kl_coef", markerscale=5)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    record["timings_s"] = {**{k: round(v, 2) for k, v in res["timings"].items()}, "total": timer()}
    C.save(fig, args.out, "ppo_optimum", record)
    for kl, r in record["results"].items():
        print(f"kl_coef {kl}: TV start {r['tv_start']['mean']:.4f} -> final {r['tv_final']['mean']:.4f} "
              f"± {r['tv_final']['std']:.4f} (max {r['tv_final']['max']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
