"""Compiling later stages' training loops ahead, in a background thread
(``run.precompile``): the main thread's calls find the programs it compiled, and a
run with it is bit for bit the run without it."""

from __future__ import annotations

import logging

import jax
import numpy as np
from conftest import TINY_CONFIG, TINY_RECORDS

from codex_jax.config import PipelineConfig, from_dict
from codex_jax.data.records import Corpus, Dataset, Demos, Prefs
from codex_jax.run.driver import Runner, make_context, prepare, run_stages, stage_keys
from codex_jax.run.precompile import Precompiler

DATASET = Dataset(
    corpus=Corpus(texts=tuple(r["text"] for r in TINY_RECORDS["corpus.jsonl"])),
    demos=Demos(prompts=tuple(r["prompt"] for r in TINY_RECORDS["demos.jsonl"]),
                completions=tuple(r["completion"] for r in TINY_RECORDS["demos.jsonl"])),
    prefs=Prefs(prompts=tuple(r["prompt"] for r in TINY_RECORDS["prefs.jsonl"]),
                chosen=tuple(r["chosen"] for r in TINY_RECORDS["prefs.jsonl"]),
                rejected=tuple(r["rejected"] for r in TINY_RECORDS["prefs.jsonl"])),
    source="test")


def _config(n: int) -> PipelineConfig:
    """TINY_CONFIG with chunks of n (SFT), n + 2 (RM) and n - 2 (PPO) steps: lengths no
    other test uses, so no other test has compiled these loops in this process."""
    return from_dict(PipelineConfig, {
        **TINY_CONFIG, "sft": {**TINY_CONFIG["sft"], "steps": n, "log_every": n},
        "reward": {**TINY_CONFIG["reward"], "steps": n + 2, "log_every": n + 2},
        "ppo": {**TINY_CONFIG["ppo"], "iterations": n - 2, "log_every": n - 2}})


def _loop_compiles(caplog, cfg: PipelineConfig, precompiled: bool) -> tuple[int, dict]:
    """Compilations of ``run_steps`` the main thread starts in one run of ``cfg``."""
    tokenizer, enc = prepare(DATASET, cfg)
    if precompiled:
        ctx = make_context(enc, tokenizer, cfg)
        ahead = Precompiler(ctx, stage_keys(cfg))
        ahead.wait()
        ahead.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        res = run_stages(enc, tokenizer, cfg, Runner(cfg=cfg, progress=False))
    return sum("Compiling jit(scan_steps)" in r.getMessage() for r in caplog.records), res


def test_the_run_calls_the_loops_compiled_ahead(caplog, monkeypatch):
    monkeypatch.setenv("CODEX_JAX_PRECOMPILE", "0")  # the run itself compiles nothing ahead
    # control: loops never compiled in this process are compiled by the run (3: SFT, RM, PPO)
    assert _loop_compiles(caplog, _config(5), precompiled=False)[0] == 3
    # compiled ahead from stand-in parameters: the run's calls find every one
    assert _loop_compiles(caplog, _config(7), precompiled=True)[0] == 0


def test_a_run_with_loops_compiled_ahead_is_bitwise_the_run_without(monkeypatch):
    cfg = _config(6)
    tokenizer, enc = prepare(DATASET, cfg)
    out = {}
    for flag in ("1", "0"):  # ahead first: its thread compiles, the run waits for it
        monkeypatch.setenv("CODEX_JAX_PRECOMPILE", flag)
        out[flag] = run_stages(enc, tokenizer, cfg, Runner(cfg=cfg, progress=False))
    for stage, params in out["0"]["params"].items():
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(out["1"]["params"][stage])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert out["0"]["metrics"] == out["1"]["metrics"]


def test_compiling_ahead_is_for_the_symbolic_family_on_one_device(monkeypatch):
    from types import SimpleNamespace

    from codex_jax.run.precompile import wanted

    monkeypatch.delenv("CODEX_JAX_PRECOMPILE", raising=False)
    ctx = lambda exact, host=None: SimpleNamespace(family=SimpleNamespace(exact_objective=exact),  # noqa: E731
                                                   host_reward=host)
    assert wanted(ctx(print), None)
    assert not wanted(ctx(None), None)  # the transformer: minutes of compute, more memory
    assert not wanted(ctx(print, host=object()), None)  # an execution reward
    assert not wanted(ctx(print), layout=object())  # a device mesh
    monkeypatch.setenv("CODEX_JAX_PRECOMPILE", "0")
    assert not wanted(ctx(print), None)


def test_while_the_rl_loop_compiles_the_main_thread_compiles_its_report_and_the_samples(caplog, monkeypatch):
    """The thread is held inside the RL stage's loop compilation until the main thread's
    work on the stand-ins is done: after it the main thread compiles nothing more (its
    report, the samples and the loop all find their programs; ``jax.log_compiles`` is
    thread-local, so only the main thread's compilations are logged), and the results are
    those of a run without any of this."""
    import dataclasses
    import threading

    from codex_jax.run import driver, precompile

    base = _config(9)  # responses of 7 tokens: report and sample programs of shapes no other test compiles
    cfg = dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, response_len=7))
    tokenizer, enc = prepare(DATASET, cfg)
    holding, release, marks = threading.Event(), threading.Event(), []
    real_program, real_meanwhile, real_work = precompile.steps_program, Precompiler.meanwhile, driver.compile_after_loop

    class Held:  # the thread's RL loop compilation, held until the work is done
        def __init__(self, program):
            self.program = program

        def lower(self, *args, **kwargs):
            holding.set()
            release.wait(120)
            return self.program.lower(*args, **kwargs)

    def program(state, *rest):
        rl = getattr(state.cfg, "iterations", None) is not None
        return Held(real_program(state, *rest)) if rl else real_program(state, *rest)

    def meanwhile(self, label, work):
        if label == "ppo":
            assert holding.wait(120)
        real_meanwhile(self, label, work)

    def work(ctx, setup, **kwargs):
        real_work(ctx, setup, **kwargs)
        if kwargs["stage"].label == "ppo":
            marks.append(len(caplog.records))
            release.set()

    monkeypatch.setattr(precompile, "steps_program", program)
    monkeypatch.setattr(Precompiler, "meanwhile", meanwhile)
    monkeypatch.setattr(driver, "compile_after_loop", work)
    monkeypatch.setenv("CODEX_JAX_PRECOMPILE", "1")
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        res = run_stages(enc, tokenizer, cfg, Runner(cfg=cfg, progress=False))
    assert len(marks) == 1, "the work ran once for the RL stage"
    before = [r.getMessage() for r in caplog.records[:marks[0]]]
    after = [r.getMessage() for r in caplog.records[marks[0]:] if r.getMessage().startswith("Compiling")]
    assert any("Compiling jit(draw_samples)" in m for m in before)  # on the stand-ins
    assert after == []
    monkeypatch.setenv("CODEX_JAX_PRECOMPILE", "0")
    plain = run_stages(enc, tokenizer, cfg, Runner(cfg=cfg, progress=False))
    assert plain["metrics"] == res["metrics"] and plain["samples"] == res["samples"]
