"""End-to-end tests of the ``codex-jax`` command line on the tiny data and config.

The CLI runs in-process (``cli.main``); one test runs the installed console script.
The runs are module-scoped: seed 0 twice and seed 1 once, all with the same
shapes, so each stage compiles once.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_CONFIG

from codex_jax import cli
from codex_jax.config import load_config
from codex_jax.data.tokenizer import Tokenizer
from codex_jax.run.artifacts import fingerprint, load_params

STAGES = ("M0", "M1", "RM", "M2")
HEX64 = re.compile(r"[0-9a-f]{64}")


def one_line_error(err: str) -> str:
    assert err.startswith("codex-jax: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1 and "\r" not in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data_dir, tiny_config_path, jax_cache_dir):
    """Runs the CLI once per seed (memoised) and returns the run directory."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[tuple, pathlib.Path] = {}

    def get(seed: int = 0, copy: int = 0) -> pathlib.Path:
        if (seed, copy) not in done:
            out = root / f"seed{seed}-{copy}"
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("CODEX_JAX_CACHE", str(jax_cache_dir))
                rc = cli.main(["run", "--data", str(tiny_data_dir), "--out", str(out),
                               "--config", str(tiny_config_path), "--seed", str(seed), "--quiet"])
            assert rc == 0
            done[seed, copy] = out
        return done[seed, copy]

    return get


def read_json(path):
    return json.loads(pathlib.Path(path).read_text())


