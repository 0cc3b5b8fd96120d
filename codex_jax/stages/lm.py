"""Language-model stages: pretraining (M0) and supervised fine-tuning (M1).

Both minimise the (label-smoothed) next-token cross-entropy on masked tokens; they
differ only in data (packed corpus rows vs prompt-masked demonstrations).

data  = {"tokens": int32 [N, L], "mask": f32 [N, L],   # loss mask (prompt/pad = 0)
         "denom": f32 [],                               # tokens per batch, averaged over the data
         "label_smoothing": f32 []}
batch = the same with N -> batch_size rows.

Dividing by the data-set constant ``denom`` instead of each batch's own token count
keeps the sum of batch losses over an epoch proportional to the full-data loss, so
minibatch training has the full-data optimum (a per-batch mean would over-weight
tokens in short batches).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config.stages import LMConfig
from codex_jax.core import kernels
from codex_jax.core.keys import to_device
from codex_jax.core.optim import apply_gradients, make_optimizer
from codex_jax.core.state import TrainState, init_state
from codex_jax.errors import ConfigError
from codex_jax.models.family import Family


def init(key: jax.Array, cfg: LMConfig, family: Family, params: Any = None) -> TrainState:
    """Fresh state; ``params`` continues from an earlier stage (SFT starts from M0)."""
    if params is None:
        params = family.init_policy(key)
    return init_state(params, family, cfg, make_optimizer(cfg.optim, cfg.steps))


def smoothing_to_label_smoothing(smoothing: float, num_tokens: float, vocab_size: int) -> float:
    """Additive smoothing a equals label smoothing eps = aV / (N + aV): both give
    pi(v) = (c_v + a) / (N + aV) as the optimum."""
    return smoothing * vocab_size / (num_tokens + smoothing * vocab_size)


# mask-weighted token counts f32 [V] of a padded batch, as one compiled program (eagerly,
# each op would compile on its own)
count_tokens = jax.jit(kernels.batch_count_tokens, static_argnums=2)


def make_data(tokens, mask, batch_size: int, label_smoothing: float = 0.0) -> dict:
    """Device arrays for ``run_steps``; ``denom`` = mean loss tokens per batch."""
    # host arithmetic (float32, like the device's): eager jnp ops here would each compile
    # a program of their own, for every data shape of a run
    host_mask = np.asarray(mask, np.float32)
    denom = np.float32(host_mask.sum(dtype=np.float32)) * np.float32(batch_size) / np.float32(host_mask.shape[0])
    return {
        "tokens": to_device(tokens, np.int32),
        "mask": to_device(host_mask),
        "denom": to_device(denom, np.float32),
        "label_smoothing": to_device(label_smoothing, np.float32),
    }


def heldout_data(enc: Any) -> tuple[dict | None, dict | None]:
    """Evaluation data of the held-out corpus rows and demonstrations of an
    ``EncodedData`` (None where the split held nothing out)."""
    corpus = demos = None
    if enc.heldout_corpus_tokens is not None:
        corpus = make_data(enc.heldout_corpus_tokens, enc.heldout_corpus_mask, 1)
    if enc.heldout_sft_tokens is not None:
        demos = make_data(enc.heldout_sft_tokens, enc.heldout_sft_mask, 1)
    return corpus, demos


def select_batch(state: TrainState, data: dict, key: jax.Array) -> dict:
    """Minibatch number ``state.step`` of the key's epoch-wise shuffle."""
    n = data["tokens"].shape[0]
    idx = kernels.epoch_batch_indices(key, state.step, n, min(state.cfg.batch_size, n))
    return {**data, "tokens": data["tokens"][idx], "mask": data["mask"][idx]}


def loss_fn(params: Any, family: Family, batch: dict) -> tuple[jax.Array, dict]:
    nll = family.token_nll(params, batch["tokens"], batch["label_smoothing"])  # [B, L]
    loss = kernels.masked_sum(nll, batch["mask"]) / batch["denom"]
    return loss, {"loss": loss, "tokens": batch["mask"].sum()}


def step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
    """One optax update.  ``key`` is unused by deterministic models (kept for dropout)."""
    del key
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, state.family, batch)
    params, opt_state, ok = apply_gradients(state.tx, state.params, state.opt_state, grads)
    metrics = {**metrics, "skipped": 1 - ok.astype(jnp.int32)}
    new = state.replace(
        params=params,
        opt_state=opt_state,
        step=state.step + 1,
        skipped=state.skipped + 1 - ok.astype(jnp.int32),
    )
    return new, metrics


@functools.partial(jax.jit, static_argnames=("family", "chunk"))
def evaluate(params: Any, family: Family, data: dict, chunk: int = 128) -> dict:
    """Unsmoothed per-token NLL and perplexity over all rows of ``data`` (in chunks)."""
    nll = kernels.chunked_map(lambda tokens: family.token_nll(params, tokens, 0.0), data["tokens"], chunk)
    mean = kernels.masked_mean(nll, data["mask"])
    return {"nll": mean, "perplexity": jnp.exp(mean)}


def fit_exact(key: jax.Array, cfg: LMConfig, family: Family, data: dict) -> TrainState:
    """Closed-form smoothed MLE from batched token counts (no optimisation)."""
    if family.fit_exact is None:
        raise ConfigError(f"pretrain.mode='exact' needs a closed form; model {family.name!r} has none")
    counts = count_tokens(data["tokens"], data["mask"], family.vocab_size)
    return init(key, cfg, family, params=jax.jit(family.fit_exact)(counts, cfg.smoothing))
