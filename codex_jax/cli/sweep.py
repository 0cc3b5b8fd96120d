"""``codex-jax sweep``: seeds x settings in one vmapped, jitted call per stage chunk."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from codex_jax.cli.common import enable_compilation_cache, load_dataset
from codex_jax.errors import CodexError


def _floats_list(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CodexError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise CodexError(f"{flag} takes comma-separated numbers, got {text!r}")
    return values


# flag -> setting; "rl." is the section of the config's algorithm (ppo, grpo, rloo, dpo)
FLAGS = {"kl_coef": "rl.kl_coef", "lr": "rl.lr", "sft_lr": "sft.lr", "rm_lr": "reward.lr",
         "pretrain_lr": "pretrain.lr", "safety_penalty": "rl.safety_penalty"}


def cmd_sweep(args: argparse.Namespace) -> int:
    from codex_jax.config import load_config
    from codex_jax.run.driver import prepare
    from codex_jax.run.sweep import grid, member_config, run_sweep
    from codex_jax.run.sweep_report import write_sweep

    if args.seeds < 1:
        raise CodexError(f"--seeds must be >= 1, got {args.seeds}")
    cfg = load_config(args.config, model=args.model, algorithm=args.algorithm)
    first = cfg.seed if args.seed is None else args.seed
    settings = {}
    for attr, name in FLAGS.items():
        values = _floats_list(getattr(args, attr), "--" + attr.replace("_", "-"))
        if values is not None:
            settings[name.replace("rl.", f"{cfg.algorithm}.", 1)] = values
    members = grid(list(range(first, first + args.seeds)), settings)
    for m in members:
        member_config(cfg, m)  # bad values fail here (ConfigError), before any work
    if args.eval_every < 0:
        raise CodexError(f"--eval-every must be >= 0, got {args.eval_every}")
    dataset = load_dataset(args.data)
    enable_compilation_cache()
    t0 = time.perf_counter()
    tokenizer, enc = prepare(dataset, cfg)
    log = (lambda msg: print(f"[   sweep] {msg}", file=sys.stderr)) if not args.quiet else None
    if log:
        log(f"{len(members)} member(s): seeds {first}..{first + args.seeds - 1} x "
            f"{len(members) // args.seeds} setting(s) ({cfg.model}; memory grows with the members)")
    result = run_sweep(enc, tokenizer, cfg, members, eval_every=args.eval_every, progress=not args.quiet, log=log)
    record = write_sweep(args.out, result, cfg, data_source=dataset.source, total_s=time.perf_counter() - t0)
    shown_metrics = (("TV*", "stages.M2.exact_after.tv_to_optimum"),  # unigram only
                     ("RM held-out acc", "stages.RM.heldout_accuracy"), ("L_RLHF", "objective.L_RLHF"),
                     ("KL", "stages.M2.exact_after.KL"), ("safety", "stages.M2.exact_after.safety"),
                     ("U", "objective.U"))
    for row in record["summary"]:
        m, s = row["mean"], row["std"]
        desc = ", ".join(f"{k}={v:g}" for k, v in row["settings"].items()) or "(config)"
        shown = [f"{name}={m[k]:.4g}±{s[k]:.2g}" for name, k in shown_metrics if k in m]
        print(f"{desc}: {' '.join(shown)} over {len(row['seeds'])} seed(s)")
    tripped = [i for i, g in enumerate(result["guard"]) if g]
    if tripped:
        print(f"codex-jax: warning: guards tripped in member(s) {tripped} (see members/<i>/summary.json)",
              file=sys.stderr)
    print(f"wrote {args.out}: {len(members)} members, {record['timings_s']['total']:.1f}s")
    return 0


def add_parser(subparsers: Any) -> None:
    """Registers ``sweep`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser(
        "sweep", help="train many seeds x settings at once (jax.vmap, one compiled call per stage)",
        description="Runs the pipeline for K seeds x the product of the given settings in one vmapped, "
                    "jitted call per stage chunk and writes OUT/members/<i>/summary.json, OUT/sweep.json "
                    "(mean/std over seeds per setting) and OUT/curves.npz. Member i equals, up to float rounding, "
                    "`codex-jax run` with its seed and settings. Training memory grows with the number "
                    "of members (mind it with --model transformer).")
    p.add_argument("--seeds", type=int, required=True, help="number of seeds: SEED, SEED+1, ..., SEED+K-1")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: the config's)")
    p.add_argument("--kl-coef", metavar="A,B,...", help="PPO (initial) KL coefficients")
    p.add_argument("--lr", metavar="A,B,...", help="PPO learning rates (base rate of its schedule)")
    p.add_argument("--sft-lr", metavar="A,B,...", help="SFT learning rates")
    p.add_argument("--rm-lr", metavar="A,B,...", help="reward-model learning rates")
    p.add_argument("--pretrain-lr", metavar="A,B,...", help="pretraining learning rates (gradient mode)")
    p.add_argument("--safety-penalty", metavar="A,B,...", help="penalties per unsafe token")
    p.add_argument("--eval-every", type=int, default=0,
                   help="unigram: exact objective terms every N PPO iterations into curves.npz (0: off)")
    p.add_argument("--data", help="data directory, as for `run` (default: the built-in data)")
    p.add_argument("--config", help="TOML or JSON pipeline config, as for `run`")
    p.add_argument("--model", choices=("unigram", "transformer"), default=None)
    p.add_argument("--algorithm", choices=("ppo", "grpo", "rloo", "dpo"), default=None,
                   help="how M2 is trained (default: the config's, ppo); --lr/--kl-coef/--safety-penalty apply to it")
    p.add_argument("--out", default="runs/sweep", help="output directory (default: runs/sweep)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_sweep)
