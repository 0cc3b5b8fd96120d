"""The driver over the stage table: keys, data preparation, and one loop that runs
every stage of ``stages.table.pipeline_stages(cfg)`` with checkpoints and guards.

``run_stages`` is the library entry (no files); ``run.pipeline.run_pipeline`` wraps
it with the run directory.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np

from codex_jax.config.checks import sha256_json
from codex_jax.config.pipeline import PipelineConfig
from codex_jax.core.compile import family_options, jit_for
from codex_jax.core.keys import split_seed
from codex_jax.data.encode import EncodedData, encode_dataset
from codex_jax.data.records import Dataset
from codex_jax.data.tokenizer import Tokenizer
from codex_jax.errors import DataError
from codex_jax.execute.sandbox import Executor
from codex_jax.models.registry import family_for
from codex_jax.run import train as host_loop
from codex_jax.run.checkpoint import StageCheckpointer
from codex_jax.run.execution import ExecutionReward
from codex_jax.run.functional import functional_eval
from codex_jax.run.guards import make_guard
from codex_jax.run.precompile import Precompiler, wanted
from codex_jax.run.tasks import task_problems
from codex_jax.stages.context import Setup, StageContext
from codex_jax.stages.table import Stage, objective, pipeline_stages


def key_purposes(cfg: PipelineConfig) -> tuple[str, ...]:
    """"data" then one purpose per stage, in table order (the split order is the record)."""
    return ("data",) + tuple(s.label for s in pipeline_stages(cfg))


def stage_keys(cfg: PipelineConfig) -> dict[str, jax.Array]:
    """One root key per run (a typed key, so JAX's key-reuse checker can audit it),
    split once by purpose; each stage splits its own key once more (``setup``)."""
    purposes = key_purposes(cfg)
    return dict(zip(purposes, split_seed(cfg.seed, len(purposes))))


def key_data(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).ravel().tolist()


def unsafe_ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    """Ids of the unsafe tokens that are in the vocabulary: the word itself (lower-cased
    if the tokenizer lower-cases) and, for byte-level BPE, its space-prefixed form
    ("\u0120eval" is " eval")."""
    lower = getattr(tokenizer.config, "lowercase", False)
    forms = [t.lower() if lower else t for t in tokens]
    ids = [tokenizer.token_id(f) for t in forms for f in (t, "\u0120" + t)]
    return sorted({i for i in ids if i >= 4})


def prepare(dataset: Dataset, cfg: PipelineConfig) -> tuple[Tokenizer, EncodedData]:
    """Tokeniser + encoded arrays; all input errors surface here, before any output."""
    if cfg.model == "transformer":
        from codex_jax.data.bpe import BPETokenizer

        tokenizer = BPETokenizer.build(dataset.corpus.texts, cfg.bpe)
    else:
        tokenizer = Tokenizer.build(dataset.corpus.texts, cfg.tokenizer)
    return tokenizer, encode_dataset(dataset, tokenizer, cfg.data)


def make_context(enc: EncodedData, tokenizer, cfg: PipelineConfig, place=None) -> StageContext:
    """The stages' shared context; with ``[tasks]`` and an execution reward it holds the
    host reward (its sandbox starts on first use; ``close_context`` stops it)."""
    rl_cfg = pipeline_stages(cfg)[-1].config(cfg)
    # DPO has no sampled penalty; its objective report still charges PPO's unsafe tokens
    ids = tuple(unsafe_ids(tokenizer, getattr(rl_cfg, "unsafe_tokens", cfg.ppo.unsafe_tokens)))
    host_reward = None
    if cfg.tasks.enabled and cfg.tasks.reward != "rm":
        train, _ = task_problems(cfg.tasks)
        if len(train) != enc.prompt.shape[0]:
            raise DataError(f"tasks: {enc.prompt.shape[0]} prompts in the pool but {len(train)} training problems "
                            "(the data must be the task set's own files)")
        host_reward = ExecutionReward(tokenizer, train, cfg.tasks)
    return StageContext(cfg=cfg, enc=enc, family=family_for(cfg, enc.vocab_size), unsafe_ids=ids, params={},
                        host_reward=host_reward, **({"place": place} if place is not None else {}))


def close_context(ctx: StageContext) -> None:
    """Stops what the context started (the execution reward's sandbox workers)."""
    if ctx.host_reward is not None:
        ctx.host_reward.close()


def seed_use(ctx: StageContext) -> dict[str, str | None]:
    """Per stage: None if its result depends on the seed, else why not ("closed form",
    "full batch"); a stage is seed-dependent if it or a stage it starts from is."""
    out: dict[str, str | None] = {}
    for stage in pipeline_stages(ctx.cfg):
        own = stage.module.seed_independence(ctx)
        upstream = [out[s] for s in stage.starts_from]
        out[stage.name] = own if own is not None and all(u is not None for u in upstream) else None
    return out


@dataclasses.dataclass
class Runner:
    """Host-side context of one run: logging, progress, checkpoints, guards, mesh."""

    cfg: PipelineConfig
    checkpoints: pathlib.Path | None = None  # None: no checkpoints (library use, tests)
    log: Callable[[dict], None] | None = None
    progress: bool = True
    stop_after: tuple[str, int] | None = None  # (stage label, step)
    sync: Callable[[], None] | None = None  # makes logged records durable (before each save)
    layout: Any = None  # a sharding.Layout: run every stage on a device mesh (None: one device)
    _open: list = dataclasses.field(default_factory=list, repr=False)  # checkpointers still saving
    ahead: Precompiler | None = None  # compiles later stages' loops while earlier ones run

    def place(self, data: Any) -> Any:
        """Data pools on the mesh (unchanged without a layout)."""
        return data if self.layout is None else self.layout.place_data(data)

    def guard(self, stage: Stage) -> Callable[[list[dict], Any], None]:
        return make_guard(stage.label, self.cfg.max_consecutive_skips, stage.config(self.cfg))

    def train(self, stage: Stage, state: Any, data: Any, key: jax.Array, *, total: int, log_every: int) -> Any:
        """Restores the stage's latest checkpoint (if any), then trains to ``total``."""
        label, stage_cfg = stage.label, stage.config(self.cfg)
        ckpt, meta = None, {"config_hash": sha256_json(dataclasses.asdict(stage_cfg)), "key_data": key_data(key)}
        if self.layout is not None:  # before a restore: it restores into these shardings
            state = self.layout.place_state(state)
        if self.checkpoints is not None:
            ckpt = StageCheckpointer(self.checkpoints, label)
            latest = ckpt.latest_step()
            if latest is not None:
                state = ckpt.restore(latest, state, expect=meta)
        stop = self.stop_after[1] if self.stop_after and self.stop_after[0] == label else None
        if self.ahead is not None:
            self.ahead.claim(label)  # its loop: compiled by then, or never in the background
        try:
            if int(state.step) < total:
                state, _ = host_loop.train(
                    state, data, key, total_steps=total, log_every=log_every, step_fn=stage.module.step,
                    select_fn=stage.module.select_batch, label=label, log=self.log, show=stage.show,
                    progress=self.progress, checkpoint_every=self.cfg.checkpoint_every,
                    checkpoint_min_seconds=self.checkpoint_min_seconds,
                    on_checkpoint=(lambda st: self.save(ckpt, st, meta)) if ckpt else None,
                    stop_after=stop, check=self.guard(stage), layout=self.layout)
        except BaseException:
            if ckpt is not None:
                ckpt.close()  # a stop or an error: the checkpoint is complete before it propagates
            raise
        if ckpt is not None:  # its last save goes on while the next stage starts; close() waits
            self._open.append(ckpt)
        return state

    @property
    def checkpoint_min_seconds(self) -> float:
        # multi-process saves are collective: a clock-based choice could differ between
        # processes and leave one waiting for the others, so there every boundary saves
        return self.cfg.checkpoint_min_seconds if jax.process_count() == 1 else 0.0

    def save(self, ckpt: StageCheckpointer, state: Any, meta: dict) -> None:
        # records up to this step must be on disk before the checkpoint that makes a
        # resume skip them, or a crash would lose them for good
        if self.sync is not None:
            self.sync()
        # in the background while the next chunk runs; multi-process saves are collective,
        # so there every process saves in step with the others
        ckpt.save(int(state.step), state, meta, block=jax.process_count() > 1)

    def close(self) -> None:
        """Waits for the stages' last checkpoints (re-raising a failed save)."""
        open_, self._open = self._open, []
        errors = []
        for ckpt in open_:
            try:
                ckpt.close()
            except Exception as err:  # noqa: BLE001 - close the others, then report
                errors.append(err)
        if errors:
            raise errors[0]


def run_stages(enc: EncodedData, tokenizer: Tokenizer, cfg: PipelineConfig, runner: Runner | None = None) -> dict:
    """Runs every stage of the table; returns params, metrics, objective, timings, keys,
    each stage's seed use and a few decoded samples of M1 and M2."""
    runner = runner or Runner(cfg=cfg, progress=False)
    keys = stage_keys(cfg)
    ctx = make_context(enc, tokenizer, cfg, place=runner.place)
    if wanted(ctx, runner.layout):
        runner.ahead = Precompiler(ctx, stage_keys(cfg), checkpoint_every=cfg.checkpoint_every,
                                   stop_after=runner.stop_after)
    params: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}
    stages = pipeline_stages(cfg)
    try:
        for stage in stages:
            t0 = time.perf_counter()
            ctx = dataclasses.replace(ctx, params=dict(params))
            setup = stage.module.setup(ctx, keys[stage.label])
            state = setup.state
            if setup.total > 0:
                if runner.ahead is not None:  # instead of waiting for the loop's compilation
                    runner.ahead.meanwhile(stage.label, functools.partial(
                        compile_after_loop, stage=stage, tokenizer=tokenizer, last=stage is stages[-1]))
                state = runner.train(stage, state, setup.data, setup.key, total=setup.total,
                                     log_every=setup.log_every)
            params[stage.name] = stage.module.export(state)
            metrics[stage.name] = stage.module.report(ctx, setup, state)
            timings[stage.name] = time.perf_counter() - t0
        if ctx.host_reward is not None:
            metrics["M2"]["execution_reward"] = {"calls": ctx.host_reward.calls, "programs": ctx.host_reward.programs,
                                                 "isolation": ctx.host_reward.isolation}
        functional = held_out_pass_at_k(ctx, tokenizer, params, keys["data"]) if cfg.tasks.enabled else None
    finally:
        try:
            if runner.ahead is not None:
                runner.ahead, ahead = None, runner.ahead
                ahead.close()
            close_context(ctx)
        finally:
            runner.close()
    exact = ctx.family.exact_objective is not None
    return {"params": params, "metrics": metrics, "timings": timings, "seed_use": seed_use(ctx),
            "functional": functional, "compile_options": dict(family_options(ctx.family)),
            "keys": {k: key_data(v) for k, v in keys.items()}, "objective": objective(cfg, metrics, exact),
            "samples": samples(ctx, tokenizer, params, keys["data"], stages[-1].config(cfg))}


def compile_after_loop(ctx: StageContext, setup: Setup, *, stage: Stage, tokenizer, last: bool) -> None:
    """What a stage runs after its loop (its report; the samples after the last stage), on
    stand-ins of the trained state's shapes (``Precompiler.meanwhile``), for the programs'
    sake: the numbers are thrown away.  Keys are folded from the stand-in's own."""
    stage.module.report(ctx, setup, setup.state)
    if last:
        params = {**ctx.params, stage.name: stage.module.export(setup.state)}
        samples(ctx, tokenizer, params, jax.random.fold_in(setup.key, 1 << 20), stage.config(ctx.cfg))


def held_out_pass_at_k(ctx: StageContext, tokenizer, params: dict, key: jax.Array) -> dict:
    """pass@k and empty-completion rate of M1 and M2 on the task set's held-out problems
    (the same sampling keys for both; programs run in the sandbox)."""
    cfg = ctx.cfg
    _, held = task_problems(cfg.tasks)
    rl_cfg = pipeline_stages(cfg)[-1].config(cfg)
    own = ctx.host_reward is None
    executor = (Executor(timeout=cfg.tasks.timeout, require_sandbox=cfg.tasks.require_sandbox) if own
                else ctx.host_reward.start())
    try:
        out = functional_eval(ctx.family, tokenizer, {"M1": params["M1"], "M2": params["M2"]}, held,
                              n=cfg.tasks.eval_samples, temperature=cfg.tasks.eval_temperature,
                              key=jax.random.fold_in(key, 11), executor=executor,
                              max_prompt_len=cfg.data.max_prompt_len,
                              response_len=getattr(rl_cfg, "response_len", cfg.ppo.response_len))
        isolation = executor.isolation
    finally:
        if own:
            executor.close()
    return {"problems": f"tasks-heldout ({len(held)})", "n": out["n"], "temperature": out["temperature"],
            "isolation": isolation, "stages": out["stages"], "difference": out["difference"]}


def draw_samples(params, key, prompt, pmask, *, family, length: int):
    return family.sample(params, jax.random.fold_in(key, 7), prompt, pmask, length, 1.0)


def samples(ctx: StageContext, tokenizer, params: dict, key: jax.Array, rl_cfg: Any, n: int = 8) -> list:
    """A few completions of the same demonstration prompts by M1 and M2 (decoded)."""
    prompt, pmask = ctx.enc.prompt[:n], ctx.enc.prompt_mask[:n]
    length = getattr(rl_cfg, "response_len", ctx.cfg.ppo.response_len)
    out = []
    # one compiled program (key fold and temperature included), not op-by-op dispatch
    draw = jit_for(draw_samples, ctx.family, static_argnames=("family", "length"))
    for stage in ("M1", "M2"):
        ids = jax.device_get(draw(params[stage], key, prompt, pmask, family=ctx.family, length=length))
        for i, row in enumerate(ids):
            p = np.asarray(prompt[i])[np.asarray(pmask[i]) > 0]
            out.append({"stage": stage, "prompt": tokenizer.decode(p.tolist()),
                        "completion": tokenizer.decode(row.tolist())})
    return out
