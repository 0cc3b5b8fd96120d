"""Tests of codex_jax.config: field validation, loading TOML/JSON, freezing, hashing."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing

import pytest
from conftest import TINY_CONFIG, to_toml, write_config

from codex_jax.config import (
    DataConfig,
    DPOConfig,
    GRPOConfig,
    LMConfig,
    ObjectiveConfig,
    OptimConfig,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
    RLOOConfig,
    TasksConfig,
    TransformerConfig,
    from_dict,
    load_config,
    sha256_json,
)
from codex_jax.data.bpe import BPEConfig
from codex_jax.data.tokenizer import TokenizerConfig
from codex_jax.errors import CodexError, ConfigError

NAN, INF = float("nan"), float("inf")

# Values that are wrong for every numeric field, whatever its range.
NOT_A_NUMBER = ["1", "", None, [1], {"a": 1}, True, False, NAN, INF, -INF]
NOT_AN_INT = ["3", None, 2.0, 2.5, [2], True, False, NAN, INF]

# (class, field, minimum)
INT_FIELDS = [
    (OptimConfig, "warmup_steps", 0),
    (LMConfig, "steps", 1), (LMConfig, "batch_size", 1), (LMConfig, "log_every", 1),
    (RewardConfig, "steps", 1), (RewardConfig, "batch_size", 1), (RewardConfig, "log_every", 1),
    (PPOConfig, "iterations", 1), (PPOConfig, "rollouts", 1), (PPOConfig, "response_len", 1),
    (PPOConfig, "epochs", 1), (PPOConfig, "minibatches", 1), (PPOConfig, "kl_horizon", 1),
    (PPOConfig, "ptx_batch_size", 1), (PPOConfig, "log_every", 1),
    (DataConfig, "context_len", 2), (DataConfig, "max_prompt_len", 2), (DataConfig, "max_response_len", 2),
    (TokenizerConfig, "min_count", 1), (TokenizerConfig, "max_size", 5),
    (PipelineConfig, "seed", 0), (PipelineConfig, "checkpoint_every", 0),
    (PipelineConfig, "max_consecutive_skips", 1),
    (TransformerConfig, "layers", 1), (TransformerConfig, "mlp_ratio", 1),
    (TransformerConfig, "context_len", 2), (TransformerConfig, "top_k", 0),
    (BPEConfig, "vocab_size", 260), (BPEConfig, "min_frequency", 1),
    (TasksConfig, "problems_per_family", 2), (TasksConfig, "seed", 0), (TasksConfig, "eval_samples", 1),
    *[(cls, f, 1) for cls in (GRPOConfig, RLOOConfig)
      for f in ("iterations", "response_len", "epochs", "minibatches", "kl_horizon", "log_every")],
    (GRPOConfig, "group_size", 2), (RLOOConfig, "group_size", 2),
    (DPOConfig, "steps", 1), (DPOConfig, "batch_size", 1), (DPOConfig, "log_every", 1),
]

# (class, field, low, high, low_open)
FLOAT_FIELDS = [
    (PipelineConfig, "checkpoint_min_seconds", 0.0, INF, False),
    (OptimConfig, "lr", 0.0, INF, True),
    (OptimConfig, "final_lr_fraction", 0.0, 1.0, False),
    (OptimConfig, "weight_decay", 0.0, INF, False),
    (OptimConfig, "grad_clip", 0.0, INF, False),
    (LMConfig, "smoothing", 0.0, INF, False),
    (RewardConfig, "l2", 0.0, INF, False),
    (RewardConfig, "heldout_fraction", 0.0, 0.5, False), (DataConfig, "heldout_fraction", 0.0, 0.5, False),
    (PPOConfig, "clip", 0.0, INF, True),
    (PPOConfig, "kl_coef", 0.0, INF, False),
    (PPOConfig, "kl_target", 0.0, INF, True),
    (PPOConfig, "max_kl", 0.0, INF, True),
    (PPOConfig, "vf_coef", 0.0, INF, False),
    (PPOConfig, "value_clip", 0.0, INF, True),
    (PPOConfig, "no_eos_penalty", 0.0, INF, False),
    (PPOConfig, "gamma", 0.0, 1.0, False),
    (PPOConfig, "gae_lambda", 0.0, 1.0, False),
    (PPOConfig, "temperature", 0.0, INF, True),
    (PPOConfig, "ptx_coef", 0.0, INF, False),
    (PPOConfig, "safety_penalty", 0.0, INF, False),
    (ObjectiveConfig, "alpha", 0.0, INF, False),
    (ObjectiveConfig, "beta", 0.0, INF, False),
    (ObjectiveConfig, "gamma", 0.0, INF, False),
    (TransformerConfig, "top_p", 0.0, 1.0, True),
    (TasksConfig, "heldout_fraction", 0.0, 1.0, True), (TasksConfig, "execution_coef", 0.0, INF, False),
    (TasksConfig, "timeout", 0.0, INF, True), (TasksConfig, "eval_temperature", 0.0, INF, True),
    *[(cls, f, 0.0, INF, lo) for cls in (GRPOConfig, RLOOConfig)
      for f, lo in (("kl_coef", False), ("kl_target", True), ("max_kl", True), ("no_eos_penalty", False),
                    ("temperature", True), ("safety_penalty", False), ("clip", True))],
    (DPOConfig, "beta", 0.0, INF, True), (DPOConfig, "l2", 0.0, INF, False),
    (DPOConfig, "heldout_fraction", 0.0, 0.5, False),
]

CHOICE_FIELDS = [
    (OptimConfig, "name", ("adam", "adamw", "sgd")),
    (OptimConfig, "schedule", ("constant", "cosine")),
    (LMConfig, "mode", ("exact", "gradient")),
    (PPOConfig, "reference", ("pretrain", "sft")),
    (PPOConfig, "kl_guard", ("stop", "skip")),
    (PPOConfig, "kl_estimator", ("k1", "k2", "k3")), (PPOConfig, "kl_placement", ("reward", "loss")),
    (TokenizerConfig, "mode", ("regex", "whitespace")),
    (PipelineConfig, "model", ("unigram",)),  # "transformer" needs its own defaults: tested below
    (TransformerConfig, "positions", ("rotary", "learned")),
    (TransformerConfig, "dtype", ("float32", "bfloat16")),
    (TasksConfig, "reward", ("rm", "execution", "mixed")),
    (TasksConfig, "execution_mode", ("fraction", "pass")),
    (PipelineConfig, "algorithm", ("ppo", "grpo", "rloo", "dpo")),
    *[(cls, f, c) for cls in (GRPOConfig, RLOOConfig)
      for f, c in (("kl_estimator", ("k1", "k2", "k3")), ("kl_placement", ("reward", "loss")),
                   ("reference", ("pretrain", "sft")), ("kl_guard", ("stop", "skip")))],
    (DPOConfig, "loss", ("sigmoid", "ipo")), (DPOConfig, "reference", ("pretrain", "sft")),
]

BOOL_FIELDS = [(PPOConfig, "whiten_advantages"), (PPOConfig, "whiten_rewards"), (TokenizerConfig, "lowercase"),
               (TasksConfig, "enabled"), (TasksConfig, "require_sandbox"),
               (GRPOConfig, "whiten_rewards"), (RLOOConfig, "whiten_rewards"),
               (GRPOConfig, "scale_rewards"), (GRPOConfig, "length_normalise")]
OPTIONAL_FIELDS = {(PPOConfig, "kl_target"), (PPOConfig, "max_kl"), (GRPOConfig, "kl_target"),
                   (GRPOConfig, "max_kl"), (RLOOConfig, "kl_target"), (RLOOConfig, "max_kl"),
                   (RLOOConfig, "clip")}  # None switches them off
# Fields with their own tests below.
SPECIAL_FIELDS = {(PPOConfig, "unsafe_tokens"), (TransformerConfig, "d_model"), (TransformerConfig, "heads"),
                  (TasksConfig, "families"), (GRPOConfig, "unsafe_tokens"), (RLOOConfig, "unsafe_tokens"),
                  (GRPOConfig, "rollouts"), (RLOOConfig, "rollouts")}


def leaf_fields(cls) -> set:
    """(class, field) of every non-dataclass field reachable from ``cls``."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= leaf_fields(hints[f.name])
        else:
            out.add((cls, f.name))
    return out


