"""The whole Codex lineage in one driver: M0 (pretrain) -> M1 (SFT) -> RM -> M2 (PPO).

``run_pipeline`` validates and encodes all data before it creates anything in the
output directory, runs the four stages with one key each (split once by purpose from
the seed), and writes summary.json, metrics.jsonl, manifest.json, params/*.npz and the
vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax import artifacts, lm, loop, ppo, reward
from codex_jax.config import PipelineConfig, sha256_json
from codex_jax.data import Dataset
from codex_jax.encode import EncodedData, encode_dataset
from codex_jax.errors import DataError
from codex_jax.family import Family, make_family
from codex_jax.tokenizer import Tokenizer

STAGES = ("M0", "M1", "RM", "M2")
KEY_PURPOSES = ("data", "pretrain", "sft", "reward", "ppo")


def stage_keys(seed: int) -> dict[str, jax.Array]:
    """One root key per run, split once by purpose."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(KEY_PURPOSES))
    return dict(zip(KEY_PURPOSES, keys))


def environment() -> dict:
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "prng_impl": str(jax.config.jax_default_prng_impl),
        "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
    }


def split_pairs(pairs: dict, key: jax.Array, heldout_fraction: float) -> tuple[dict, dict]:
    """Random train / held-out split of the preference pairs, drawn by key."""
    n = pairs["chosen"].shape[0]
    n_held = int(n * heldout_fraction)
    if n - n_held < 1:
        raise DataError(f"prefs: {n} preference pair(s) leave none for training")
    perm = np.asarray(jax.random.permutation(key, n))
    held, train = perm[:n_held], perm[n_held:]
    return ({k: v[train] for k, v in pairs.items()}, {k: v[held] for k, v in pairs.items()})


def unsafe_ids(tokenizer: Tokenizer, tokens: tuple[str, ...]) -> list[int]:
    """Ids of the unsafe tokens that are in the vocabulary (lower-cased if it is)."""
    norm = (lambda t: t.lower()) if tokenizer.config.lowercase else (lambda t: t)
    ids = [tokenizer.token_id(norm(t)) for t in tokens]
    return sorted({i for i in ids if i >= 4})


def prepare(dataset: Dataset, cfg: PipelineConfig) -> tuple[Tokenizer, EncodedData]:
    """Tokeniser + encoded arrays; all input errors surface here, before any output."""
    tokenizer = Tokenizer.build(dataset.corpus.texts, cfg.tokenizer)
    return tokenizer, encode_dataset(dataset, tokenizer, cfg.data)


