"""Checkpoints and exact resume: N steps straight == k steps, save, restore, N - k steps,
bitwise, for every stage; SIGKILL during checkpoint writes; mismatched checkpoints."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_dataset

from codex_jax.config import LMConfig, PipelineConfig, from_dict
from codex_jax.core.scan import run_steps
from codex_jax.data.records import load_dataset
from codex_jax.models import symbolic
from codex_jax.run import train as loop
from codex_jax.run.checkpoint import CheckpointError, StageCheckpointer
from codex_jax.run.pipeline import run_pipeline
from codex_jax.stages import lm

STEPS = {"pretrain": 6, "sft": 6, "reward": 6, "ppo": 6}
RESUME_CONFIG = {
    "checkpoint_every": 2,
    "checkpoint_min_seconds": 0,  # every boundary saves: the kill points count saves
    "tokenizer": {"max_size": 64},
    "data": {"context_len": 8},
    "pretrain": {"mode": "gradient", "steps": 6, "batch_size": 2, "log_every": 2, "smoothing": 0.1},
    "sft": {"steps": 6, "batch_size": 2, "log_every": 2},
    "reward": {"steps": 6, "batch_size": 2, "log_every": 2},
    "ppo": {"iterations": 6, "rollouts": 8, "response_len": 4, "minibatches": 2, "ptx_batch_size": 2,
            "log_every": 2, "ptx_coef": 0.1},
}
LABELS = ("pretrain", "sft", "reward", "ppo")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_dataset(root / "data")
    cfg_path = root / "resume.json"
    cfg_path.write_text(json.dumps(RESUME_CONFIG))
    cfg = from_dict(PipelineConfig, RESUME_CONFIG)
    straight = root / "straight"
    run_pipeline(load_dataset(data), cfg, straight, progress=False)
    return {"root": root, "data": data, "cfg": cfg, "cfg_path": cfg_path, "straight": straight}


def final_leaves(run: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
    """Every stage's final checkpointed state: params, optimiser state, step, controller."""
    out = {}
    for label in LABELS:
        ckpt = StageCheckpointer(run / "checkpoints", label)
        out[label] = ckpt.load_leaves(STEPS[label])
        ckpt.close()
    return out


def assert_same_run(a: pathlib.Path, b: pathlib.Path) -> None:
    fa = json.loads((a / "summary.json").read_text())["fingerprints"]
    fb = json.loads((b / "summary.json").read_text())["fingerprints"]
    assert fa == fb
    la, lb = final_leaves(a), final_leaves(b)
    for label in LABELS:
        assert la[label].keys() == lb[label].keys()
        assert any("opt_state" in k for k in la[label])
        for name in la[label]:
            np.testing.assert_array_equal(la[label][name], lb[label][name], err_msg=f"{label}/{name}")
    ma = (a / "metrics.jsonl").read_text().splitlines()
    mb = (b / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in ma] == [json.loads(x) for x in mb]


@pytest.mark.parametrize("k", [1, 3, 4])
def test_stop_and_resume_in_process_is_bitwise_identical_for_every_stage(tiny, k):
    out = tiny["root"] / f"inproc_{k}"
    ds = load_dataset(tiny["data"])
    for label in LABELS:  # stop inside every stage in turn, resuming each time
        with pytest.raises(loop.StopRequested):
            run_pipeline(ds, tiny["cfg"], out, progress=False, resume=label != "pretrain",
                         stop_after=(label, k))
    run_pipeline(ds, tiny["cfg"], out, progress=False, resume=True)
    assert_same_run(tiny["straight"], out)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "codex_jax.cli", *args], capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("ks", [(2, 5, 1, 3), (5, 1, 4, 2)])