def test_every_field_has_a_validation_test():
    """A new config field must be added to one of the tables above."""
    covered = ({(c, f) for c, f, *_ in INT_FIELDS + FLOAT_FIELDS + CHOICE_FIELDS} | set(BOOL_FIELDS)
               | SPECIAL_FIELDS)
    assert leaf_fields(PipelineConfig) - covered == set(), "fields without a validation test"


def _valid_kwargs(cls, field, value) -> dict:
    """Extra fields that keep an otherwise valid config valid when ``field`` = value."""
    if cls is PPOConfig and field == "rollouts":
        return {"minibatches": 1}
    if cls is PPOConfig and field == "minibatches":
        return {"rollouts": value}
    if cls in (GRPOConfig, RLOOConfig) and field == "group_size":
        return {"rollouts": value, "minibatches": 1}
    if cls in (GRPOConfig, RLOOConfig) and field == "minibatches":
        return {"rollouts": 8 * value}
    return {}


def assert_names(err: pytest.ExceptionInfo, cls, field, value) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(rf"\b{re.escape(field)}\b", msg), msg
    assert repr(value) in msg, (repr(value), msg)


# --------------------------------------------------------------------------- ints
def _int_bad(fields):
    out = []
    for cls, field, minimum in fields:
        for v in [minimum - 1, minimum - 2, -(10**6), *NOT_AN_INT]:
            out.append(pytest.param(cls, field, v, id=f"{cls.__name__}.{field}={v!r}"))
    return out


