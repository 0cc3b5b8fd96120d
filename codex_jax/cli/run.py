"""``codex-jax run``: the whole pipeline on the built-in or a user's data, with
resume, stop-after, device meshes and multi-process runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from codex_jax.cli.common import enable_compilation_cache, load_dataset, prepared_cache_dir, settle_gc
from codex_jax.errors import CodexError


def _parse_stop_after(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    stage, _, step = text.partition(":")
    from codex_jax.stages.table import LABELS  # deferred: it imports JAX

    if stage not in LABELS or not step.isdigit() or int(step) < 1:
        raise CodexError(f"--stop-after must be STAGE:STEP with STAGE in {'/'.join(LABELS)} "
                         f"and STEP >= 1, got {text!r}")
    return stage, int(step)


def _start_devices(args: argparse.Namespace):
    """Validates --mesh/--fsdp, starts multi-process JAX (--distributed); returns a
    function that builds the Layout (None: one device)."""
    from codex_jax.config.mesh import parse_mesh
    from codex_jax.core.sharding import make_layout

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


def with_tasks(cfg):
    """``--tasks``: the task set as data, nothing held out by content hash (held-out
    problems are separate), and the execution reward configured in ``[tasks]``."""
    import dataclasses

    from codex_jax.config import PipelineConfig, from_dict

    data = {**cfg.to_dict(), "tasks": {**dataclasses.asdict(cfg.tasks), "enabled": True}}
    data["data"]["heldout_fraction"] = 0.0
    return from_dict(PipelineConfig, data)


def cmd_run(args: argparse.Namespace) -> int:
    from codex_jax.config import load_config
    from codex_jax.run.pipeline import read_run_record, run_pipeline
    from codex_jax.run.train import StopRequested

    stop_after = _parse_stop_after(args.stop_after)
    layout = _start_devices(args)
    if args.resume is not None:
        if args.config or args.data or args.seed is not None or args.model or args.algorithm:
            raise CodexError("--resume takes the run's own config, data and seed; "
                             "do not pass --config/--data/--seed/--model/--algorithm with it")
        out = args.resume
        if args.tasks:
            raise CodexError("--resume takes the run's own data; do not pass --tasks with it")
        cfg, source = read_run_record(out)
        dataset = load_dataset(source, cfg)
    else:
        out = args.out
        cfg = load_config(args.config, seed=args.seed, model=args.model, algorithm=args.algorithm)
        if args.tasks:
            if args.data:
                raise CodexError("--tasks uses the built-in task set as the data; do not pass --data with it")
            cfg = with_tasks(cfg)
        dataset = load_dataset("tasks" if cfg.tasks.enabled else args.data, cfg)
    enable_compilation_cache()
    settle_gc()
    try:
        summary = run_pipeline(dataset, cfg, out, progress=not args.quiet, resume=args.resume is not None,
                               stop_after=stop_after, layout=layout() if layout else None,
                               cache_dir=prepared_cache_dir())
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
    fn = summary.get("functional")
    if fn:
        m1, m2 = fn["stages"]["M1"], fn["stages"]["M2"]
        print(f"held-out {fn['problems']} problems, {fn['n']} samples at T={fn['temperature']} "
              f"({fn['isolation']}): pass@1 M1 {m1.get('pass@1', nan):.3f} -> M2 {m2.get('pass@1', nan):.3f}, "
              f"empty {m1['empty_rate']:.2f} -> {m2['empty_rate']:.2f}")
    return 0


def add_parser(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run pretrain -> SFT -> RM -> PPO and write a run directory")
    run.add_argument("--data", help="directory with corpus.jsonl, demos.jsonl, prefs.jsonl "
                                    "(default: built from the Python standard library)")
    run.add_argument("--out", default="runs/latest", help="output directory (default: runs/latest)")
    run.add_argument("--config", help="TOML or JSON pipeline config")
    run.add_argument("--seed", type=int, default=None, help="root PRNG seed (overrides the config)")
    run.add_argument("--model", choices=("unigram", "transformer"), default=None,
                     help="model family (default: unigram; 'transformer' takes its own defaults)")
    run.add_argument("--algorithm", choices=("ppo", "grpo", "rloo", "dpo"), default=None,
                     help="how M2 is trained (default: the config's 'algorithm', ppo): PPO, GRPO / Dr. GRPO, "
                          "RLOO (critic-free, KL estimator and placement in [grpo]/[rloo]) or DPO (offline, on "
                          "the pairs)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--tasks", action="store_true",
                     help="train on the built-in code task set with the execution reward of [tasks] and report "
                          "pass@k of M1 and M2 on its held-out problems (needs --model transformer)")
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
