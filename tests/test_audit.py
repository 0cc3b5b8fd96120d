"""``codex-jax audit``: the comparison functions on hand-made manifests, then the command.

The command is driven through its own argparse parser (``audit.add_parser``) and a
``main`` that reports ``CodexError`` exactly as ``codex_jax.cli.main`` does.  Real
sub-runs are few (they cost seconds each): one ``audit --runs 2`` (3 runs, directories
kept), then two ``--against`` audits (1 run each) of its first run; the failing-run
tests fail in the child before any training.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import re
import shutil
import sys

import pytest
from conftest import TINY_CONFIG, write_config, write_dataset

from codex_jax.cli import audit as cli_audit
from codex_jax.errors import CodexError
from codex_jax.run import audit

STAGES = ("M0", "M1", "RM", "M2")

# The tiny config with gradient pretraining: every stage then depends on the seed.
AUDIT_CONFIG = {**copy.deepcopy(TINY_CONFIG), "checkpoint_every": 0,
                "pretrain": {"mode": "gradient", "steps": 4, "batch_size": 2, "log_every": 2}}


def main(argv: list[str]) -> int:
    """``codex_jax.cli.main`` with only the audit sub-command registered."""
    parser = argparse.ArgumentParser(prog="codex-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_audit.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CodexError as err:
        print(f"codex-jax: error: {err}", file=sys.stderr)
        return 2


def run_audit(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["audit", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    """The CodexError line (progress lines may precede it)."""
    lines = err.splitlines()
    assert lines and lines[-1].startswith("codex-jax: error: "), err
    assert sum(ln.startswith("codex-jax: error: ") for ln in lines) == 1, err
    return lines[-1]


def table_rows(out: str, first_column: tuple[str, ...]) -> dict[str, list[list[str]]]:
    """Table rows by their first cell."""
    rows: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 1 and cells[0] in first_column:
            rows.setdefault(cells[0], []).append(cells)
    return rows


def manifest(prints: dict[str, str], declared: dict[str, str] | None = None, **extra) -> dict:
    """A manifest with these fingerprints; ``declared``: stage -> why it is seed-independent."""
    declared = declared or {}
    return {"seed": 0, "data_source": "default", "environment": {"jax": "1"},
            "stages": {s: {"fingerprint": fp, "config_hash": f"c{s}", "data_hash": {"corpus": "d"},
                           "seed_independent": declared.get(s)}
                       for s, fp in prints.items()}, **extra}


SAME = {s: f"{s.lower()}" + "a" * 62 for s in STAGES}
OTHER = {s: f"{s.lower()}" + "b" * 62 for s in STAGES}


# --------------------------------------------------------------------------- audit_runs
def test_audit_runs_equal_fingerprints_pass():
    rows, ok = audit.audit_runs([manifest(SAME), manifest(SAME), manifest(SAME)], manifest(OTHER), set())
    assert ok
    assert [r["stage"] for r in rows] == list(STAGES)
    for row in rows:
        assert row["fingerprint"] == SAME[row["stage"]][:16]
        assert row["equal across runs"] == "yes" and row["changes with seed"] == "yes"
    assert set(rows[0]) == set(audit.RUN_COLUMNS)


def test_audit_runs_one_differing_stage_fails_on_that_row():
    changed = {**SAME, "RM": "f" * 64}
    rows, ok = audit.audit_runs([manifest(SAME), manifest(changed)], manifest(OTHER), set())
    assert not ok
    assert {r["stage"]: r["equal across runs"] for r in rows} == {"M0": "yes", "M1": "yes", "RM": "no", "M2": "yes"}


def test_audit_runs_stage_missing_from_one_run_is_unequal():
    partial = {s: fp for s, fp in SAME.items() if s != "M2"}
    rows, ok = audit.audit_runs([manifest(SAME), manifest(partial)], manifest(OTHER), set())
    assert not ok and rows[-1]["stage"] == "M2" and rows[-1]["equal across runs"] == "no"


def test_audit_runs_stage_unchanged_by_the_other_seed():
    other = {**OTHER, "M0": SAME["M0"]}
    rows, ok = audit.audit_runs([manifest(SAME), manifest(SAME)], manifest(other), set())
    assert not ok
    assert {r["stage"]: r["changes with seed"] for r in rows} == {"M0": "no", "M1": "yes", "RM": "yes", "M2": "yes"}
    # a closed-form stage may stay the same: not a failure, and shown as such
    rows, ok = audit.audit_runs([manifest(SAME), manifest(SAME)], manifest(other), {"M0"})
    assert ok
    assert rows[0]["changes with seed"] == "n/a (closed form)"
    # ... but a seeded stage that does not change still fails with M0 closed form
    rows, ok = audit.audit_runs([manifest(SAME), manifest(SAME)], manifest({**other, "M2": SAME["M2"]}), {"M0"})
    assert not ok and rows[-1]["changes with seed"] == "no"


def test_audit_runs_reads_seed_independence_from_the_manifest():
    """A stage the run declares seed-independent (from the stage table) must stay equal
    under another seed and is shown with the reason; if it changes, the declaration is wrong."""
    declared = {"M0": "closed form", "M1": "full batch"}
    other = {**OTHER, "M0": SAME["M0"], "M1": SAME["M1"]}
    runs = [manifest(SAME, declared), manifest(SAME, declared)]
    rows, ok = audit.audit_runs(runs, manifest(other, declared))
    assert ok
    assert {r["stage"]: r["changes with seed"] for r in rows} == {
        "M0": "seed-independent (closed form)", "M1": "seed-independent (full batch)", "RM": "yes", "M2": "yes"}
    rows, ok = audit.audit_runs(runs, manifest(OTHER, declared))  # M1 changed after all
    assert not ok and rows[1]["changes with seed"] == "yes (declared full batch: wrong)"
    rows, ok = audit.audit_runs([manifest(SAME), manifest(SAME)], manifest(other))  # nothing declared
    assert not ok and rows[1]["changes with seed"] == "no"


def test_audit_catches_a_stage_whose_key_is_ignored(tmp_path, tiny_data_dir, monkeypatch):
    """End to end: a reward stage that draws with a fixed key instead of its own gives the
    same RM under another seed, and the audit fails on that row (and only that row)."""
    import jax

    from codex_jax.config import PipelineConfig, from_dict
    from codex_jax.data.records import load_dataset
    from codex_jax.run.pipeline import run_pipeline
    from codex_jax.stages import reward

    cfg = from_dict(PipelineConfig, {**copy.deepcopy(TINY_CONFIG), "checkpoint_every": 0})
    dataset = load_dataset(tiny_data_dir)
    original = reward.setup
    monkeypatch.setattr(reward, "setup", lambda ctx, key: original(ctx, jax.random.key(1234)))
    manifests = []
    for i, seed in enumerate((0, 0, 1)):
        run_pipeline(dataset, dataclasses.replace(cfg, seed=seed), tmp_path / str(i), progress=False)
        manifests.append(audit.read_manifest(tmp_path / str(i) / "manifest.json"))
    rows, ok = audit.audit_runs(manifests[:2], manifests[2])
    assert not ok
    assert {r["stage"]: r["changes with seed"] for r in rows}["RM"] == "no"
    assert [r["stage"] for r in rows if r["changes with seed"] == "no"] == ["RM"]


def test_audit_runs_without_other_seed_and_with_none():
    rows, ok = audit.audit_runs([manifest(SAME), manifest(SAME)], None, set())
    assert ok and {r["changes with seed"] for r in rows} == {"not checked"}
    with pytest.raises(CodexError):
        audit.audit_runs([], None, set())


# --------------------------------------------------------------------------- compare_against / tables
def test_compare_against_names_each_differing_field():
    recorded = manifest(SAME, config_hash="h", tokenizer_fingerprint="t")
    rows, ok = audit.compare_against(recorded, copy.deepcopy(recorded))
    assert ok and all(r["equal"] == "yes" for r in rows)
    assert {(r["stage"], r["field"]) for r in rows} >= {("run", "config_hash"), ("M1", "fingerprint"),
                                                        ("M1", "config_hash"), ("M1", "data_hash.corpus")}
    new = copy.deepcopy(recorded)
    new["stages"]["M1"]["fingerprint"] = "0" * 64
    new["stages"]["RM"]["data_hash"]["corpus"] = "x"
    rows, ok = audit.compare_against(recorded, new)
    assert not ok
    assert {(r["stage"], r["field"]) for r in rows if r["equal"] == "no"} == {("M1", "fingerprint"),
                                                                             ("RM", "data_hash.corpus")}


def test_format_table_aligns_columns():
    rows, _ = audit.audit_runs([manifest(SAME)] * 2, manifest(OTHER), {"M0"})
    lines = audit.format_table(rows, audit.RUN_COLUMNS).splitlines()
    assert len(lines) == 2 + len(STAGES)
    assert lines[0].split(" | ")[0].strip() == "stage"
    bars = {tuple(m.start() for m in re.finditer(r"\|", ln)) for ln in lines if "|" in ln}
    assert len(bars) == 1  # every row's separators line up


# --------------------------------------------------------------------------- user errors (no sub-runs)
def test_against_a_missing_or_bad_manifest_is_a_one_line_error(capsys, tmp_path):
    missing = tmp_path / "nowhere" / "manifest.json"
    rc, out, err = run_audit(capsys, "--against", str(missing))
    assert rc == 2 and out == "" and str(missing) in one_line_error(err)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json\n")
    rc, _, err = run_audit(capsys, "--against", str(bad))
    assert rc == 2 and str(bad) in one_line_error(err) and "JSON" in err

    partial = tmp_path / "partial" / "manifest.json"
    partial.parent.mkdir()
    partial.write_text(json.dumps({"seed": 0, "stages": {}}))
    rc, _, err = run_audit(capsys, "--against", str(partial))
    line = one_line_error(err)
    assert rc == 2 and str(partial) in line and "data_source" in line and "environment" in line

    no_config = tmp_path / "noconfig" / "manifest.json"
    no_config.parent.mkdir()
    no_config.write_text(json.dumps(manifest(SAME)))
    rc, _, err = run_audit(capsys, "--against", str(no_config))
    line = one_line_error(err)
    assert rc == 2 and str(no_config) in line and "config.json" in line


def test_conflicting_or_bad_arguments(capsys, tmp_path):
    rc, _, err = run_audit(capsys, "--against", str(tmp_path / "m.json"), "--seed", "3")
    assert rc == 2 and "--seed" in one_line_error(err)
    rc, _, err = run_audit(capsys, "--runs", "1")
    assert rc == 2 and "--runs" in one_line_error(err)
    rc, _, err = run_audit(capsys, "--data", str(tmp_path / "absent"))
    assert rc == 2 and str(tmp_path / "absent") in one_line_error(err)


def test_a_failing_sub_run_quotes_its_last_error_line(capsys, tmp_path, tiny_config_path, monkeypatch):
    data = write_dataset(tmp_path / "data", omit=("prefs.jsonl",))
    work = tmp_path / "work"

    def mkdtemp(**kwargs) -> str:
        work.mkdir()
        return str(work)

    monkeypatch.setattr(audit.tempfile, "mkdtemp", mkdtemp)
    rc, out, err = run_audit(capsys, "--data", str(data), "--config", str(tiny_config_path))
    line = one_line_error(err)
    assert rc == 2 and out == ""
    assert "run 1/3" in line and "prefs.jsonl" in line and "exit code 2" in line
    assert re.search(r"^\[audit\] run 1/3 seed 0 \.\.\. [0-9.]+s failed", err, re.M)
    assert not work.exists()  # the temporary work directory is removed without --keep


# --------------------------------------------------------------------------- real sub-runs
@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_data_dir, jax_cache_dir):
    """One real ``audit --runs 2 --keep``: (exit code, stdout, stderr, workdir)."""
    config = write_config(tmp_path_factory.mktemp("audit-config") / "audit.json", AUDIT_CONFIG)
    work = tmp_path_factory.mktemp("audit-work")
    with pytest.MonkeyPatch.context() as mp, _Capture() as cap:
        mp.setenv("CODEX_JAX_CACHE", str(jax_cache_dir))
        rc = main(["audit", "--data", str(tiny_data_dir), "--config", str(config), "--seed", "0",
                   "--runs", "2", "--workdir", str(work), "--keep"])
    return rc, cap.out, cap.err, work


class _Capture:
    """Collects sys.stdout / sys.stderr (a module fixture cannot use capsys)."""

    def __enter__(self):
        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self.out, self.err = self._out.getvalue(), self._err.getvalue()
        return False


def test_audit_of_repeated_runs_passes(audited):
    rc, out, err, work = audited
    assert rc == 0, out + err
    rows = table_rows(out, STAGES)
    assert sorted(rows) == sorted(STAGES) and all(len(r) == 1 for r in rows.values())
    for stage, [cells] in rows.items():
        assert re.fullmatch(r"[0-9a-f]{16}", cells[1]), cells
        assert cells[2:] == ["yes", "yes"], (stage, cells)
    assert out.strip().splitlines()[-1].startswith("verdict: PASS")
    progress = re.findall(r"^\[audit\] run (\d)/3 seed (\d) \.\.\. [0-9.]+s ok$", err, re.M)
    assert progress == [("1", "0"), ("2", "0"), ("3", "1")]
    # --keep: the sub-runs' directories stay, each a complete run of the right seed
    for i, seed in ((1, 0), (2, 0), (3, 1)):
        recorded = json.loads((work / f"run_{i}" / "manifest.json").read_text())
        assert recorded["seed"] == seed
        same = recorded["stages"]["M1"]["fingerprint"][:16] == rows["M1"][0][1]
        assert same == (seed == 0)


def test_audit_against_the_recorded_run_passes(audited, capsys):
    _, _, _, work = audited
    recorded = work / "run_1" / "manifest.json"
    rc, out, err = run_audit(capsys, "--against", str(recorded))
    assert rc == 0, out + err
    rows = table_rows(out, ("run",) + STAGES)
    assert sorted(rows) == sorted(("run",) + STAGES)
    for stage in STAGES:
        fields = {cells[1]: cells for cells in rows[stage]}
        assert {"fingerprint", "config_hash"} <= set(fields) and any(f.startswith("data_hash") for f in fields)
        assert all(cells[2] == cells[3] and cells[4] == "yes" for cells in rows[stage])
    assert "environment" not in out
    assert out.strip().splitlines()[-1].startswith("verdict: PASS")
    assert re.search(r"^\[audit\] run 1/1 seed 0 \.\.\. [0-9.]+s ok$", err, re.M)


def test_audit_against_a_tampered_manifest_fails_and_names_it(audited, capsys, tmp_path):
    _, _, _, work = audited
    recorded = json.loads((work / "run_1" / "manifest.json").read_text())
    recorded["stages"]["M1"]["fingerprint"] = "0" * 64
    recorded["environment"]["jaxlib"] = "0.0.0-recorded"
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    (copy_dir / "manifest.json").write_text(json.dumps(recorded))
    shutil.copy(work / "run_1" / "run.json", copy_dir / "run.json")  # the config from run.json this time
    rc, out, err = run_audit(capsys, "--against", str(copy_dir / "manifest.json"))
    assert rc == 1, out + err
    bad = [cells for cells in table_rows(out, STAGES).get("M1", []) if cells[-1] == "no"]
    assert [cells[1] for cells in bad] == ["fingerprint"] and bad[0][2] == "0" * 16
    others = [cells for s, rs in table_rows(out, ("run",) + STAGES).items() for cells in rs if s != "M1"]
    assert all(cells[-1] == "yes" for cells in others)
    assert "jaxlib: '0.0.0-recorded' -> " in out
    assert "environments identical" not in out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: FAIL") and "M1 fingerprint" in verdict


def test_audit_with_fewer_demonstrations_than_the_sft_batch_passes(tmp_path, tiny_data_dir, jax_cache_dir,
                                                                   monkeypatch, capsys):
    """8 demonstrations < sft.batch_size 256: SFT is full-batch and, from the closed-form M0,
    legitimately seed-independent.  The audit shows why and passes (it printed
    "FAIL - unchanged by seed 1: M1" before the stage table recorded it)."""
    cfg = {**copy.deepcopy(TINY_CONFIG), "checkpoint_every": 0, "sft": {"steps": 4, "log_every": 2, "batch_size": 256}}
    config = write_config(tmp_path / "full_batch.json", cfg)
    monkeypatch.setenv("CODEX_JAX_CACHE", str(jax_cache_dir))
    rc, out, err = run_audit(capsys, "--data", str(tiny_data_dir), "--config", str(config), "--seed", "0")
    assert rc == 0, out + err
    rows = table_rows(out, STAGES)
    assert rows["M0"][0][3] == "seed-independent (closed form)"
    assert rows["M1"][0][3] == "seed-independent (full batch)"
    assert rows["RM"][0][3] == "yes" and rows["M2"][0][3] == "yes"
    assert "verdict: PASS" in out and "M1 seed-independent (full batch)" in out
