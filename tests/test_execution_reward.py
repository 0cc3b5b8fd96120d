"""Execution rewards in RL: the sandboxed host reward inside the compiled PPO step.

Model-written programs run only in the executor (``codex_jax.execute``), never here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.config import BPEConfig, PPOConfig, TasksConfig, TransformerConfig
from codex_jax.config.tokenizers import EOS_ID, PAD_ID
from codex_jax.core.scan import run_steps
from codex_jax.data.bpe import BPETokenizer
from codex_jax.data.tasks import TaskSetConfig, generate_tasks
from codex_jax.data.tokenizer import pack_ids
from codex_jax.models.registry import make_family
from codex_jax.run import execution
from codex_jax.stages import ppo, rl

TASKS = TasksConfig(enabled=True, problems_per_family=4, heldout_fraction=0.25, families=("add_k", "mul_k"),
                    execution_mode="pass")


@pytest.fixture(scope="module")
def world():
    """Training problems, a BPE tokenizer on their text, and one ExecutionReward (closed at the end)."""
    train, _ = generate_tasks(TaskSetConfig(problems_per_family=4, heldout_fraction=0.25, families=("add_k", "mul_k")))
    texts = [p["prompt"] + p["canonical_solution"] for p in train] + ["    pass\n"]
    tok = BPETokenizer.build(texts, BPEConfig(vocab_size=400))
    reward = execution.ExecutionReward(tok, train, TASKS)
    yield train, tok, reward
    reward.close()


def _ids(tok, text, length):
    ids = tok.encode(text)[: length - 1] + [EOS_ID]
    return ids + [PAD_ID] * (length - len(ids))


def test_decode_completion_stops_at_the_first_eos(world):
    _, tok, _ = world
    ids = tok.encode("    return x + 3\n") + [EOS_ID] + tok.encode("garbage") + [PAD_ID]
    assert execution.decode_completion(tok, ids) == "    return x + 3\n"
    assert execution.decode_completion(tok, tok.encode("    pass\n")) == "    pass\n"  # no EOS: all of it


def test_canonical_completions_earn_one_and_wrong_ones_zero_through_the_compiled_callback(world):
    train, tok, reward = world
    rows = [_ids(tok, p["canonical_solution"], 16) for p in train] + [_ids(tok, "    pass\n", 16)] * len(train)
    prompt_ids = jnp.asarray(list(range(len(train))) * 2, jnp.int32)
    response = jnp.asarray(rows, jnp.int32)

    class State:  # the two fields task_reward reads; the host reward alone (rm_weight 0)
        family, host_reward, extras = None, reward, {}

    mask = ppo.response_mask(response, EOS_ID)
    last = (jnp.arange(16) == mask.sum(-1, keepdims=True) - 1).astype(jnp.float32)
    fn = jax.jit(lambda pid, r, m, la: rl.task_reward(State, pid, None, None, r, m, la))
    per_token = np.asarray(fn(prompt_ids, response, mask, last))
    np.testing.assert_array_equal(per_token.sum(-1), [1.0] * len(train) + [0.0] * len(train))
    np.testing.assert_array_equal(per_token, per_token.sum(-1, keepdims=True) * np.asarray(last))  # last token only
    assert reward.isolation in ("bubblewrap", "rlimits-only")


def _ppo_state(world, host):
    train, tok, _ = world
    cfg = TransformerConfig(layers=1, d_model=32, heads=2, context_len=48)
    fam = make_family("transformer", tok.vocab_size, cfg)
    k = jax.random.key(3)
    policy, rm, value = fam.init_policy(jax.random.fold_in(k, 0)), fam.init_reward(k), fam.init_value(k)
    pcfg = PPOConfig(iterations=3, rollouts=8, response_len=12, minibatches=2, epochs=2, gamma=1.0,
                     gae_lambda=0.95, whiten_rewards=False, kl_coef=0.05, log_every=1, ptx_batch_size=2,
                     optim=PPOConfig().optim.__class__(lr=1e-3))
    state = ppo.init(pcfg, fam, policy, policy, rm, jnp.zeros(tok.vocab_size), value=value).replace(host_reward=host)
    prompts = pack_ids([np.asarray(tok.encode(p["prompt"]), np.int32) for p in train])
    data = {"prompt": jnp.asarray(prompts.ids), "prompt_mask": jnp.asarray(prompts.mask, jnp.float32),
            "ptx_tokens": jnp.zeros((2, 4), jnp.int32), "ptx_mask": jnp.ones((2, 4))}
    return state, data


def test_rl_with_execution_reward_is_bitwise_repeatable_and_resumes_exactly(world):
    train, tok, reward = world
    state, data = _ppo_state(world, reward)
    key = jax.random.key(11)
    run = lambda st, n: run_steps(st, data, key, step_fn=ppo.step, select_fn=ppo.select_batch, num_steps=n)
    whole, metrics = run(state, 3)
    calls = reward.calls
    assert calls >= 1 and reward.programs >= 8  # the executor really ran the completions
    # a fresh host reward object (a new sandbox) gives the same bits
    other = execution.ExecutionReward(tok, train, TASKS)
    try:
        again, _ = run(_ppo_state(world, other)[0], 3)
        part, _ = run(_ppo_state(world, other)[0], 1)
        resumed, _ = run(part, 2)
    finally:
        other.close()
    for got in (again, resumed):
        jax.tree_util.tree_map(np.testing.assert_array_equal, whole.params, got.params)
    assert np.all(np.isfinite(np.asarray(metrics["rm_score"])))
