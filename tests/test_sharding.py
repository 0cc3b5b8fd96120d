"""Every stage on a 4-device mesh gives the single-device result.

The multi-device part runs once, in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the device count is fixed
when JAX starts), and writes its arrays; the tests here compare them.

Stated tolerances: counting and the closed-form M0 are bit for bit (integer-valued
float sums are exact in any order); the unigram's gradient stages agree to 1e-6 and
the transformer's to 1e-5 in absolute value (float sums over a sharded batch are
added per device, then across devices: rounding, not a different algorithm).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_CONFIG, write_config, write_dataset

from codex_jax.config import mesh_flags, parse_mesh
from codex_jax.errors import ConfigError

HERE = pathlib.Path(__file__).parent
FOUR = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
MESHES = ("one", "data4", "data2_model2_fsdp")


def _env(extra: dict) -> dict:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    out = tmp_path_factory.mktemp("multidevice") / "result"
    proc = subprocess.run([sys.executable, str(HERE / "multidevice_worker.py"), str(out)], env=_env(FOUR),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(out.with_suffix(".json").read_text())
    with np.load(out.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return record, arrays


def _group(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def test_the_worker_saw_four_devices(four):
    assert four[0]["devices"] == 4


def test_counting_on_four_devices_is_bitwise_the_single_device_count(four):
    record, arrays = four
    assert record["count_input_spec"] == ["data"]  # really split over the devices
    want = np.bincount(arrays["count/ids"].ravel(), weights=arrays["count/mask"].ravel(), minlength=50)
    np.testing.assert_array_equal(arrays["count/one"], want)
    assert arrays["count/data4"].tobytes() == arrays["count/one"].tobytes()


@pytest.mark.parametrize("mesh", MESHES[1:])
def test_the_symbolic_pipeline_on_a_mesh_matches_one_device(four, mesh):
    record, arrays = four
    fp = record["symbolic_fingerprints"]
    assert fp[mesh]["M0"] == fp["one"]["M0"]  # closed form from counts: bit for bit
    one, other = _group(arrays, "symbolic/one/"), _group(arrays, f"symbolic/{mesh}/")
    assert one.keys() == other.keys() and len(one) >= 4
    for name in one:
        np.testing.assert_allclose(other[name], one[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("mesh", MESHES[1:])
@pytest.mark.parametrize("stage", ("pretrain", "reward", "ppo"))
def test_transformer_stages_on_a_mesh_match_one_device(four, mesh, stage):
    record, arrays = four
    one, other = _group(arrays, f"transformer/one/{stage}/"), _group(arrays, f"transformer/{mesh}/{stage}/")
    assert one.keys() == other.keys()
    for name in one:
        np.testing.assert_allclose(other[name], one[name], rtol=0, atol=1e-5, err_msg=f"{stage} {name}")
    m_one, m_other = record["transformer_metrics"]["one"][stage], record["transformer_metrics"][mesh][stage]
    assert m_one["step"] == m_other["step"]
    for k in set(m_one) - {"stage", "step"}:
        np.testing.assert_allclose(m_other[k], m_one[k], rtol=1e-4, atol=1e-5, err_msg=f"{stage} {k}")


def test_parameters_are_laid_out_by_the_rule(four):
    specs = four[0]["transformer_specs"]
    for stage, leaves in specs["data4"].items():  # data parallel: every leaf replicated
        assert all(not any(spec) for spec in leaves.values()), stage
    fsdp = specs["data2_model2_fsdp"]["pretrain"]
    params = {k: v for k, v in fsdp.items() if k.startswith("params.")}
    assert any("data" in v for v in params.values()) and any("model" in v for v in params.values())
    # optimiser moments follow their parameter's layout
    for name, spec in params.items():
        mu = [v for k, v in fsdp.items() if k.startswith("opt_state") and k.endswith(name[len("params."):])]
        assert mu and all(v == spec for v in mu), name
    assert not any(fsdp["step"])


def test_a_checkpoint_saved_on_four_devices_restores_on_one_and_back(four):
    record, arrays = four
    saved = _group(arrays, "ckpt/saved/")
    for way in ("mesh_to_one", "one_to_mesh"):
        got = _group(arrays, f"ckpt/{way}/")
        assert got.keys() == saved.keys()
        for name in saved:
            assert got[name].tobytes() == saved[name].tobytes(), (way, name)
    assert all("SingleDeviceSharding" in s for s in record["ckpt_specs"]["mesh_to_one"].values())
    assert record["ckpt_specs"]["one_to_mesh"] == record["ckpt_specs"]["placed"]


# --------------------------------------------------------------------------- CLI
def test_mesh_specs_parse_and_bad_ones_name_the_part():
    assert parse_mesh("data=4") == {"data": 4, "model": 1}
    assert parse_mesh(" data = 2 , model=2") == {"data": 2, "model": 2}
    assert mesh_flags({"data": 2, "model": 1, "fsdp": True}) == ["--mesh", "data=2,model=1", "--fsdp"]
    for bad, msg in [("data=0", "must have size >= 1"), ("batch=2", "'batch=2'"), ("data=2,data=2", "twice"),
                     ("data=-1", "'data=-1'"), ("", "each part")]:
        with pytest.raises(ConfigError, match=msg):
            parse_mesh(bad)


def test_a_mesh_larger_than_the_machine_is_a_clear_error_and_writes_nothing(tmp_path, tiny_data_dir,
                                                                            tiny_config_path, capsys):
    from codex_jax import cli

    out = tmp_path / "out"
    rc = cli.main(["run", "--quiet", "--data", str(tiny_data_dir), "--config", str(tiny_config_path),
                   "--out", str(out), "--mesh", "data=64"])
    assert rc == 2 and not out.exists()
    assert "mesh data=64,model=1 needs 64 devices; this process sees" in capsys.readouterr().err
    assert cli.main(["run", "--quiet", "--out", str(out), "--fsdp"]) == 2
    assert "--fsdp" in capsys.readouterr().err and not out.exists()


def test_a_one_device_mesh_is_bitwise_the_plain_program(tmp_path, tiny_data_dir, tiny_config_path):
    from codex_jax import cli

    a, b = tmp_path / "a", tmp_path / "b"
    common = ["run", "--quiet", "--data", str(tiny_data_dir), "--config", str(tiny_config_path)]
    assert cli.main(common + ["--out", str(a)]) == 0
    assert cli.main(common + ["--out", str(b), "--mesh", "data=1"]) == 0
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["fingerprints"] == sb["fingerprints"]
    assert sa["mesh"] is None and sb["mesh"]["data"] == 1 and sb["mesh"]["devices"] == 1


@pytest.mark.slow
def test_cli_on_four_devices_records_the_mesh_and_audit_reproduces_it(tmp_path):
    data = write_dataset(tmp_path / "data")
    config = write_config(tmp_path / "tiny.json", TINY_CONFIG)
    out = tmp_path / "run4"
    run = [sys.executable, "-m", "codex_jax.cli", "run", "--quiet", "--data", str(data), "--config", str(config),
           "--out", str(out), "--mesh", "data=2,model=2", "--fsdp"]
    proc = subprocess.run(run, env=_env(FOUR), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mesh"] == {"data": 2, "model": 2, "fsdp": True, "devices": 4, "platform": "cpu",
                                "processes": 1}
    audit = subprocess.run([sys.executable, "-m", "codex_jax.cli", "audit", "--against", str(out)],
                           env=_env(FOUR), capture_output=True, text=True, timeout=600)
    assert audit.returncode == 0, audit.stdout + audit.stderr[-3000:]
    assert "data=2,model=2,fsdp on 4 cpu" in audit.stdout and "verdict: PASS" in audit.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_match_one_process_on_the_same_mesh(tmp_path):
    """``--distributed``: 2 processes x 2 CPU devices (gloo collectives) run the same
    data=4 mesh as 1 process x 4 devices; only process 0 writes the run files."""
    from codex_jax.run.artifacts import load_params

    data = write_dataset(tmp_path / "data")
    config = write_config(tmp_path / "tiny.json", TINY_CONFIG)
    base = [sys.executable, "-m", "codex_jax.cli", "run", "--quiet", "--data", str(data), "--config", str(config),
            "--mesh", "data=4"]
    port = _free_port()
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(base + ["--out", str(tmp_path / "multi"), "--distributed", "--coordinator",
                                      f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=_env(two), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run(base + ["--out", str(tmp_path / "single")], env=_env(FOUR), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi_sum, single_sum = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("multi", "single"))
    assert multi_sum["mesh"]["processes"] == 2 and single_sum["mesh"]["processes"] == 1
    assert multi_sum["mesh"]["devices"] == single_sum["mesh"]["devices"] == 4
    assert multi_sum["fingerprints"]["M0"] == single_sum["fingerprints"]["M0"]
    for stage in ("M1", "RM", "M2"):
        a, b = load_params(tmp_path / "multi" / "params" / f"{stage}.npz"), load_params(
            tmp_path / "single" / "params" / f"{stage}.npz")
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=f"{stage} {k}")
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)) > 0  # one writer: no record twice
