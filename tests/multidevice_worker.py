"""Runs in a subprocess with 4 forced host devices (see test_sharding.py) and writes
what it computed to OUT.npz / OUT.json for the tests to check.

usage: python multidevice_worker.py OUT   (XLA_FLAGS=--xla_force_host_platform_device_count=4)
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from conftest import TINY_CONFIG, write_dataset  # noqa: E402

from codex_jax.config import (  # noqa: E402  # noqa: E402
    LMConfig,
    OptimConfig,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
    TransformerConfig,
    from_dict,
)
from codex_jax.core import kernels
from codex_jax.core.sharding import make_layout  # noqa: E402
from codex_jax.data.records import load_dataset  # noqa: E402
from codex_jax.models.registry import make_family  # noqa: E402
from codex_jax.run import artifacts
from codex_jax.run import train as loop
from codex_jax.run.checkpoint import StageCheckpointer, state_leaves  # noqa: E402
from codex_jax.run.pipeline import Runner, prepare, run_stages  # noqa: E402
from codex_jax.stages import (
    lm,
    ppo,
    reward,  # noqa: E402
)

MESHES = {  # name -> (axis sizes, fsdp); "one" is the single-device program (no layout)
    "one": None,
    "data4": ({"data": 4, "model": 1}, False),
    "data2_model2_fsdp": ({"data": 2, "model": 2}, True),
}


def layout_of(name):
    spec = MESHES[name]
    return None if spec is None else make_layout(spec[0], fsdp=spec[1])


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in state_leaves(jax.device_get(tree)).items()}


def specs(tree) -> dict[str, list]:
    """{leaf: its PartitionSpec as a list (None: not split)}."""
    return {k: list(getattr(v.sharding, "spec", ())) for k, v in state_leaves(tree).items()}


def counting(arrays: dict, record: dict) -> None:
    key = jax.random.key(0)
    ids = jax.random.randint(key, (64, 33), 0, 50)
    mask = (jax.random.uniform(jax.random.fold_in(key, 1), ids.shape) < 0.8).astype(jnp.float32)
    count = jax.jit(kernels.batch_count_tokens, static_argnums=2)
    arrays["count/ids"], arrays["count/mask"] = np.asarray(ids), np.asarray(mask)
    arrays["count/one"] = np.asarray(count(ids, mask, 50))
    lay = layout_of("data4")
    placed = lay.place_data({"ids": ids, "mask": mask})
    record["count_input_spec"] = list(placed["ids"].sharding.spec)
    arrays["count/data4"] = np.asarray(count(placed["ids"], placed["mask"], 50))


def symbolic(tmp: pathlib.Path, arrays: dict, record: dict) -> None:
    cfg = from_dict(PipelineConfig, TINY_CONFIG)
    tokenizer, enc = prepare(load_dataset(write_dataset(tmp / "data")), cfg)
    for name in MESHES:
        res = run_stages(enc, tokenizer, cfg, Runner(cfg=cfg, progress=False, layout=layout_of(name)))
        for stage, params in res["params"].items():
            for leaf, value in flat(params).items():
                arrays[f"symbolic/{name}/{stage}/{leaf}"] = value
        record.setdefault("symbolic_fingerprints", {})[name] = {
            s: artifacts.fingerprint(jax.device_get(p)) for s, p in res["params"].items()}


TCFG = TransformerConfig(layers=1, d_model=32, heads=2, context_len=32)
V = 40


def transformer_states():
    """A few steps of every transformer stage (batch 8 / 8 pairs / 8 rollouts)."""
    family = make_family("transformer", V, TCFG)
    key = jax.random.key(3)
    tokens = jax.random.randint(key, (16, 16), 4, V)
    ones = jnp.ones(tokens.shape, jnp.float32)
    pairs = {"prompt": tokens[:, :4], "prompt_mask": ones[:, :4], "chosen": tokens[:, 4:10],
             "chosen_mask": ones[:, 4:10], "rejected": tokens[:, 10:], "rejected_mask": ones[:, 10:]}
    ppo_data = {"prompt": tokens[:, :6], "prompt_mask": ones[:, :6], "ptx_tokens": tokens, "ptx_mask": ones}
    lcfg = LMConfig(steps=3, batch_size=8, log_every=3, optim=OptimConfig(lr=1e-3))
    rcfg = RewardConfig(steps=3, batch_size=8, log_every=3, optim=OptimConfig(lr=1e-3))
    qcfg = PPOConfig(iterations=2, rollouts=8, response_len=4, minibatches=2, epochs=2, ptx_batch_size=8,
                     log_every=2, ptx_coef=0.5, optim=OptimConfig(lr=1e-3))
    policy = family.init_policy(jax.random.fold_in(key, 1))
    rm = reward.init(jax.random.fold_in(key, 2), rcfg, family)
    return {
        "pretrain": (lm.init(jax.random.fold_in(key, 4), lcfg, family, params=policy),
                     lm.make_data(tokens, ones, lcfg.batch_size), lm.step, lm.select_batch, lcfg.steps),
        "reward": (rm, pairs, reward.step, reward.select_batch, rcfg.steps),
        "ppo": (ppo.init(qcfg, family, policy, policy, rm.params, jnp.zeros(V).at[7].set(1.0),
                         value=family.init_value(jax.random.fold_in(key, 5))),
                ppo_data, ppo.step, ppo.select_batch, qcfg.iterations),
    }


def transformer(arrays: dict, record: dict) -> None:
    for name in MESHES:
        lay = layout_of(name)
        for stage, (state, data, step_fn, select_fn, steps) in transformer_states().items():
            state, records = loop.train(state, data, jax.random.key(9), total_steps=steps, log_every=steps,
                                        step_fn=step_fn, select_fn=select_fn, label=stage, progress=False,
                                        layout=lay)
            for leaf, value in flat(state).items():
                arrays[f"transformer/{name}/{stage}/{leaf}"] = value
            record.setdefault("transformer_specs", {}).setdefault(name, {})[stage] = specs(state)
            record.setdefault("transformer_metrics", {}).setdefault(name, {})[stage] = records[-1]


def checkpoints(tmp: pathlib.Path, arrays: dict, record: dict) -> None:
    """A state saved on the 4-device FSDP mesh restores onto one device, and back."""
    lay = layout_of("data2_model2_fsdp")
    state, *_ = transformer_states()["pretrain"]
    state = state.replace(params=jax.tree_util.tree_map(lambda x: x + 0.5, state.params))  # not the init
    sharded = lay.place_state(state)
    one = jax.tree_util.tree_map(lambda x: jax.device_put(x, jax.devices()[0]), state)
    ckpt = StageCheckpointer(tmp / "ckpt", "pretrain")
    ckpt.save(1, sharded, {})
    ckpt.save(2, one, {})
    to_one = ckpt.restore(1, one)
    to_mesh = ckpt.restore(2, sharded)
    ckpt.close()
    arrays.update({f"ckpt/saved/{k}": v for k, v in flat(state).items()})
    arrays.update({f"ckpt/mesh_to_one/{k}": v for k, v in flat(to_one).items()})
    arrays.update({f"ckpt/one_to_mesh/{k}": v for k, v in flat(to_mesh).items()})
    record["ckpt_specs"] = {"mesh_to_one": {k: str(v.sharding) for k, v in state_leaves(to_one).items()},
                            "one_to_mesh": specs(to_mesh), "placed": specs(sharded)}


def main(out: str) -> None:
    out_path = pathlib.Path(out)
    tmp = out_path.parent / "work"
    arrays: dict[str, np.ndarray] = {}
    record: dict = {"devices": len(jax.devices())}
    counting(arrays, record)
    symbolic(tmp, arrays, record)
    transformer(arrays, record)
    checkpoints(tmp, arrays, record)
    np.savez(out_path.with_suffix(".npz"), **arrays)
    out_path.with_suffix(".json").write_text(json.dumps(record, default=float))


if __name__ == "__main__":
    main(sys.argv[1])
