"""``codex-jax sample``: decoded samples from a saved stage of a run directory."""

from __future__ import annotations

import argparse
from typing import Any

from codex_jax.errors import CodexError


def cmd_sample(args: argparse.Namespace) -> int:
    import math

    import jax
    import jax.numpy as jnp

    from codex_jax.config.tokenizers import BOS_ID
    from codex_jax.models.registry import family_for
    from codex_jax.run.artifacts import load_params
    from codex_jax.run.functional import load_run

    if args.num < 1 or args.length < 1:
        raise CodexError(f"--num and --length must be >= 1, got {args.num} and {args.length}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise CodexError(f"--temperature must be a finite number > 0, got {args.temperature}")
    run = load_run(args.run)
    params = load_params(run.path / "params" / f"{args.stage}.npz")
    family = family_for(run.cfg, run.tokenizer.vocab_size)
    prompt = jnp.full((args.num, 1), BOS_ID, jnp.int32)
    out = family.sample(params, jax.random.key(args.seed), prompt, jnp.ones_like(prompt),
                        args.length, args.temperature)
    for row in jax.device_get(out):
        print(run.tokenizer.decode(row.tolist()))
    return 0


def add_parser(subparsers: Any) -> None:
    smp = subparsers.add_parser("sample", help="print samples from a saved stage")
    smp.add_argument("--run", default="runs/latest", help="run directory")
    smp.add_argument("--stage", choices=("M0", "M1", "M2"), default="M2")
    smp.add_argument("--num", type=int, default=5)
    smp.add_argument("--length", type=int, default=24)
    smp.add_argument("--temperature", type=float, default=1.0)
    smp.add_argument("--seed", type=int, default=0)
    smp.set_defaults(func=cmd_sample)