def read_metrics(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def sample(capsys, run, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["sample", "--run", str(run), *args])
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- run directory
def test_run_writes_the_run_directory(run_dir):
    run = run_dir(0)
    names = {p.name for p in run.iterdir()}
    assert {"summary.json", "metrics.jsonl", "manifest.json", "config.json", "vocab.json", "params"} <= names
    assert {p.name for p in (run / "params").iterdir()} == {f"{s}.npz" for s in STAGES}
    # atomic writes leave no temp files behind
    assert not [p for p in run.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_run_files_follow_the_umask(tmp_path):
    from codex_jax.run import artifacts

    old = os.umask(0o022)
    try:
        artifacts.write_json(tmp_path / "summary.json", {"a": 1})
        artifacts.save_params(tmp_path / "M2.npz", {"w": np.zeros(2)})
    finally:
        os.umask(old)
    for name in ("summary.json", "M2.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_summary(run_dir):
    summary = read_json(run_dir(0) / "summary.json")
    assert set(STAGES) <= set(summary["stages"])
    assert summary["seed"] == 0 and summary["model"] == "unigram"
    assert summary["vocab_size"] <= TINY_CONFIG["tokenizer"]["max_size"]
    obj = summary["objective"]
    for key in ("L_SFT", "L_RLHF", "Omega", "U", "alpha", "beta", "gamma"):
        assert isinstance(obj[key], float) and math.isfinite(obj[key]), key
    expect = obj["alpha"] * obj["L_SFT"] + obj["beta"] * obj["L_RLHF"] + obj["gamma"] * obj["Omega"]
    assert obj["U"] == pytest.approx(expect, rel=1e-6)
    assert set(summary["fingerprints"]) == set(STAGES)
    assert all(HEX64.fullmatch(summary["fingerprints"][s]) for s in STAGES)
    versions = summary["versions"]
    assert versions["jax"] and versions["numpy"] and versions["python"]
    assert summary["xla_compile_options"] == {"xla_cpu_use_fusion_emitters": False}  # the unigram family's
    assert summary["timings_s"]["total"] > 0


def test_metrics_jsonl(run_dir):
    records = read_metrics(run_dir(0))
    assert records and all("stage" in r and "step" in r for r in records)
    by_stage: dict[str, list[int]] = {}
    for r in records:
        by_stage.setdefault(r["stage"], []).append(r["step"])
    assert {"sft", "reward", "ppo"} <= set(by_stage) <= {"pretrain", "sft", "reward", "ppo"}
    for stage, steps in by_stage.items():
        assert all(b > a for a, b in zip(steps, steps[1:])), (stage, steps)
    assert by_stage["sft"] == list(range(1, TINY_CONFIG["sft"]["steps"] + 1))
    assert by_stage["reward"] == list(range(1, TINY_CONFIG["reward"]["steps"] + 1))
    assert by_stage["ppo"] == list(range(1, TINY_CONFIG["ppo"]["iterations"] + 1))
    # stages appear in pipeline order
    order = [r["stage"] for r in records]
    firsts = [order.index(s) for s in ("sft", "reward", "ppo")]
    assert firsts == sorted(firsts)


def test_params_match_fingerprints(run_dir):
    run = run_dir(0)
    summary = read_json(run / "summary.json")
    manifest = read_json(run / "manifest.json")
    for stage in STAGES:
        fp = fingerprint(load_params(run / "params" / f"{stage}.npz"))
        assert fp == summary["fingerprints"][stage] == manifest["stages"][stage]["fingerprint"]


def test_manifest(run_dir, tiny_config_path):
    run = run_dir(0)
    manifest = read_json(run / "manifest.json")
    cfg = load_config(tiny_config_path, seed=0)
    assert manifest["seed"] == 0 and manifest["config_hash"] == cfg.config_hash()
    assert manifest["xla_compile_options"] == {"xla_cpu_use_fusion_emitters": False}
    assert set(manifest["stages"]) == set(STAGES)
    for stage in STAGES:
        entry = manifest["stages"][stage]
        assert HEX64.fullmatch(entry["config_hash"]) and entry["data_hash"]
        assert all(HEX64.fullmatch(h) for h in entry["data_hash"].values())
    # config.json reloads to the same config
    again = load_config(run / "config.json")
    assert again == cfg and again.config_hash() == manifest["config_hash"]


def test_vocab_loads(run_dir):
    run = run_dir(0)
    tok = Tokenizer.load(run / "vocab.json")
    assert tok.vocab_size == read_json(run / "summary.json")["vocab_size"]
    assert tok.fingerprint() == read_json(run / "manifest.json")["tokenizer_fingerprint"]
    assert tok.decode(tok.encode("return x")) == "return x"


def test_run_prints_one_summary_line(tmp_path, capsys, tiny_data_dir, tiny_config_path, run_dir):
    run_dir(0)  # compiled already
    rc = cli.main(["run", "--data", str(tiny_data_dir), "--out", str(tmp_path / "o"),
                   "--config", str(tiny_config_path), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith(f"wrote {tmp_path / 'o'}:") and out.count("\n") == 1
    assert err == ""  # --quiet: no progress display


# --------------------------------------------------------------------------- reproducibility
def test_same_seed_is_bitwise_identical(run_dir):
    a, b = run_dir(0), run_dir(0, copy=1)
    sa, sb = read_json(a / "summary.json"), read_json(b / "summary.json")
    assert sa["fingerprints"] == sb["fingerprints"]
    for stage in STAGES:
        fa, fb = np.load(a / "params" / f"{stage}.npz"), np.load(b / "params" / f"{stage}.npz")
        assert fa.files == fb.files
        for name in fa.files:
            assert fa[name].dtype == fb[name].dtype
            assert np.array_equal(fa[name], fb[name]), (stage, name)
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    assert sa["objective"] == sb["objective"] and sa["stages"] == sb["stages"]
    assert read_json(a / "manifest.json") == read_json(b / "manifest.json")


def test_different_seed_changes_m2_and_samples(run_dir, capsys):
    a, c = run_dir(0), run_dir(1)
    fa = read_json(a / "summary.json")["fingerprints"]
    fc = read_json(c / "summary.json")["fingerprints"]
    assert fa["M2"] != fc["M2"]
    assert read_json(a / "manifest.json")["stages"]["M2"]["key_data"] != \
        read_json(c / "manifest.json")["stages"]["M2"]["key_data"]
    ra, out_a, _ = sample(capsys, a, "--num", "4", "--length", "8")
    rc, out_c, _ = sample(capsys, c, "--num", "4", "--length", "8")
    assert ra == rc == 0 and out_a != out_c


# --------------------------------------------------------------------------- sample
@pytest.mark.parametrize("stage", ["M0", "M1", "M2"])
def test_sample_prints_n_lines_deterministically(run_dir, capsys, stage):
    run = run_dir(0)
    rc, out, err = sample(capsys, run, "--stage", stage, "--num", "3", "--length", "6", "--seed", "5")
    assert rc == 0 and err == ""
    assert out.count("\n") == 3
    vocab = set(Tokenizer.load(run / "vocab.json").tokens)
    assert all(set(line.split()) <= vocab for line in out.splitlines())
    assert sample(capsys, run, "--stage", stage, "--num", "3", "--length", "6", "--seed", "5")[1] == out
    other = sample(capsys, run, "--stage", stage, "--num", "3", "--length", "6", "--seed", "6")[1]
    assert other != out


def test_sample_default_stage_is_m2(run_dir, capsys):
    run = run_dir(0)
    assert sample(capsys, run, "--num", "2")[1] == sample(capsys, run, "--num", "2", "--stage", "M2")[1]


def test_sample_on_non_run_dir(tmp_path, capsys):
    rc, out, err = sample(capsys, tmp_path)
    assert rc == 2 and out == ""
    one_line_error(err)
    assert str(tmp_path) in err and "run directory" in err


def test_sample_on_missing_dir(tmp_path, capsys):
    rc, out, err = sample(capsys, tmp_path / "missing")
    assert rc == 2 and out == ""
    one_line_error(err)


def test_sample_missing_params_file(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir(0), broken)
    (broken / "params" / "M1.npz").unlink()
    rc, out, err = sample(capsys, broken, "--stage", "M1")
    assert rc == 2 and out == ""
    assert "M1.npz" in one_line_error(err)


def test_sample_corrupt_params_file(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir(0), broken)
    (broken / "params" / "M2.npz").write_bytes(b"not a zip")
    rc, out, err = sample(capsys, broken)
    assert rc == 2 and out == ""
    assert "M2.npz" in one_line_error(err)


def test_sample_rm_stage_is_not_a_choice(run_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "--run", str(run_dir(0)), "--stage", "RM"])
    assert exc.value.code == 2


def test_sample_corrupt_config_json(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir(0), broken)
    (broken / "config.json").write_text("{")
    rc, out, err = sample(capsys, broken)
    assert rc == 2 and "config.json" in one_line_error(err)


@pytest.mark.parametrize("args", [["--num", "-1"], ["--length", "-2"], ["--temperature", "-1"],
                                  ["--temperature", "nan"]])
def test_sample_rejects_bad_arguments(run_dir, capsys, args):
    try:
        rc, out, err = sample(capsys, run_dir(0), *args)
    except SystemExit as exc:  # an argparse rejection is fine too
        assert exc.value.code == 2
        return
    assert rc == 2 and out == ""
    one_line_error(err)


# --------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("argv", [[], ["train"], ["run", "--seed", "x"], ["run", "--model", "gpt"],
                                  ["sample", "--num", "two"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "codex-jax" in capsys.readouterr().err


def test_negative_seed_is_a_config_error(tmp_path, capsys, tiny_data_dir):
    rc = cli.main(["run", "--data", str(tiny_data_dir), "--out", str(tmp_path / "o"), "--seed", "-1",
                   "--quiet"])
    err = one_line_error(capsys.readouterr().err)
    assert rc == 2 and "seed" in err and "-1" in err and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- installed script
def _console_script() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("codex-jax")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("codex-jax")
    return [found] if found else [sys.executable, "-m", "codex_jax.cli"]


def test_console_script_end_to_end(tmp_path, tiny_data_dir, tiny_config_path, jax_cache_dir, run_dir):
    out = tmp_path / "run"
    env = {**os.environ, "CODEX_JAX_CACHE": str(jax_cache_dir)}
    proc = subprocess.run(
        [*_console_script(), "run", "--data", str(tiny_data_dir), "--out", str(out),
         "--config", str(tiny_config_path), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"wrote {out}:")
    # another process, same seed: bitwise the same run as the in-process one
    assert read_json(out / "summary.json")["fingerprints"] == \
        read_json(run_dir(0) / "summary.json")["fingerprints"]

    # an error: exit status 2 from the script itself, one line, nothing written
    bad = subprocess.run([*_console_script(), "run", "--data", str(tmp_path / "no-data"),
                          "--out", str(tmp_path / "bad-out"), "--config", str(tiny_config_path), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "no-data" in one_line_error(bad.stderr)
    assert not (tmp_path / "bad-out").exists()
