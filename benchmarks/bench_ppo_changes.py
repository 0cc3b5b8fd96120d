"""What two changes to the PPO iteration bought, each as a PAIRED comparison in one process;
prints ONE JSON line.

    python benchmarks/bench_ppo_changes.py [--pairs N] [--quick]

On a shared or virtualised 2-core machine whole-iteration times drift by 10-30% between
runs, more than either change; so each change is measured here by alternating the old and
the new computation call by call in the same process (A, B, A, B, ...) and reporting the
median of the per-pair ratios old / new (> 1: the change is faster), on bench_transformer's
reference recipe (``--quick``: its quick recipe):

  * ``old_logprobs_from_sampler``: a rollout's sampling + old log-probs, as
    ``generate.sample`` then a teacher-forced ``transformer.response_logprobs`` pass (old)
    vs ``generate.sample_with_logprobs`` (new), 32 rollouts of 64 + 64 tokens;
  * ``last_block_on_read_rows``: one PPO minibatch gradient's model work - policy log-probs
    through the tied head and critic values, forward + backward, 8 rows - with the full
    trunk and a gather of the read rows (old) vs ``hidden_states(read_idx=...)`` (new).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_transformer as bt  # noqa: E402

from codex_jax.config import TransformerConfig  # noqa: E402
from codex_jax.core import kernels  # noqa: E402
from codex_jax.models import generate  # noqa: E402
from codex_jax.models import transformer as tf  # noqa: E402


def paired(old, new, pairs: int) -> dict:
    """Alternates old() and new() (after one warm-up call each); per-pair ratios."""
    for fn in (old, new):
        jax.block_until_ready(fn())
    t_old, t_new, ratios = [], [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        jax.block_until_ready(old())
        t1 = time.perf_counter()
        jax.block_until_ready(new())
        t2 = time.perf_counter()
        t_old.append(t1 - t0)
        t_new.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return {"old_s": statistics.median(t_old), "new_s": statistics.median(t_new),
            "old_over_new": statistics.median(ratios), "ratio_quartiles": statistics.quantiles(ratios, n=4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=25)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    c = bt.QUICK if args.quick else bt.FULL
    cfg, vocab = TransformerConfig(**c["model"]), c["vocab"]
    _, pcfg, state, data = bt.make_ppo(c, cfg)
    policy, value = state.params["policy"], state.params["value"]
    prompt, pmask, t = data["prompt"], data["prompt_mask"], c["response_len"]
    key = jax.random.key(3)

    @jax.jit
    def sample_then_score(params):
        response = generate.sample(cfg, vocab, params, key, prompt, pmask, t, 1.0)
        return response, tf.response_logprobs(cfg, vocab, params, prompt, pmask, response, 1.0)

    @jax.jit
    def sample_with_logprobs(params):
        return generate.sample_with_logprobs(cfg, vocab, params, key, prompt, pmask, t, 1.0)

    rows = c["rollouts"] // c["minibatches"]
    response = sample_with_logprobs(policy)[0][:rows]
    tokens, valid, positions, out_idx = tf.sequence(prompt[:rows], pmask[:rows], response)
    adv = jax.random.normal(jax.random.key(4), response.shape)
    critic = tf.make_model(cfg, vocab, True)

    def model_work(params, read: bool):
        pol, val = params
        if read:
            h = tf.hidden_states(cfg, vocab, pol, tokens, valid, positions, read_idx=out_idx)
            hv = tf.hidden_states(cfg, vocab, val, tokens, valid, positions, True, read_idx=out_idx)
        else:
            take = lambda x: jnp.take_along_axis(x, out_idx[..., None], axis=1)  # noqa: E731
            h = take(tf.hidden_states(cfg, vocab, pol, tokens, valid, positions))
            hv = take(tf.hidden_states(cfg, vocab, val, tokens, valid, positions, True))
        nll = kernels.tied_head_nll(h.reshape(-1, cfg.d_model), pol["params"]["embed"]["embedding"],
                                    response.reshape(-1), jnp.zeros((), jnp.float32))
        v = critic.apply(val, hv, method=tf.Transformer.score)
        return jnp.sum(adv.reshape(-1) * nll) + 0.5 * jnp.sum(jnp.square(v))

    grad_full = jax.jit(jax.grad(lambda prm: model_work(prm, False)))
    grad_read = jax.jit(jax.grad(lambda prm: model_work(prm, True)))
    result = {
        "bench": "ppo_changes", "recipe": "quick" if args.quick else "reference", "cpu": bt.cpu_model(),
        "pairs": args.pairs,
        "old_logprobs_from_sampler": paired(lambda: sample_then_score(policy), lambda: sample_with_logprobs(policy),
                                            args.pairs),
        "last_block_on_read_rows": paired(lambda: grad_full((policy, value)), lambda: grad_read((policy, value)),
                                          args.pairs),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
