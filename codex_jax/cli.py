"""Command line: ``codex-jax run`` (the whole pipeline) and ``codex-jax sample``."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from codex_jax.errors import CodexError


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a second run skips compiling."""
    import jax

    cache = os.environ.get("CODEX_JAX_CACHE", str(pathlib.Path.home() / ".cache" / "codex-jax"))
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(cache) / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _load_dataset(source: str | None):
    """A user's directory, or the built-in default data (source None or "default")."""
    import dataclasses

    from codex_jax import data

    if source is not None and source != "default":
        ds = data.load_dataset(source)
        return dataclasses.replace(ds, source=str(pathlib.Path(source).absolute()))
    from codex_jax.default_data import default_data_dir

    print("[    data] building or reading the default data set (Python standard library)", file=sys.stderr)
    return dataclasses.replace(data.load_dataset(default_data_dir()), source="default")


def _parse_stop_after(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    stage, _, step = text.partition(":")
    if stage not in ("pretrain", "sft", "reward", "ppo") or not step.isdigit() or int(step) < 1:
        raise CodexError(f"--stop-after must be STAGE:STEP with STAGE in pretrain/sft/reward/ppo "
                         f"and STEP >= 1, got {text!r}")
    return stage, int(step)


def _start_devices(args: argparse.Namespace):
    """Validates --mesh/--fsdp, starts multi-process JAX (--distributed); returns a
    function that builds the Layout (None: one device)."""
    from codex_jax.sharding import make_layout, parse_mesh

    if args.fsdp and args.mesh is None:
        raise CodexError("--fsdp shards parameters over the data axis of a mesh; give --mesh data=N too")
    sizes = parse_mesh(args.mesh) if args.mesh is not None else None
    given = [f for f, v in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                            ("--process-id", args.process_id)) if v is not None]
    if given and not args.distributed:
        raise CodexError(f"{'/'.join(given)} only apply with --distributed")
    if args.distributed:
        import jax

        # unset values are detected from the cluster (Cloud TPU, SLURM, ...) by JAX
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    if sizes is None:
        return None
    return lambda: make_layout(sizes, fsdp=args.fsdp)


def cmd_run(args: argparse.Namespace) -> int:
    from codex_jax.config import load_config
    from codex_jax.loop import StopRequested
    from codex_jax.pipeline import read_run_record, run_pipeline

    stop_after = _parse_stop_after(args.stop_after)
    layout = _start_devices(args)
    if args.resume is not None:
        if args.config or args.data or args.seed is not None or args.model:
            raise CodexError("--resume takes the run's own config, data and seed; "
                             "do not pass --config/--data/--seed/--model with it")
        out = args.resume
        cfg, source = read_run_record(out)
        dataset = _load_dataset(source)
    else:
        out = args.out
        cfg = load_config(args.config, seed=args.seed, model=args.model)
        dataset = _load_dataset(args.data)
    _enable_compilation_cache()
    try:
        summary = run_pipeline(dataset, cfg, out, progress=not args.quiet, resume=args.resume is not None,
                               stop_after=stop_after, layout=layout() if layout else None)
    except StopRequested as stop:
        print(f"{stop}; continue with: codex-jax run --resume {out}", file=sys.stderr)
        return 0
    obj = summary.get("objective") or {}
    rm = summary["stages"]["RM"]
    nan = float("nan")
    print(f"wrote {out}: vocab {summary['vocab_size']}, "
          f"RM held-out accuracy {rm.get('heldout_accuracy', nan):.3f}, "
          f"TV to the KL-regularised optimum {summary['stages']['M2']['exact_after'].get('tv_to_optimum', nan):.4f}, "
          f"U={obj.get('U', nan):.4f} (L_SFT={obj.get('L_SFT', nan):.4f}, "
          f"L_RLHF={obj.get('L_RLHF', nan):.4f}, Omega={obj.get('Omega', nan):.4f}), "
          f"{summary['timings_s']['total']:.1f}s")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import json

    import jax
    import jax.numpy as jnp

    from codex_jax.artifacts import load_params
    from codex_jax.config import PipelineConfig, from_dict
    from codex_jax.family import make_family
    from codex_jax.tokenizer import BOS_ID, Tokenizer

    import math

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
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CodexError(f"{cfg_path}: not a valid run config ({type(err).__name__}: {err})") from None
    if cfg.model == "transformer":
        from codex_jax.bpe import BPETokenizer

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codex-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run pretrain -> SFT -> RM -> PPO and write a run directory")
    run.add_argument("--data", help="directory with corpus.jsonl, demos.jsonl, prefs.jsonl "
                                    "(default: built from the Python standard library)")
    run.add_argument("--out", default="runs/latest", help="output directory (default: runs/latest)")
    run.add_argument("--config", help="TOML or JSON pipeline config")
    run.add_argument("--seed", type=int, default=None, help="root PRNG seed (overrides the config)")
    run.add_argument("--model", choices=("unigram", "transformer"), default=None,
                     help="model family (default: unigram; 'transformer' takes its own defaults)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--resume", metavar="OUT", help="continue the stopped run in OUT from its checkpoints")
    run.add_argument("--stop-after", metavar="STAGE:STEP",
                     help="stop right after the checkpoint at STAGE:STEP (e.g. sft:40); resume later")
    run.add_argument("--mesh", metavar="data=N[,model=M]",
                     help="run every stage on an N x M device mesh: batches split over 'data', "
                          "parameters replicated, or split over 'model' (default: one device)")
    run.add_argument("--fsdp", action="store_true",
                     help="also split parameters and optimiser state over the data axis (FSDP / ZeRO-3)")
    run.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() first (see README)")
    run.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed: process 0's address")
    run.add_argument("--num-processes", type=int, help="with --distributed: how many processes")
    run.add_argument("--process-id", type=int, help="with --distributed: this process's index")
    run.set_defaults(func=cmd_run)

    from codex_jax import audit

    audit.add_parser(sub)
    from codex_jax import sweep

    sweep.add_parser(sub)

    smp = sub.add_parser("sample", help="print samples from a saved stage")
    smp.add_argument("--run", default="runs/latest", help="run directory")
    smp.add_argument("--stage", choices=("M0", "M1", "M2"), default="M2")
    smp.add_argument("--num", type=int, default=5)
    smp.add_argument("--length", type=int, default=24)
    smp.add_argument("--temperature", type=float, default=1.0)
    smp.add_argument("--seed", type=int, default=0)
    smp.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CodexError as err:
        print(f"codex-jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