@pytest.mark.parametrize("cls,field,value", _int_bad(INT_FIELDS))
def test_int_field_rejects(cls, field, value):
    with pytest.raises(ConfigError) as err:
        cls(**{field: value})
    assert_names(err, cls, field, value)


@pytest.mark.parametrize("cls,field,minimum", INT_FIELDS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_int_field_edges_accepted(cls, field, minimum):
    for value in (minimum, minimum + 1, 10**6):
        cfg = cls(**{field: value, **_valid_kwargs(cls, field, value)})
        assert getattr(cfg, field) == value


# --------------------------------------------------------------------------- floats
def _float_bad(fields):
    out = []
    for cls, field, low, high, low_open in fields:
        bad = [low - 1.0, low - 1e-9, -INF, *[v for v in NOT_A_NUMBER if v is not None]]
        if (cls, field) not in OPTIONAL_FIELDS:
            bad.append(None)
        if low_open:
            bad += [low, -0.0, 0]
        if high != INF:
            bad += [high + 1e-9, high * 2 + 1, INF]
        for v in bad:
            out.append(pytest.param(cls, field, v, id=f"{cls.__name__}.{field}={v!r}"))
    return out


@pytest.mark.parametrize("cls,field,value", _float_bad(FLOAT_FIELDS))
def test_float_field_rejects(cls, field, value):
    with pytest.raises(ConfigError) as err:
        cls(**{field: value})
    assert_names(err, cls, field, value)


@pytest.mark.parametrize("cls,field,low,high,low_open", FLOAT_FIELDS,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_float_field_edges_accepted(cls, field, low, high, low_open):
    edges = [low + 1e-12, 1 if high == INF else high, 3 if high == INF else (low + high) / 2]
    if not low_open:
        edges += [low, 0]
    if high != INF:
        edges.append(high)
    else:
        edges.append(1e300)
    for value in edges:
        assert getattr(cls(**{field: value}), field) == value


@pytest.mark.parametrize("field", ["kl_target", "max_kl"])
def test_optional_float_none_accepted(field):
    assert getattr(PPOConfig(**{field: None}), field) is None
    assert getattr(PPOConfig(**{field: 0.5}), field) == 0.5


# --------------------------------------------------------------------------- choices / bools
@pytest.mark.parametrize("cls,field,choices", CHOICE_FIELDS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_choice_fields(cls, field, choices):
    for bad in [choices[0].upper(), choices[0] + " ", "", "other", 1, None, True]:
        with pytest.raises(ConfigError) as err:
            cls(**{field: bad})
        assert_names(err, cls, field, bad)
    for good in choices:
        assert getattr(cls(**{field: good}), field) == good


@pytest.mark.parametrize("cls,field", BOOL_FIELDS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_bool_fields(cls, field):
    for bad in [0, 1, "true", "false", None, 1.0]:
        with pytest.raises(ConfigError) as err:
            cls(**{field: bad})
        assert_names(err, cls, field, bad)
    for good in (True, False):
        assert getattr(cls(**{field: good}), field) is good


# --------------------------------------------------------------------------- special rules
@pytest.mark.parametrize("value", ["system", ("",), ("ok", ""), (1,), ["a", "b"], None, (("a",),)])
def test_unsafe_tokens_rejected(value):
    with pytest.raises(ConfigError) as err:
        PPOConfig(unsafe_tokens=value)
    assert_names(err, PPOConfig, "unsafe_tokens", value)


def test_unsafe_tokens_accepted():
    assert PPOConfig(unsafe_tokens=()).unsafe_tokens == ()
    assert PPOConfig(unsafe_tokens=("eval", "rm -rf")).unsafe_tokens == ("eval", "rm -rf")


@pytest.mark.parametrize("rollouts,minibatches", [(8, 3), (8, 16), (512, 5), (1, 2)])
def test_minibatches_must_divide_rollouts(rollouts, minibatches):
    with pytest.raises(ConfigError) as err:
        PPOConfig(rollouts=rollouts, minibatches=minibatches)
    assert_names(err, PPOConfig, "minibatches", minibatches)
    assert str(rollouts) in str(err.value)


@pytest.mark.parametrize("rollouts,minibatches", [(8, 1), (8, 2), (8, 8), (1, 1), (512, 4)])
def test_dividing_minibatches_accepted(rollouts, minibatches):
    cfg = PPOConfig(rollouts=rollouts, minibatches=minibatches)
    assert cfg.minibatch_size * minibatches == rollouts


def test_sft_must_be_gradient():
    with pytest.raises(ConfigError) as err:
        PipelineConfig(sft=LMConfig(mode="exact"))
    assert "sft.mode" in str(err.value) and "'exact'" in str(err.value)
    # pretraining may be exact or gradient
    assert PipelineConfig(pretrain=LMConfig(mode="gradient")).pretrain.mode == "gradient"


def test_config_errors_are_codex_and_value_errors():
    with pytest.raises(CodexError):
        OptimConfig(lr=0)
    with pytest.raises(ValueError):
        OptimConfig(lr=0)


def test_keyword_only():
    with pytest.raises(TypeError):
        OptimConfig("adam")  # type: ignore[misc]


def test_defaults_are_valid_and_documented_values():
    cfg = PipelineConfig()
    assert cfg.pretrain.mode == "exact" and cfg.sft.mode == "gradient"
    assert cfg.ppo.kl_coef == 1.0 and cfg.ppo.kl_target is None
    assert cfg.ppo.minibatch_size * cfg.ppo.minibatches == cfg.ppo.rollouts


# --------------------------------------------------------------------------- frozen / hash
def test_frozen():
    cfg = PipelineConfig()
    for obj, field, value in [(cfg, "seed", 1), (cfg.sft, "steps", 1), (cfg.sft.optim, "lr", 1.0),
                              (cfg.ppo, "kl_coef", 0.0), (cfg.tokenizer, "max_size", 9),
                              (cfg.data, "context_len", 9), (cfg.objective, "alpha", 2.0)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, value)
    assert cfg == PipelineConfig()


def test_hashable_and_equal_by_value():
    a, b = PipelineConfig(), PipelineConfig()
    assert a == b and hash(a) == hash(b)
    c = PipelineConfig(sft=LMConfig(steps=7, batch_size=256, optim=OptimConfig(lr=0.02)))
    assert c != a
    assert len({a, b, c}) == 2
    assert {a: 1}[b] == 1
    hash(PPOConfig(kl_target=0.5))


def test_config_hash_stable_and_sensitive():
    a = PipelineConfig()
    h = a.config_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert h == a.config_hash() == PipelineConfig().config_hash()
    assert h == sha256_json(a.to_dict())
    changed = [
        dataclasses.replace(a, seed=1),
        dataclasses.replace(a, sft=dataclasses.replace(a.sft, steps=7)),
        dataclasses.replace(a, sft=dataclasses.replace(a.sft, optim=OptimConfig(lr=0.021))),
        dataclasses.replace(a, ppo=dataclasses.replace(a.ppo, kl_coef=1.5)),
        dataclasses.replace(a, ppo=dataclasses.replace(a.ppo, kl_target=0.1)),
        dataclasses.replace(a, ppo=dataclasses.replace(a.ppo, unsafe_tokens=("eval",))),
        dataclasses.replace(a, tokenizer=TokenizerConfig(lowercase=True)),
        dataclasses.replace(a, objective=ObjectiveConfig(alpha=0.5)),
    ]
    hashes = {c.config_hash() for c in changed}
    assert h not in hashes and len(hashes) == len(changed)


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_nested_override_keeps_pipeline_defaults(tmp_path, suffix):
    path = write_config(tmp_path / f"c{suffix}", {"sft": {"steps": 7}, "ppo": {"optim": {"lr": 0.5}}})
    cfg = load_config(path)
    base = PipelineConfig()
    assert cfg.sft.steps == 7
    # the pipeline's SFT defaults, not LMConfig's
    assert cfg.sft.batch_size == base.sft.batch_size == 256
    assert cfg.sft.optim == base.sft.optim
    assert cfg.ppo.optim.lr == 0.5 and cfg.ppo.optim.schedule == base.ppo.optim.schedule == "cosine"
    assert cfg.ppo.kl_coef == base.ppo.kl_coef
    assert cfg == dataclasses.replace(
        base, sft=dataclasses.replace(base.sft, steps=7),
        ppo=dataclasses.replace(base.ppo, optim=dataclasses.replace(base.ppo.optim, lr=0.5)))


def test_toml_and_json_agree(tmp_path):
    a = load_config(write_config(tmp_path / "c.toml", TINY_CONFIG))
    b = load_config(write_config(tmp_path / "c.json", TINY_CONFIG))
    assert a == b and a.config_hash() == b.config_hash()
    assert a.sft.steps == 4 and a.ppo.rollouts == 8 and a.tokenizer.max_size == 64


def test_int_for_float_field_is_converted(tmp_path):
    a = load_config(write_config(tmp_path / "a.toml", {"sft": {"optim": {"lr": 1}}}))
    b = load_config(write_config(tmp_path / "b.toml", {"sft": {"optim": {"lr": 1.0}}}))
    assert type(a.sft.optim.lr) is float and a == b and a.config_hash() == b.config_hash()


@pytest.mark.parametrize("field", ["kl_target", "max_kl"])
def test_int_for_optional_float_field_is_converted(tmp_path, field):
    a = load_config(write_config(tmp_path / "a.toml", {"ppo": {field: 1}}))
    b = load_config(write_config(tmp_path / "b.toml", {"ppo": {field: 1.0}}))
    assert a == b
    assert type(getattr(a.ppo, field)) is float and a.config_hash() == b.config_hash()


def test_list_becomes_tuple(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.json", {"ppo": {"unsafe_tokens": ["eval", "exec"]}}))
    assert cfg.ppo.unsafe_tokens == ("eval", "exec")
    hash(cfg)


def test_no_file_gives_defaults():
    assert load_config(None) == PipelineConfig()


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("data,dotted", [
    ({"ppo": {"kl_coeff": 1.0}}, "ppo.kl_coeff"),
    ({"seeed": 1}, "seeed"),
    ({"sft": {"optim": {"learning_rate": 0.1}}}, "sft.optim.learning_rate"),
    ({"tokenizer": {"vocab_size": 10}}, "tokenizer.vocab_size"),
    ({"rlhf": {"steps": 1}}, "rlhf"),
])
def test_unknown_keys_named_by_dotted_path(tmp_path, suffix, data, dotted):
    path = write_config(tmp_path / f"c{suffix}", data)
    with pytest.raises(ConfigError, match=re.escape(dotted)) as err:
        load_config(path)
    assert "unknown" in str(err.value)


def test_several_unknown_keys_all_named(tmp_path):
    path = write_config(tmp_path / "c.json", {"ppo": {"kl_coeff": 1.0, "clipp": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "ppo.kl_coeff" in str(err.value) and "ppo.clipp" in str(err.value)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_bad_value_in_file_names_section_field_value(tmp_path, suffix):
    path = write_config(tmp_path / f"c{suffix}", {"ppo": {"clip": -0.5}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "ppo" in msg and "clip" in msg and "-0.5" in msg


@pytest.mark.parametrize("name,text", [
    ("bad.toml", "[sft\nsteps = 3\n"),
    ("bad.toml", "steps = = 3\n"),
    ("dup.toml", "seed = 1\nseed = 2\n"),
    ("bad.json", '{"sft": {"steps": 3,}}'),
    ("bad.json", "{'seed': 1}"),
    ("empty.json", ""),
    ("bad.cfg", "not toml at all {"),
])
def test_unparseable_file_named(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_invalid_utf8_file_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"model = \"\xff\"\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


@pytest.mark.parametrize("text", ["[1, 2]", '"seed"', "3", "null"])
def test_json_top_level_must_be_object(tmp_path, text):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(str(path))) as err:
        load_config(path)
    assert "not found" in str(err.value)
    with pytest.raises(ConfigError):
        load_config(tmp_path)  # a directory is not a config file


@pytest.mark.parametrize("data,section", [
    ({"sft": 3}, "sft"), ({"ppo": {"optim": "adam"}}, "ppo.optim"), ({"tokenizer": [1, 2]}, "tokenizer"),
    ({"sft": {"steps": {"n": 3}}}, "steps"),
])
def test_wrong_shape_named(tmp_path, data, section):
    with pytest.raises(ConfigError, match=re.escape(section)):
        load_config(write_config(tmp_path / "c.json", data))


def test_seed_override_wins_over_file(tmp_path):
    path = write_config(tmp_path / "c.toml", {"seed": 3, "sft": {"steps": 5}})
    assert load_config(path).seed == 3
    cfg = load_config(path, seed=11)
    assert cfg.seed == 11 and cfg.sft.steps == 5
    assert load_config(path, seed=None).seed == 3  # None = no override
    assert load_config(path, seed=0).seed == 0  # 0 is an override, not "unset"
    with pytest.raises(ConfigError, match="seed"):
        load_config(path, seed=-1)


def test_config_json_written_by_a_run_round_trips(tmp_path):
    """``config.json`` (``to_dict``) loads back into the same config and hash."""
    cfg = load_config(write_config(tmp_path / "c.json", {**TINY_CONFIG, "ppo": {**TINY_CONFIG["ppo"],
                                                                                "kl_target": 0.2}}))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    again = load_config(tmp_path / "config.json")
    assert again == cfg and again.config_hash() == cfg.config_hash()


def test_toml_writer_round_trips_special_floats(tmp_path):
    # guards the test helper used by test_bad_input
    import tomllib

    text = to_toml({"a": NAN, "b": -INF, "c": 1e-300, "d": {"e": [1, "x\ny"], "f": {"g": True}}})
    data = tomllib.loads(text)
    assert math.isnan(data["a"]) and data["b"] == -INF and data["c"] == 1e-300
    assert data["d"] == {"e": [1, "x\ny"], "f": {"g": True}}


# --------------------------------------------------------------------------- known bugs
@pytest.mark.parametrize("seed", [2**32, 2**32 + 1, 2**40])
def test_large_seed_rejected_or_distinct(seed):
    import dataclasses

    import jax
    import numpy as np

    from codex_jax.run.driver import stage_keys

    try:
        cfg = PipelineConfig(seed=seed)
    except ConfigError as err:
        assert "seed" in str(err)
        return
    a, b = stage_keys(cfg), stage_keys(dataclasses.replace(cfg, seed=cfg.seed % 2**32))
    assert not np.array_equal(jax.random.key_data(a["ppo"]), jax.random.key_data(b["ppo"]))


def test_huge_int_for_float_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"sft": {"optim": {"lr": 1' + "0" * 400 + "}}}")
    with pytest.raises(ConfigError, match="lr"):
        load_config(path)


@pytest.mark.parametrize("name,text", [
    ("deep.json", '{"sft": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n"),
])
def test_deeply_nested_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_unknown_key_message_is_one_line(tmp_path):
    path = write_config(tmp_path / "c.json", {"ppo": {"kl\ncoef": 1.0}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_transformer_shape_fields_are_validated_together():
    assert TransformerConfig(d_model=64, heads=4).head_dim == 16
    for bad in (0, -4, 2.0, True, "64"):
        with pytest.raises(ConfigError, match="d_model"):
            TransformerConfig(d_model=bad)
        with pytest.raises(ConfigError, match="heads"):
            TransformerConfig(heads=bad)
    with pytest.raises(ConfigError, match=r"heads must divide d_model \(128\), got 3"):
        TransformerConfig(heads=3)
    with pytest.raises(ConfigError, match="rotary positions need an even head size"):
        TransformerConfig(d_model=12, heads=4)
    assert TransformerConfig(d_model=12, heads=4, positions="learned").head_dim == 3


def test_transformer_pipeline_checks_its_lengths_and_mode():
    from codex_jax.config import default_config

    cfg = default_config("transformer")
    assert cfg.pretrain.mode == "gradient" and cfg.ppo.gamma == 1.0
    with pytest.raises(ConfigError, match="pretrain.mode must be 'gradient' for model 'transformer'"):
        load_config(None, model="transformer", pretrain={"mode": "exact"})
    with pytest.raises(ConfigError, match=r"transformer.context_len must be >= 128"):
        load_config(None, model="transformer", transformer={"context_len": 64})


@pytest.mark.parametrize("bad", ["add_k", ["add_k", 3], [""], None])
def test_task_families_must_be_a_list_of_names(bad):
    with pytest.raises(ConfigError, match=r"families"):
        from_dict(PipelineConfig, {"tasks": {"families": bad}})


def test_tasks_need_the_transformer_and_no_content_held_out():
    with pytest.raises(ConfigError, match="tasks.enabled needs model 'transformer'"):
        from_dict(PipelineConfig, {"tasks": {"enabled": True}})
    with pytest.raises(ConfigError, match="data.heldout_fraction = 0"):
        load_config(None, model="transformer", tasks={"enabled": True})
    cfg = load_config(None, model="transformer", tasks={"enabled": True}, data={"heldout_fraction": 0.0})
    assert cfg.tasks.enabled and cfg.tasks.reward == "execution"


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_group_size_and_minibatches_must_divide_rollouts(cls):
    for kwargs, field in (({"rollouts": 12, "group_size": 8}, "group_size"),
                          ({"rollouts": 16, "group_size": 4, "minibatches": 3}, "minibatches")):
        with pytest.raises(ConfigError) as err:
            cls(**kwargs)
        assert_names(err, cls, field, kwargs[field])
    for bad in (0, -4, 2.0, True, "8"):
        with pytest.raises(ConfigError) as err:
            cls(rollouts=bad)
        assert_names(err, cls, "rollouts", bad)
    assert cls(rollouts=16, group_size=4, minibatches=2).groups == 4
    with pytest.raises(ConfigError, match="unsafe_tokens"):
        cls(unsafe_tokens=("eval", ""))
