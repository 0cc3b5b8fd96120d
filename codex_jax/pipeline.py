"""The whole Codex lineage in one driver: M0 (pretrain) -> M1 (SFT) -> RM -> M2 (PPO).

``run_pipeline`` validates and encodes all data before it creates anything in the
output directory, runs the four stages with keys split once by purpose from the seed,
checkpoints each stage (exact resume with ``resume=True``), and writes summary.json,
metrics.jsonl, manifest.json, params/*.npz and the vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax import artifacts, lm, loop, ppo, reward
from codex_jax.checkpoint import StageCheckpointer
from codex_jax.config import PipelineConfig, from_dict, sha256_json
from codex_jax.data import Dataset
from codex_jax.encode import EncodedData, encode_dataset
from codex_jax.errors import CodexError, DataError
from codex_jax.family import Family, make_family
from codex_jax.manifest import environment
from codex_jax.sharding import to_host
from codex_jax.tokenizer import Tokenizer

STAGES = ("M0", "M1", "RM", "M2")
STAGE_LABEL = {"M0": "pretrain", "M1": "sft", "RM": "reward", "M2": "ppo"}
KEY_PURPOSES = ("data", "pretrain", "sft", "reward", "ppo")


class GuardError(CodexError):
    """A numerical guard stopped the run (non-finite updates in a row, KL bound)."""


def stage_keys(seed: int) -> dict[str, jax.Array]:
    """One root key per run (a typed key, so JAX's key-reuse checker can audit it),
    split once by purpose; each stage splits its own key once more into init / train."""
    keys = jax.random.split(jax.random.key(seed), len(KEY_PURPOSES))
    return dict(zip(KEY_PURPOSES, keys))


def key_data(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).ravel().tolist()


def split_pairs(pairs: dict, key: jax.Array, heldout_fraction: float) -> tuple[dict, dict]:
    """Random train / held-out split of the preference pairs, drawn by key."""
    n = pairs["chosen"].shape[0]
    n_held = int(n * heldout_fraction)
    if n - n_held < 1:
        raise DataError(f"prefs: {n} preference pair(s) leave none for training")
    perm = np.asarray(jax.random.permutation(key, n))
    held, train = perm[:n_held], perm[n_held:]
    return ({k: v[train] for k, v in pairs.items()}, {k: v[held] for k, v in pairs.items()})


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
        from codex_jax.bpe import BPETokenizer

        tokenizer = BPETokenizer.build(dataset.corpus.texts, cfg.bpe)
    else:
        tokenizer = Tokenizer.build(dataset.corpus.texts, cfg.tokenizer)
    return tokenizer, encode_dataset(dataset, tokenizer, cfg.data)


def data_hashes(enc: EncodedData) -> dict[str, str]:
    """sha256 of the token arrays each stage trains on."""
    held = [a for a in (enc.heldout_corpus_tokens, enc.heldout_corpus_mask,
                        enc.heldout_sft_tokens, enc.heldout_sft_mask) if a is not None]
    return {
        "corpus": artifacts.arrays_sha256(enc.corpus_tokens, enc.corpus_mask),
        "demos": artifacts.arrays_sha256(enc.sft_tokens, enc.sft_mask, enc.prompt),
        "prefs": artifacts.arrays_sha256(*[enc.pairs[k] for k in sorted(enc.pairs)]),
        "heldout": artifacts.arrays_sha256(*held),
    }


@dataclasses.dataclass
class Runner:
    """Host-side context of one run: logging, progress, checkpoints, guards."""

    cfg: PipelineConfig
    checkpoints: pathlib.Path | None = None  # None: no checkpoints (library use, tests)
    log: Callable[[dict], None] | None = None
    progress: bool = True
    stop_after: tuple[str, int] | None = None  # (stage label, step)
    sync: Callable[[], None] | None = None  # makes logged records durable (before each save)
    layout: Any = None  # a sharding.Layout: run every stage on a device mesh (None: one device)

    def place(self, data: Any) -> Any:
        """Data pools on the mesh (unchanged without a layout)."""
        return data if self.layout is None else self.layout.place_data(data)

    def guard(self, label: str) -> Callable[[list[dict], Any], None]:
        limit = self.cfg.max_consecutive_skips
        ppo_cfg = self.cfg.ppo
        streak = 0

        def check(chunk: list[dict], state: Any) -> None:
            nonlocal streak
            for rec in chunk:
                streak = streak + 1 if rec.get("skipped", 0) > 0 else 0
                if streak >= limit:
                    raise GuardError(f"{label} step {rec['step']}: {streak} consecutive updates had "
                                     f"non-finite gradients or rewards (max_consecutive_skips={limit})")
                if (label == "ppo" and ppo_cfg.max_kl is not None and ppo_cfg.kl_guard == "stop"
                        and rec["kl"] > ppo_cfg.max_kl):
                    raise GuardError(f"ppo iteration {rec['step']}: KL to the reference {rec['kl']:.4g} "
                                     f"exceeds ppo.max_kl={ppo_cfg.max_kl}")

        return check

    def train(self, label: str, state: Any, data: Any, key: jax.Array, *, total: int, log_every: int,
              step_fn: Callable, select_fn: Callable, show: tuple[str, ...], stage_cfg: Any) -> Any:
        """Restores the stage's latest checkpoint (if any), then trains to ``total``."""
        ckpt, meta = None, {"config_hash": sha256_json(dataclasses.asdict(stage_cfg)),
                            "key_data": key_data(key)}
        if self.layout is not None:  # before a restore: it restores into these shardings
            state = self.layout.place_state(state)
        if self.checkpoints is not None:
            ckpt = StageCheckpointer(self.checkpoints, label)
            latest = ckpt.latest_step()
            if latest is not None:
                state = ckpt.restore(latest, state, expect=meta)
        stop = self.stop_after[1] if self.stop_after and self.stop_after[0] == label else None
        try:
            if int(state.step) < total:
                state, _ = loop.train(
                    state, data, key, total_steps=total, log_every=log_every, step_fn=step_fn,
                    select_fn=select_fn, label=label, log=self.log, show=show, progress=self.progress,
                    checkpoint_every=self.cfg.checkpoint_every,
                    on_checkpoint=(lambda st: self.save(ckpt, st, meta)) if ckpt else None,
                    stop_after=stop, check=self.guard(label), layout=self.layout)
        finally:
            if ckpt is not None:
                ckpt.close()
        return state


    def save(self, ckpt: StageCheckpointer, state: Any, meta: dict) -> None:
        # records up to this step must be on disk before the checkpoint that makes a
        # resume skip them, or a crash would lose them for good
        if self.sync is not None:
            self.sync()
        ckpt.save(int(state.step), state, meta)


def run_stages(enc: EncodedData, tokenizer: Tokenizer, cfg: PipelineConfig, runner: Runner | None = None) -> dict:
    """Runs M0 -> M1 -> RM -> M2; returns params, metrics, timings and keys."""
    runner = runner or Runner(cfg=cfg, progress=False)
    keys = stage_keys(cfg.seed)
    family: Family = make_family(cfg.model, enc.vocab_size,
                                 cfg.transformer if cfg.model == "transformer" else None)
    timings: dict[str, float] = {}
    params: dict[str, Any] = {}
    metrics: dict[str, Any] = {}

    # ---- M0: pretraining (closed form, or optax)
    t0 = time.perf_counter()
    pcfg = cfg.pretrain
    k_init, k_train = jax.random.split(keys["pretrain"])
    eps = lm.smoothing_to_label_smoothing(pcfg.smoothing, enc.num_corpus_tokens, enc.vocab_size)
    corpus = runner.place(lm.make_data(enc.corpus_tokens, enc.corpus_mask, pcfg.batch_size, eps))
    held_corpus, held_demos = map(runner.place, lm.heldout_data(enc))
    if pcfg.mode == "exact":
        m0 = lm.fit_exact(k_init, pcfg, family, corpus)
    else:
        m0 = runner.train("pretrain", lm.init(k_init, pcfg, family), corpus, k_train, total=pcfg.steps,
                          log_every=pcfg.log_every, step_fn=lm.step, select_fn=lm.select_batch,
                          show=("loss",), stage_cfg=pcfg)
    params["M0"] = m0.params
    metrics["M0"] = {"mode": pcfg.mode, "corpus_tokens": enc.num_corpus_tokens,
                     **_floats(lm.evaluate(m0.params, family, corpus)), "skipped_updates": int(m0.skipped)}
    if held_corpus is not None:
        metrics["M0"].update({f"heldout_{k}": v for k, v in _floats(lm.evaluate(m0.params, family, held_corpus)).items()},
                             heldout_tokens=int(enc.heldout_corpus_mask.sum()))
    timings["M0"] = time.perf_counter() - t0

    # ---- M1: supervised fine-tuning on demonstrations
    t0 = time.perf_counter()
    scfg = cfg.sft
    k_init, k_train = jax.random.split(keys["sft"])
    demos = runner.place(lm.make_data(enc.sft_tokens, enc.sft_mask, scfg.batch_size))
    m1 = runner.train("sft", lm.init(k_init, scfg, family, params=m0.params), demos, k_train,
                      total=scfg.steps, log_every=scfg.log_every, step_fn=lm.step,
                      select_fn=lm.select_batch, show=("loss",), stage_cfg=scfg)
    params["M1"] = m1.params
    metrics["M1"] = {"demo_nll_before": _floats(lm.evaluate(m0.params, family, demos))["nll"],
                     "demo_nll_after": _floats(lm.evaluate(m1.params, family, demos))["nll"],
                     "skipped_updates": int(m1.skipped)}
    if held_demos is not None:
        metrics["M1"].update(heldout_demos=int(held_demos["tokens"].shape[0]),
                             heldout_demo_nll_before=_floats(lm.evaluate(m0.params, family, held_demos))["nll"],
                             heldout_demo_nll_after=_floats(lm.evaluate(m1.params, family, held_demos))["nll"])
    timings["M1"] = time.perf_counter() - t0

    # ---- RM: Bradley-Terry reward model
    t0 = time.perf_counter()
    rcfg = cfg.reward
    k_split, k_init, k_train = jax.random.split(keys["reward"], 3)
    train_pairs, held_pairs = split_pairs(enc.pairs, k_split, rcfg.heldout_fraction)
    train_pairs = runner.place(jax.tree_util.tree_map(jnp.asarray, train_pairs))
    rm = runner.train("reward", reward.init(k_init, rcfg, family), train_pairs, k_train, total=rcfg.steps,
                      log_every=rcfg.log_every, step_fn=reward.step, select_fn=reward.select_batch,
                      show=("loss", "accuracy"), stage_cfg=rcfg)
    params["RM"] = rm.params
    rm_metrics = {"train_pairs": int(train_pairs["chosen"].shape[0]),
                  "heldout_pairs": int(held_pairs["chosen"].shape[0]), "skipped_updates": int(rm.skipped),
                  **{f"train_{k}": v for k, v in _floats(reward.evaluate(rm.params, family, train_pairs)).items()}}
    if held_pairs["chosen"].shape[0]:
        held = runner.place(jax.tree_util.tree_map(jnp.asarray, held_pairs))
        rm_metrics.update({f"heldout_{k}": v for k, v in _floats(reward.evaluate(rm.params, family, held)).items()})
    metrics["RM"] = rm_metrics
    timings["RM"] = time.perf_counter() - t0

    # ---- M2: PPO RLHF against the reward model
    t0 = time.perf_counter()
    qcfg = cfg.ppo
    ref = m0.params if qcfg.reference == "pretrain" else m1.params
    penalty = ppo.penalty_vector(enc.vocab_size, unsafe_ids(tokenizer, qcfg.unsafe_tokens), qcfg.safety_penalty)
    k_value, k_train, k_eval = jax.random.split(keys["ppo"], 3)
    value = family.init_value(k_value) if family.init_value is not None else None
    start_state = ppo.init(qcfg, family, m1.params, ref, rm.params, penalty, value=value)
    ppo_data = runner.place({"prompt": jnp.asarray(enc.prompt), "prompt_mask": jnp.asarray(enc.prompt_mask),
                             "ptx_tokens": demos["tokens"], "ptx_mask": demos["mask"]})
    m2 = runner.train("ppo", start_state, ppo_data, k_train, total=qcfg.iterations,
                      log_every=qcfg.log_every, step_fn=ppo.step, select_fn=ppo.select_batch,
                      show=("rm_score", "kl", "safety_penalty"), stage_cfg=qcfg)
    params["M2"] = m2.policy
    demo_counts = jnp.bincount(demos["tokens"].ravel(), weights=demos["mask"].ravel(), length=enc.vocab_size)
    if family.exact_objective is not None:
        before = _floats(ppo.evaluate(start_state, demo_counts))
        after = _floats(ppo.evaluate(m2, demo_counts))
    else:  # Monte Carlo estimates on the same prompts and sampling keys
        eval_batch = ppo.select_batch(m2, ppo_data, jax.random.fold_in(k_eval, 0))
        before = {**_floats(ppo.sampled_objective(start_state, eval_batch, k_eval)),
                  "L_SFT": _floats(lm.evaluate(start_state.policy, family, demos))["nll"]}
        after = {**_floats(ppo.sampled_objective(m2, eval_batch, k_eval)),
                 "L_SFT": _floats(lm.evaluate(m2.policy, family, demos))["nll"]}
    metrics["M2"] = {"reference": qcfg.reference, "final_kl_coef": float(m2.kl_coef),
                     "skipped_updates": int(m2.skipped), "unsafe_token_ids": int((penalty > 0).sum()),
                     "exact_before": before, "exact_after": after}
    timings["M2"] = time.perf_counter() - t0

    results = {"params": params, "metrics": metrics, "timings": timings,
               "keys": {k: key_data(v) for k, v in keys.items()}}
    # U = alpha L_SFT + beta L_RLHF + gamma Omega: exact for the unigram, sampled otherwise
    o = cfg.objective
    omega = after["KL"] + after["safety"]
    results["objective"] = {
        "L_SFT": after["L_SFT"], "L_RLHF": after["L_RLHF"], "Omega": omega,
        "U": o.alpha * after["L_SFT"] + o.beta * after["L_RLHF"] + o.gamma * omega,
        "alpha": o.alpha, "beta": o.beta, "gamma": o.gamma,
        "exact": family.exact_objective is not None,
    }
    results["samples"] = _samples(family, tokenizer, params, ppo_data, keys["data"], qcfg)
    return results


def _samples(family: Family, tokenizer, params: dict, ppo_data: dict, key: jax.Array, cfg, n: int = 8) -> list:
    """A few completions of the same demonstration prompts by M1 and M2 (decoded)."""
    prompt, pmask = ppo_data["prompt"][:n], ppo_data["prompt_mask"][:n]
    out = []
    for stage in ("M1", "M2"):
        ids = jax.device_get(family.sample(params[stage], jax.random.fold_in(key, 7), prompt, pmask,
                                           cfg.response_len, 1.0))
        for i, row in enumerate(ids):
            p = np.asarray(prompt[i])[np.asarray(pmask[i]) > 0]
            out.append({"stage": stage, "prompt": tokenizer.decode(p.tolist()),
                        "completion": tokenizer.decode(row.tolist())})
    return out


def _floats(tree: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(tree).items()}


# --------------------------------------------------------------------------- run directory
def _read_metrics(path: pathlib.Path) -> list[dict]:
    """Records of an earlier metrics.jsonl; a line torn by a crash is dropped."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "stage" in rec and "step" in rec:
                out.append(rec)
    return out


def _resume_metrics(out: pathlib.Path) -> list[dict]:
    """Earlier records up to each stage's last checkpoint (later ones will be redone)."""
    latest = {}
    for label in STAGE_LABEL.values():
        if (out / "checkpoints" / label).is_dir():
            ckpt = StageCheckpointer(out / "checkpoints", label)
            latest[label] = ckpt.latest_step()
            ckpt.close()
    return [r for r in _read_metrics(out / "metrics.jsonl")
            if latest.get(r["stage"]) is not None and r["step"] <= latest[r["stage"]]]


def read_run_record(out: str | pathlib.Path) -> tuple[PipelineConfig, str]:
    """(config, data source) of the run in ``out``, for ``--resume``."""
    path = pathlib.Path(out) / "run.json"
    if not path.is_file():
        raise CodexError(f"{out}: nothing to resume (no run.json)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return from_dict(PipelineConfig, record["config"]), str(record["data_source"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CodexError(f"{path}: not a valid run record ({type(err).__name__}: {err})") from None


def run_pipeline(
    dataset: Dataset,
    cfg: PipelineConfig,
    out_dir: str | pathlib.Path,
    *,
    progress: bool = True,
    resume: bool = False,
    stop_after: tuple[str, int] | None = None,
    layout: Any = None,
) -> dict:
    """Runs every stage and writes the run directory; returns the summary.

    ``layout`` (``sharding.make_layout``) runs every stage on a device mesh; the
    manifest records it.  With several processes only process 0 writes files.

    ``resume=True`` continues the run in ``out_dir`` from its checkpoints and must see
    the same data (checked by hash).  ``stop_after=(stage, step)`` stops right after the
    checkpoint at that step (raises ``loop.StopRequested``).
    """
    t_start = time.perf_counter()
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CodexError(f"{out}: the output path exists and is not a directory")
    tokenizer, enc = prepare(dataset, cfg)  # raises before anything is written
    hashes = data_hashes(enc)
    primary = jax.process_index() == 0  # one writer per run directory (orbax saves are collective)
    record = {"config": cfg.to_dict(), "data_source": dataset.source, "data_hash": hashes}
    if resume:
        old = json.loads((out / "run.json").read_text(encoding="utf-8"))
        if old["data_hash"] != hashes:
            raise DataError(f"{out}: the data differ from the run being resumed (data hash mismatch)")
        kept = _resume_metrics(out)
    else:
        if primary and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")  # a fresh run must never restore a stale state
        kept = []
        out.mkdir(parents=True, exist_ok=True)
        if primary:
            artifacts.write_json(out / "run.json", record)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("codex_jax.run_pipeline: run directory ready")
    if primary:
        artifacts.atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
    with open(out / "metrics.jsonl", "a", encoding="utf-8") if primary else contextlib.nullcontext() as fh:
        def log(rec: dict) -> None:
            fh.write(json.dumps(rec) + "\n")

        def sync() -> None:
            fh.flush()
            os.fsync(fh.fileno())

        runner = Runner(cfg=cfg, checkpoints=out / "checkpoints", log=log if primary else None,
                        progress=progress and primary, stop_after=stop_after, sync=sync if primary else None,
                        layout=layout)
        results = run_stages(enc, tokenizer, cfg, runner)

    results["params"] = to_host(results["params"])
    mesh = layout.describe() if layout is not None else None
    fingerprints = {name: artifacts.fingerprint(p) for name, p in results["params"].items()}
    summary = _summary(dataset, cfg, tokenizer, results, hashes, fingerprints, mesh, resume, t_start)
    if primary:
        _write_run_files(out, dataset, cfg, tokenizer, results, hashes, fingerprints, mesh, summary)
    return summary


def _summary(dataset, cfg, tokenizer, results, hashes, fingerprints, mesh, resume, t_start) -> dict:
    return {
        "model": cfg.model, "seed": cfg.seed, "data_source": dataset.source,
        "vocab_size": tokenizer.vocab_size, "resumed": resume, "mesh": mesh,
        "stages": results["metrics"], "objective": results.get("objective"),
        "fingerprints": fingerprints,
        "timings_s": {**results["timings"], "total": time.perf_counter() - t_start},
        "versions": environment(),
    }


def _write_run_files(out, dataset, cfg, tokenizer, results, hashes, fingerprints, mesh, summary) -> None:
    for name, p in results["params"].items():
        artifacts.save_params(out / "params" / f"{name}.npz", p)
    tokenizer.save(out / "vocab.json")
    artifacts.atomic_write_bytes(out / "samples.jsonl", "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in results["samples"]).encode())
    artifacts.write_json(out / "config.json", cfg.to_dict())
    stage_cfg = {"M0": cfg.pretrain, "M1": cfg.sft, "RM": cfg.reward, "M2": cfg.ppo}
    stage_data = {"M0": ["corpus", "heldout"], "M1": ["demos", "heldout"], "RM": ["prefs"],
                  "M2": ["demos", "prefs"]}
    manifest = {
        "seed": cfg.seed, "model": cfg.model, "config_hash": cfg.config_hash(), "mesh": mesh,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "data_source": dataset.source,
        "environment": summary["versions"],
        "stages": {s: {"key_purpose": STAGE_LABEL[s], "key_data": results["keys"][STAGE_LABEL[s]],
                       "config_hash": sha256_json(dataclasses.asdict(stage_cfg[s])),
                       "data_hash": {d: hashes[d] for d in stage_data[s]},
                       "fingerprint": fingerprints[s]} for s in STAGES},
    }
    artifacts.write_json(out / "manifest.json", manifest)
    artifacts.write_json(out / "summary.json", summary)