def test_resume_in_fresh_processes_is_bitwise_identical(tiny, ks):
    """Each stage stops at its own k; every resume is a new process."""
    out = tiny["root"] / f"fresh_{'_'.join(map(str, ks))}"
    first = _cli("run", "--data", str(tiny["data"]), "--out", str(out), "--config", str(tiny["cfg_path"]),
                 "--quiet", "--stop-after", f"pretrain:{ks[0]}")
    assert first.returncode == 0, first.stderr
    for label, k in zip(LABELS[1:], ks[1:]):
        proc = _cli("run", "--resume", str(out), "--quiet", "--stop-after", f"{label}:{k}")
        assert proc.returncode == 0, proc.stderr
        assert f"{label} stopped after step {k}" in proc.stderr
    proc = _cli("run", "--resume", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(tiny["straight"], out)


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_resumes_to_the_same_result(tiny):
    """Checkpoints every step; the process SIGKILLs itself before, during (orbax's
    temporary directory exists) and after chosen saves.  Each resume starts from the
    last complete checkpoint and the final result is bitwise the uninterrupted one."""
    cfg = {**RESUME_CONFIG, "checkpoint_every": 1}
    cfg_path = tiny["root"] / "every_step.json"
    cfg_path.write_text(json.dumps(cfg))
    ref = tiny["root"] / "kill_ref"
    assert _cli("run", "--data", str(tiny["data"]), "--out", str(ref), "--config", str(cfg_path),
                "--quiet").returncode == 0
    out = tiny["root"] / "killed"
    # (n-th save of that process, phase): 24 saves in all (6 per stage)
    kill_points = [(3, "during"), (2, "before"), (5, "during"), (1, "after"), (4, "during"),
                   (6, "during"), (2, "after"), (7, "during")]
    killed, torn = 0, 0
    for n, phase in kill_points:
        args = (["--resume", str(out)] if (out / "run.json").exists()
                else ["--data", str(tiny["data"]), "--out", str(out), "--config", str(cfg_path)])
        env = {**os.environ, "CODEX_JAX_KILL_AT": f"{n}:{phase}"}
        proc = _cli("run", "--quiet", *args, env=env)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        killed += 1
        torn += sum(1 for p in (out / "checkpoints").glob("*/*") if "tmp" in p.name)
    print(f"kill points tried: {killed}; torn checkpoint directories left by a kill: {torn}")
    assert killed >= 6 and torn >= 1
    final = _cli("run", "--resume", str(out), "--quiet")
    assert final.returncode == 0, final.stderr
    assert_same_run(ref, out)


def test_restoring_a_mismatched_checkpoint_is_a_clear_error(tmp_path):
    cfg = LMConfig(steps=2, batch_size=2)
    small = lm.init(jax.random.key(0), cfg, symbolic.unigram_family(10))
    ckpt = StageCheckpointer(tmp_path, "sft")
    ckpt.save(1, small, {"config_hash": "h"})
    bigger = lm.init(jax.random.key(0), cfg, symbolic.unigram_family(12))
    with pytest.raises(CheckpointError, match=r"params\.logits has shape \(10,\).*expects shape \(12,\)"):
        ckpt.restore(1, bigger, expect={"config_hash": "h"})
    with pytest.raises(CheckpointError, match="config_hash differs"):
        ckpt.restore(1, small, expect={"config_hash": "other"})
    as_f16 = small.replace(params={"logits": small.params["logits"].astype(jnp.float16)})
    with pytest.raises(CheckpointError, match="dtype float32, this run expects shape .* dtype float16"):
        ckpt.restore(1, as_f16)
    restored = ckpt.restore(1, small, expect={"config_hash": "h"})
    chex.assert_trees_all_equal(restored, small)
    ckpt.close()


def test_fresh_run_discards_stale_checkpoints(tiny):
    """A non-resume run into an old run directory must not restore the old states."""
    out = tiny["root"] / "stale"
    ds = load_dataset(tiny["data"])
    run_pipeline(ds, tiny["cfg"].__class__(**{**tiny["cfg"].__dict__, "seed": 5}), out, progress=False)
    run_pipeline(ds, tiny["cfg"], out, progress=False)
    assert_same_run(tiny["straight"], out)


def test_a_background_save_commits_what_a_blocking_one_does_and_reports_its_error(tmp_path, monkeypatch):
    cfg = LMConfig(steps=2, batch_size=2)
    state = lm.init(jax.random.key(0), cfg, symbolic.unigram_family(10))
    later = state.replace(params={"logits": state.params["logits"] + 1.0}, step=state.step + 1)
    ckpt = StageCheckpointer(tmp_path, "sft")
    ckpt.save(1, state, {"config_hash": "h"}, block=False)
    ckpt.save(2, later, {"config_hash": "h"}, block=False)  # waits for step 1 first: in order
    assert ckpt.latest_step() == 2  # waits for the save in flight
    chex.assert_trees_all_equal(ckpt.restore(1, state), state)
    chex.assert_trees_all_equal(ckpt.restore(2, state), later)
    ckpt.close()

    broken = StageCheckpointer(tmp_path, "reward")

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(broken.manager, "save", fail)
    broken.save(1, state, {}, block=False)  # returns before the write fails
    with pytest.raises(OSError, match="disk full"):
        broken.close()  # the error surfaces where the run waits for the save


@pytest.mark.parametrize("min_seconds, seconds_per_chunk, saved", [
    (0.0, 1.0, [2, 4, 6, 8, 10, 12]),  # every checkpoint_every boundary
    (30.0, 1.0, [12]),  # a quick stage: its end only
    (3.0, 1.0, [4, 8, 12]),  # the first boundary at least 3 s after the start or the last save
    (5.0, 2.0, [4, 8, 12]),
    (3.0, 2.0, [2, 4, 6, 8, 10, 12]),  # 4 s between boundaries
])
def test_intermediate_checkpoints_wait_for_checkpoint_min_seconds(monkeypatch, min_seconds, seconds_per_chunk,
                                                                  saved):
    """The clock picks which boundaries are saved (the end always is), never the chunks:
    the final state is the same whichever were saved."""
    clock = {"now": 100.0}

    def tick(state, data, key, **kw):  # each chunk of steps "takes" seconds_per_chunk
        clock["now"] += seconds_per_chunk
        return run_steps(state, data, key, **kw)

    monkeypatch.setattr(loop, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(loop, "run_steps", tick)
    fam, cfg = symbolic.unigram_family(10), LMConfig(steps=12, batch_size=2, log_every=1)
    ids = jnp.arange(16, dtype=jnp.int32).reshape(4, 4) % 10
    data = lm.make_data(ids, jnp.ones((4, 4)), 2, 0.0)
    steps = []
    final, records = loop.train(lm.init(jax.random.key(0), cfg, fam), data, jax.random.key(1), total_steps=12,
                                log_every=1, step_fn=lm.step, select_fn=lm.select_batch, label="sft",
                                progress=False, checkpoint_every=2, checkpoint_min_seconds=min_seconds,
                                on_checkpoint=lambda st: steps.append(int(st.step)))
    assert steps == saved and len(records) == 12
    reference, _ = loop.train(lm.init(jax.random.key(0), cfg, fam), data, jax.random.key(1), total_steps=12,
                              log_every=12, step_fn=lm.step, select_fn=lm.select_batch, label="sft", progress=False)
    chex.assert_trees_all_equal(final.params, reference.params)
