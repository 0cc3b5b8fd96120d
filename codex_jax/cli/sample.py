"""``codex-jax sample``: decoded samples from a saved stage of a run directory."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

from codex_jax.errors import CodexError


def cmd_sample(args: argparse.Namespace) -> int:
    import json
    import math

    import jax
    import jax.numpy as jnp

    from codex_jax.config import PipelineConfig, from_dict
    from codex_jax.data.tokenizer import BOS_ID, Tokenizer
    from codex_jax.models.registry import make_family
    from codex_jax.run.artifacts import load_params

    if args.num < 1 or args.length < 1:
        raise CodexError(f"--num and --length must be >= 1, got {args.num} and {args.length}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise CodexError(f"--temperature must be a finite number > 0, got {args.temperature}")
    run = pathlib.Path(args.run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise CodexError(f"{run}: not a run directory (no config.json)")
    try:
        cfg = from_dict(PipelineConfig, json.loads(cfg_path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise CodexError(f"{cfg_path}: not a valid run config ({type(err).__name__}: {err})") from None
    if cfg.model == "transformer":
        from codex_jax.data.bpe import BPETokenizer

        tokenizer = BPETokenizer.load(run / "vocab.json")
    else:
        tokenizer = Tokenizer.load(run / "vocab.json")
    params = load_params(run / "params" / f"{args.stage}.npz")
    family = make_family(cfg.model, tokenizer.vocab_size,
                         cfg.transformer if cfg.model == "transformer" else None)
    prompt = jnp.full((args.num, 1), BOS_ID, jnp.int32)
    out = family.sample(params, jax.random.key(args.seed), prompt, jnp.ones_like(prompt),
                        args.length, args.temperature)
    for row in jax.device_get(out):
        print(tokenizer.decode(row.tolist()))
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
