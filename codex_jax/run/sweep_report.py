"""A sweep's results on disk: per-member summaries, mean/std over seeds per setting,
training curves (``OUT/members/<i>/summary.json``, ``OUT/sweep.json``, ``OUT/curves.npz``)."""

from __future__ import annotations

import io
import pathlib

import numpy as np

from codex_jax.errors import CodexError
from codex_jax.run import artifacts
from codex_jax.run.manifest import environment
from codex_jax.stages.table import STAGE_NAMES


def flatten_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"M2.exact_after.tv_to_optimum": value, ...}: numbers only (no flags, no strings)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def summarise(result: dict) -> list[dict]:
    """Per setting (in grid order): its members, seeds, and the mean and std (numpy,
    ddof=0) over those seeds of every final metric ("stages.*" and "objective.*")."""
    by_setting: dict[tuple, list[int]] = {}
    for i, m in enumerate(result["members"]):
        by_setting.setdefault(m.settings, []).append(i)
    out = []
    for settings, idx in by_setting.items():
        flat = [flatten_metrics({"stages": result["metrics"][i], "objective": result["objective"][i]})
                for i in idx]
        names = [n for n in flat[0] if all(n in f for f in flat)]
        values = {n: np.asarray([f[n] for f in flat], np.float64) for n in names}
        out.append({"settings": dict(settings), "members": idx,
                    "seeds": [result["members"][i].seed for i in idx],
                    "mean": {n: float(np.mean(v)) for n, v in values.items()},
                    "std": {n: float(np.std(v)) for n, v in values.items()}})
    return out


def write_sweep(out_dir: str | pathlib.Path, result: dict, cfg, *, data_source: str = "",
                total_s: float | None = None) -> dict:
    """Writes OUT/members/<i>/summary.json, OUT/sweep.json and OUT/curves.npz; returns sweep.json's dict."""
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CodexError(f"{out}: the output path exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    members = result["members"]
    for i, m in enumerate(members):
        artifacts.write_json(out / "members" / str(i) / "summary.json", {
            "index": i, "seed": m.seed, "settings": m.settings_dict, "model": cfg.model,
            "config_hash": result["configs"][i].config_hash(),
            "stages": result["metrics"][i], "objective": result["objective"][i],
            "fingerprints": result["fingerprints"][i], "guard": result["guard"][i]})
    settings: dict[str, list[float]] = {}
    for m in members:
        for k, v in m.settings:
            if v not in settings.setdefault(k, []):
                settings[k].append(v)
    record = {
        "model": cfg.model, "data_source": data_source, "num_members": len(members),
        "seeds": sorted({m.seed for m in members}), "settings": settings,
        "members": [{"index": i, "seed": m.seed, "settings": m.settings_dict, "guard": result["guard"][i]}
                    for i, m in enumerate(members)],
        "distinct_states": {s: int(np.max(result["index"][s])) + 1 for s in STAGE_NAMES},
        "summary": summarise(result),
        "timings_s": {**result["timings"], **({"total": total_s} if total_s is not None else {})},
        "config": cfg.to_dict(), "versions": environment(),
    }
    artifacts.write_json(out / "sweep.json", record)
    arrays = {f"{label}/{name}": np.asarray(v) for label, c in result["curves"].items() for name, v in c.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    artifacts.atomic_write_bytes(out / "curves.npz", buf.getvalue())
    return record


