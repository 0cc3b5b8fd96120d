"""Shared helpers of the experiments: data, output paths, figure style, JSON."""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = pathlib.Path(__file__).resolve().parent / "out"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a smaller, faster version (smoke test); writes to out/quick/ unless --out is given")
    p.add_argument("--out", default=None, help=f"output directory (default {OUT}, or {OUT / 'quick'} with --quick)")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parses the arguments; --quick runs never overwrite the full results by default."""
    args = p.parse_args()
    if args.out is None:
        args.out = str(OUT / "quick" if args.quick else OUT)
    return args


def enable_cache() -> None:
    """The CLI's persistent compilation cache (re-runs skip compiling)."""
    from codex_jax.cli.common import enable_compilation_cache

    enable_compilation_cache()


def default_dataset(max_files: int | None = None):
    """The built-in default data set (the Python standard library), as `codex-jax run` uses
    it; ``max_files`` builds a smaller one from the first N source files (quick runs)."""
    import dataclasses
    import tempfile

    from codex_jax.data import records as data
    from codex_jax.data import stdlib as default_data

    if max_files is None:
        return dataclasses.replace(data.load_dataset(default_data.default_data_dir()), source="default")
    out = pathlib.Path(tempfile.mkdtemp(prefix="codex-jax-exp-data-"))
    default_data.build_default_data(out, max_files=max_files)
    return dataclasses.replace(data.load_dataset(out), source=f"default (first {max_files} files)")


def twin_legend(ax, twin, **kwargs) -> None:
    """One legend on ``ax`` for its lines and those of its ``twinx()`` axis."""
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, **kwargs)


def save(fig, out: str | pathlib.Path, name: str, record: dict, dpi: int = 100) -> None:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    record = {"experiment": name, **record, "environment": environment()}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    size = (out / f"{name}.png").stat().st_size
    print(f"wrote {out / name}.png ({size / 1024:.0f} KB) and {name}.json", file=sys.stderr)


def environment() -> dict:
    from codex_jax.run.manifest import environment as env

    e = env()
    return {"python": platform.python_version(), "jax": e.get("jax"), "backend": e.get("backend"),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cpu(s)"}


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def stats(values) -> dict:
    import numpy as np

    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}
