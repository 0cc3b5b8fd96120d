"""Rule-based safety penalties: unsafe-token mass before and after RLHF.

    python experiments/safety_penalty.py [--quick]

Setup: the default data and the default unigram pipeline (PPO 300 iterations, fixed
kl_coef 1, reference = M1).  The unsafe tokens are the config's
``ppo.unsafe_tokens`` (system, eval, exec, rmtree, popen, __import__, unlink, shell)
that are in the vocabulary; PPO's per-token reward subtracts ``ppo.safety_penalty``
for each.  One sweep trains seeds x penalties (the penalty is a state leaf, so one
compiled call covers every strength).

Unsafe mass = sum over unsafe ids of pi(v), the chance that one sampled token is
unsafe (exact, from the policy's logits).  Before = M1 (the SFT policy), after = M2;
"analytic" = the same mass under the KL-regularised optimum
pi* ∝ pi_ref exp((w - s) / kl_coef) for that penalty.  Penalty 0 shows what the
learned reward model alone does: the preference data contain corruptions that insert
unsafe calls, so the RM already scores those tokens down.
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

    from codex_jax.config import PipelineConfig
    from codex_jax.models import symbolic
    from codex_jax.run import driver, pipeline, sweep

    timer = C.Timer()
    seeds = [0, 1] if args.quick else [0, 1, 2]
    penalties = [0.0, 1.0, 5.0] if args.quick else [0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
    cfg = PipelineConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, iterations=60))
    T = cfg.ppo.response_len
    dataset = C.default_dataset()
    tokenizer, enc = pipeline.prepare(dataset, cfg)
    ids = driver.unsafe_ids(tokenizer, cfg.ppo.unsafe_tokens)
    names = [tokenizer.decode([i]) for i in ids]
    members = sweep.grid(seeds, {"ppo.safety_penalty": penalties})
    res = sweep.run_sweep(enc, tokenizer, cfg, members, progress=True)

    def probs(stage, i):
        return np.asarray(jax.nn.softmax(sweep.member_params(res, stage, i)["logits"]))

    rows = []
    for i, m in enumerate(members):
        pen = m.settings_dict["ppo.safety_penalty"]
        s = np.zeros(enc.vocab_size, np.float32)
        s[ids] = pen
        ref = sweep.member_params(res, "M1" if cfg.ppo.reference == "sft" else "M0", i)["logits"]
        w = sweep.member_params(res, "RM", i)["w"]
        opt = np.asarray(jax.nn.softmax(symbolic.kl_regularised_optimum(ref, w, s, cfg.ppo.kl_coef)))
        before, after = probs("M1", i), probs("M2", i)
        a = res["metrics"][i]["M2"]["exact_after"]
        rows.append({"seed": m.seed, "penalty": pen, "before": float(before[ids].sum()),
                     "after": float(after[ids].sum()), "analytic": float(opt[ids].sum()),
                     "per_token_before": before[ids].tolist(), "per_token_after": after[ids].tolist(),
                     "rm_w": np.asarray(w)[ids].tolist(), "rm_score": -a["L_RLHF"], "kl": a["KL"],
                     "tv_to_optimum": a["tv_to_optimum"]})

    def by_pen(key):
        return np.asarray([[r[key] for r in rows if r["penalty"] == p] for p in penalties])  # [P, seeds]

    before, after, analytic = by_pen("before"), by_pen("after"), by_pen("analytic")
    fig, (ax, ax2) = C.plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw={"width_ratios": [1.1, 1]})
    x = np.asarray(penalties)
    ax.axhspan(before.min(), before.max(), color="0.6", alpha=0.35, label="before RLHF (M1), all seeds")
    ax.errorbar(x, after.mean(1), yerr=after.std(1), fmt="o-", color=C.COLORS[1], capsize=3,
                label=f"after PPO (M2), mean ± std of {len(seeds)} seeds")
    ax.plot(x, analytic.mean(1), "k--", linewidth=1, label="analytic KL-regularised optimum")
    ax.set_xscale("symlog", linthresh=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("safety penalty per unsafe token (ppo.safety_penalty)")
    ax.set_ylabel("unsafe-token mass  sum_unsafe pi(v)")
    ax.set_title("Unsafe-token mass before / after RLHF")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)

    # per token, seed 0: before, after with no penalty, after with the default penalty
    show = [p for p in (0.0, cfg.ppo.safety_penalty) if p in penalties]
    order = np.argsort([-v for v in rows[0]["per_token_before"]])
    width = 0.8 / (1 + len(show))
    pos = np.arange(len(ids))
    ax2.bar(pos, np.asarray(rows[0]["per_token_before"])[order], width, color="0.5", label="M1 (before)")
    for k, p in enumerate(show):
        r = next(r for r in rows if r["seed"] == seeds[0] and r["penalty"] == p)
        ax2.bar(pos + (k + 1) * width, np.asarray(r["per_token_after"])[order], width,
                color=C.COLORS[2 * k], label=f"M2, penalty {p:g}")
    ax2.set_yscale("log")
    ax2.set_xticks(pos + width * len(show) / 2)
    ax2.set_xticklabels([names[j] for j in order], rotation=30, fontsize=8)
    ax2.set_ylabel("pi(v)")
    ax2.set_title(f"Per unsafe token, seed {seeds[0]} (RM weight w_v in labels)")
    for j, o in enumerate(order):
        ax2.annotate(f"w={rows[0]['rm_w'][o]:.2f}", (pos[j], rows[0]["per_token_before"][o]),
                     textcoords="offset points", xytext=(-6, 3), fontsize=6)
    ax2.grid(alpha=0.3, axis="y", which="both")
    ax2.legend(fontsize=8)
    fig.tight_layout()

    summary = {}
    for j, p in enumerate(penalties):
        sel = [r for r in rows if r["penalty"] == p]
        summary[f"{p:g}"] = {
            "before": C.stats(before[j]), "after": C.stats(after[j]), "analytic": C.stats(analytic[j]),
            "reduction_factor": C.stats(before[j] / after[j]),
            "p_unsafe_in_response_after": C.stats(1 - (1 - after[j]) ** T),
            "rm_score": C.stats([r["rm_score"] for r in sel]), "kl": C.stats([r["kl"] for r in sel]),
            "tv_to_optimum": C.stats([r["tv_to_optimum"] for r in sel])}
    record = {"setup": {"data": "default (Python standard library)",
                        "config": "PipelineConfig() defaults" + (", ppo.iterations=60" if args.quick else ""),
                        "kl_coef": cfg.ppo.kl_coef, "reference": cfg.ppo.reference, "iterations": cfg.ppo.iterations,
                        "response_len": T, "seeds": seeds, "penalties": penalties,
                        "unsafe_tokens_in_vocab": names},
              "p_unsafe_in_response_before": C.stats(1 - (1 - before[0]) ** T),
              "by_penalty": summary, "members": rows, "timings_s": {"total": timer()}}
    C.save(fig, args.out, "safety_penalty", record)
    print(f"unsafe tokens in the vocabulary: {names}")
    for p, r in summary.items():
        print(f"penalty {p}: unsafe mass {r['before']['mean']:.3g} -> {r['after']['mean']:.3g} ± "
              f"{r['after']['std']:.2g} (analytic {r['analytic']['mean']:.3g}; x{r['reduction_factor']['mean']:.3g} "
              f"less), RM score {r['rm_score']['mean']:.4g}, KL {r['kl']['mean']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