def run_stages(
    enc: EncodedData,
    tokenizer: Tokenizer,
    cfg: PipelineConfig,
    *,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs M0 -> M1 -> RM -> M2; returns params, metrics and timings (no file I/O)."""
    keys = stage_keys(cfg.seed)
    family: Family = make_family(cfg.model, enc.vocab_size)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"params": {}, "metrics": {}}

    def timed(name):
        timings[name] = time.perf_counter() - t0

    # ---- M0: pretraining
    t0 = time.perf_counter()
    pcfg = cfg.pretrain
    eps = lm.smoothing_to_label_smoothing(pcfg.smoothing, enc.num_corpus_tokens, enc.vocab_size)
    corpus = lm.make_data(enc.corpus_tokens, enc.corpus_mask, pcfg.batch_size, eps)
    if pcfg.mode == "exact":
        m0 = lm.fit_exact(keys["pretrain"], pcfg, family, corpus)
    else:
        m0 = lm.init(keys["pretrain"], pcfg, family)
        m0, _ = loop.train(m0, corpus, keys["pretrain"], num_steps=pcfg.steps, log_every=pcfg.log_every,
                           step_fn=lm.step, select_fn=lm.select_batch, label="pretrain", log=log,
                           progress=progress)
    m0_eval = jax.device_get(lm.evaluate(m0.params, family, corpus))
    results["params"]["M0"] = m0.params
    results["metrics"]["M0"] = {"mode": pcfg.mode, "corpus_tokens": enc.num_corpus_tokens,
                                **_floats(m0_eval)}
    timed("M0")

    # ---- M1: supervised fine-tuning on demonstrations
    t0 = time.perf_counter()
    scfg = cfg.sft
    demos = lm.make_data(enc.sft_tokens, enc.sft_mask, scfg.batch_size)
    before = jax.device_get(lm.evaluate(m0.params, family, demos))
    m1 = lm.init(keys["sft"], scfg, family, params=m0.params)
    m1, _ = loop.train(m1, demos, keys["sft"], num_steps=scfg.steps, log_every=scfg.log_every,
                       step_fn=lm.step, select_fn=lm.select_batch, label="sft", log=log, progress=progress)
    after = jax.device_get(lm.evaluate(m1.params, family, demos))
    results["params"]["M1"] = m1.params
    results["metrics"]["M1"] = {"demo_nll_before": float(before["nll"]), "demo_nll_after": float(after["nll"]),
                                "skipped_updates": int(m1.skipped)}
    timed("M1")

    # ---- RM: Bradley-Terry reward model
    t0 = time.perf_counter()
    rcfg = cfg.reward
    k_split, k_rm = jax.random.split(keys["reward"])
    train_pairs, held_pairs = split_pairs(enc.pairs, k_split, rcfg.heldout_fraction)
    train_pairs = jax.tree_util.tree_map(jnp.asarray, train_pairs)
    rm = reward.init(k_rm, rcfg, family)
    rm, _ = loop.train(rm, train_pairs, k_rm, num_steps=rcfg.steps, log_every=rcfg.log_every,
                       step_fn=reward.step, select_fn=reward.select_batch, label="reward", log=log,
                       show=("loss", "accuracy"), progress=progress)
    rm_metrics = {"train_pairs": int(train_pairs["chosen"].shape[0]),
                  "heldout_pairs": int(held_pairs["chosen"].shape[0]),
                  **{f"train_{k}": v for k, v in _floats(reward.evaluate(rm.params, family, train_pairs)).items()}}
    if held_pairs["chosen"].shape[0]:
        held = jax.tree_util.tree_map(jnp.asarray, held_pairs)
        rm_metrics.update({f"heldout_{k}": v for k, v in _floats(reward.evaluate(rm.params, family, held)).items()})
    results["params"]["RM"] = rm.params
    results["metrics"]["RM"] = {**rm_metrics, "skipped_updates": int(rm.skipped)}
    timed("RM")

    # ---- M2: PPO RLHF
    t0 = time.perf_counter()
    qcfg = cfg.ppo
    ref = m0.params if qcfg.reference == "pretrain" else m1.params
    penalty = ppo.penalty_vector(enc.vocab_size, unsafe_ids(tokenizer, qcfg.unsafe_tokens), qcfg.safety_penalty)
    pstate = ppo.init(qcfg, family, m1.params, ref, rm.params, penalty)
    ppo_data = {"prompt": jnp.asarray(enc.prompt), "prompt_mask": jnp.asarray(enc.prompt_mask),
                "ptx_tokens": demos["tokens"], "ptx_mask": demos["mask"]}
    demo_counts = _demo_counts(enc, family.vocab_size)
    start = _floats(ppo.evaluate(pstate, demo_counts))
    pstate, _ = loop.train(pstate, ppo_data, keys["ppo"], num_steps=qcfg.iterations, log_every=qcfg.log_every,
                           step_fn=ppo.step, select_fn=ppo.select_batch, label="ppo", log=log,
                           show=("rm_score", "kl", "safety_penalty"), progress=progress)
    end = _floats(ppo.evaluate(pstate, demo_counts))
    results["params"]["M2"] = pstate.policy
    results["metrics"]["M2"] = {
        "reference": qcfg.reference, "final_kl_coef": float(pstate.kl_coef),
        "skipped_updates": int(pstate.skipped), "unsafe_token_ids": int((penalty > 0).sum()),
        "exact_before": start, "exact_after": end,
    }
    timed("M2")

    # ---- objective U = alpha L_SFT + beta L_RLHF + gamma Omega (exact for the unigram)
    if end:
        o = cfg.objective
        omega = end["KL"] + end["safety"]
        results["objective"] = {
            "L_SFT": end["L_SFT"], "L_RLHF": end["L_RLHF"], "Omega": omega,
            "U": o.alpha * end["L_SFT"] + o.beta * end["L_RLHF"] + o.gamma * omega,
            "alpha": o.alpha, "beta": o.beta, "gamma": o.gamma, "exact": True,
        }
    results["timings"] = timings
    results["keys"] = {k: np.asarray(jax.random.key_data(v)).tolist() for k, v in keys.items()}
    return results


def _demo_counts(enc: EncodedData, vocab_size: int) -> jax.Array:
    """Counts of demonstration completion tokens (the exact L_SFT's statistics)."""
    return jnp.bincount(jnp.asarray(enc.sft_tokens).ravel(), weights=jnp.asarray(enc.sft_mask).ravel(),
                        length=vocab_size)


def _floats(tree: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(tree).items()}


def run_pipeline(
    dataset: Dataset,
    cfg: PipelineConfig,
    out_dir: str | pathlib.Path,
    *,
    progress: bool = True,
) -> dict:
    """Runs every stage and writes the run directory; returns the summary."""
    t_start = time.perf_counter()
    tokenizer, enc = prepare(dataset, cfg)  # raises before anything is written
    t_prepare = time.perf_counter() - t_start
    out = pathlib.Path(out_dir)
    (out / "params").mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    with open(metrics_path, "w", encoding="utf-8") as fh:
        def log(rec: dict) -> None:
            fh.write(json.dumps(rec) + "\n")

        results = run_stages(enc, tokenizer, cfg, log=log, progress=progress)

    fingerprints = {name: artifacts.fingerprint(p) for name, p in results["params"].items()}
    for name, params in results["params"].items():
        artifacts.save_params(out / "params" / f"{name}.npz", params)
    tokenizer.save(out / "vocab.json")
    artifacts.write_json(out / "config.json", cfg.to_dict())
    data_hash = {
        "corpus": artifacts.arrays_sha256(enc.corpus_tokens, enc.corpus_mask),
        "demos": artifacts.arrays_sha256(enc.sft_tokens, enc.sft_mask, enc.prompt),
        "prefs": artifacts.arrays_sha256(*[enc.pairs[k] for k in sorted(enc.pairs)]),
    }
    env = environment()
    stage_cfg = {"M0": cfg.pretrain, "M1": cfg.sft, "RM": cfg.reward, "M2": cfg.ppo}
    stage_key = {"M0": "pretrain", "M1": "sft", "RM": "reward", "M2": "ppo"}
    stage_data = {"M0": ["corpus"], "M1": ["demos"], "RM": ["prefs"], "M2": ["demos", "prefs"]}
    manifest = {
        "seed": cfg.seed,
        "model": cfg.model,
        "config_hash": cfg.config_hash(),
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "environment": env,
        "stages": {
            s: {
                "key_purpose": stage_key[s],
                "key_data": results["keys"][stage_key[s]],
                "config_hash": sha256_json(dataclasses.asdict(stage_cfg[s])),
                "data_hash": {d: data_hash[d] for d in stage_data[s]},
                "fingerprint": fingerprints[s],
            }
            for s in STAGES
        },
    }
    summary = {
        "model": cfg.model,
        "seed": cfg.seed,
        "data_source": dataset.source,
        "vocab_size": tokenizer.vocab_size,
        "stages": results["metrics"],
        "objective": results.get("objective"),
        "fingerprints": fingerprints,
        "timings_s": {"prepare": t_prepare, **results["timings"],
                      "total": time.perf_counter() - t_start},
        "versions": env,
    }
    artifacts.write_json(out / "manifest.json", manifest)
    artifacts.write_json(out / "summary.json", summary)
    return summary
