"""Peer benchmark: Hugging Face TRL (PyTorch, CPU) on the same work as ``bench_transformer.py``.

    # PPO: TRL 1.12.0 (the last release with PPOTrainer, at trl.experimental.ppo)
    .peer-venv-ppo/bin/python benchmarks/peers/trl_bench.py --trainer ppo [--iterations N] [--dtype fp32|bf16]
    # GRPO: TRL 1.16.0
    .peer-venv-grpo/bin/python benchmarks/peers/trl_bench.py --trainer grpo [--iterations N] [--threads N] [--quick]

Prints ONE JSON line on stdout (``iteration_s`` = median seconds per iteration); trainer
logs and warnings go to stderr.  Setup and the full mapping: benchmarks/peers/README.md.

The work (reference config; ``--quick`` shrinks every number):
  * random-init GPT-2 policy (4 layers, d 256, 4 heads, MLP 1024, vocab 8192, 256 positions,
    tied LM head, all dropout 0); the reference is a copy of it; value (PPO only) and reward
    networks are GPT-2 trunks of the same shape with a scalar head (GPT2ForSequenceClassification,
    num_labels=1).  Nothing is downloaded (HF_HUB_OFFLINE=1); the tokenizer is built here.
  * prompts: random token ids 4..V-1, all exactly 64 tokens; responses exactly 64 tokens,
    sampled at temperature 1 with no top-k / top-p (checked on every ``generate`` call).
  * PPO iteration = one call of PPOTrainer's batch loop body: generation of 32 responses, the
    scoring passes (policy log-probs from the generation scores, reference, value, reward),
    GAE, then 4 epochs x 4 minibatches of 8 (16 Adam steps on policy + value), its metrics.
  * GRPO iteration = 16 optimizer steps of GRPOTrainer = one generation of 8 prompts x 4
    completions, old-policy / reference log-prob passes, the reward network, then 4
    iterations (num_iterations) x 4 slices of 8 (steps_per_generation).
  * timing: a TrainerCallback stamps time.perf_counter() at on_train_begin and each
    on_step_end; the first iteration is the warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

FULL = {"layers": 4, "d_model": 256, "heads": 4, "mlp": 1024, "vocab": 8192, "positions": 256,
        "prompt_len": 64, "response_len": 64, "rollouts": 32, "epochs": 4, "minibatches": 4}
QUICK = {"layers": 2, "d_model": 128, "heads": 4, "mlp": 512, "vocab": 2048, "positions": 64,
         "prompt_len": 16, "response_len": 16, "rollouts": 8, "epochs": 2, "minibatches": 2}
GROUP_SIZE = 4  # GRPO: rollouts = rollouts / 4 prompts x 4 completions
LR = 1e-5
PAD, BOS, EOS, UNK = 0, 1, 2, 3  # ids 0..3 are the special tokens; prompts use ids 4..V-1
FIRST_CHAR = 0x4E00  # token id i >= 4 is the single character chr(FIRST_CHAR + i)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tokenizer + models
def make_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """An offline tokenizer in which every id 4..V-1 is one character: text <-> ids round-trip
    exactly, and prompt text + completion text re-tokenizes to prompt ids + completion ids
    (GRPOTrainer scores the reward network on re-tokenized text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    table = {s: i for i, s in enumerate(specials)}
    table.update({chr(FIRST_CHAR + i): i for i in range(len(specials), vocab)})
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")
    fast.model_max_length = 1 << 20
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id, len(fast)) == (PAD, BOS, EOS, vocab)
    return fast


def ids_to_text(ids) -> str:
    return "".join(chr(FIRST_CHAR + int(i)) for i in ids)


def gpt2_config(c: dict) -> GPT2Config:
    return GPT2Config(vocab_size=c["vocab"], n_positions=c["positions"], n_embd=c["d_model"],
                      n_layer=c["layers"], n_head=c["heads"], n_inner=c["mlp"],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                      tie_word_embeddings=True, num_labels=1,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def make_models(c: dict, seed: int):
    cfg = gpt2_config(c)
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(cfg)
    value = GPT2ForSequenceClassification(cfg)
    reward = GPT2ForSequenceClassification(cfg)
    for m in (policy, value, reward):
        m.eval()  # PPOTrainer / Trainer switch the trained modules to train(); dropout is 0 anyway
    return policy, value, reward


def check_generation_length(model, response_len: int, seen: list):
    """Wraps model.generate: every call must return exactly ``response_len`` new tokens."""
    original = model.generate

    def generate(*a, **kw):
        out = original(*a, **kw)
        seq = out.sequences if hasattr(out, "sequences") else out
        prompt = kw["input_ids"] if "input_ids" in kw else a[0]
        new = seq.shape[1] - prompt.shape[1]
        if new != response_len:
            raise SystemExit(f"generate returned {new} new tokens, expected exactly {response_len}")
        seen.append(int(seq.shape[0]))
        return out

    model.generate = generate


def record_reward_inputs(reward, seen: list):
    """Records (rows, length) of every input to the reward network's trunk."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(tuple(ids.shape))
    reward.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def check_reward_inputs(seen: list, c: dict, iters: int):
    rows = sum(r for r, _ in seen)
    assert rows == c["rollouts"] * iters and all(n == c["prompt_len"] + c["response_len"] for _, n in seen), seen


# --------------------------------------------------------------------------- timing
class StepTimer(TrainerCallback):
    def __init__(self):
        self.marks: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kw):
        self.marks.append(time.perf_counter())


def iteration_times(marks: list[float], steps_per_iteration: int) -> list[float]:
    edges = marks[::steps_per_iteration]
    return [b - a for a, b in zip(edges, edges[1:])]


def common_args(a, outdir: str) -> dict:
    return dict(output_dir=outdir, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, gradient_accumulation_steps=1,
                gradient_checkpointing=False, activation_checkpointing=False,
                bf16=a.dtype == "bf16", fp16=False, use_cpu=True, report_to="none",
                logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, seed=a.seed, push_to_hub=False)


# --------------------------------------------------------------------------- PPO
def run_ppo(a, c: dict, outdir: str) -> tuple[list[float], dict]:
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    b, iters = c["rollouts"], a.iterations + 1
    tok = make_tokenizer(c["vocab"])
    policy, value, reward = make_models(c, a.seed)
    ref = GPT2LMHeadModel(policy.config)
    ref.load_state_dict(policy.state_dict())  # the frozen reference: a copy of the policy
    ref.eval()
    rng = np.random.default_rng(1)
    prompts = rng.integers(4, c["vocab"], size=(b * iters, c["prompt_len"])).tolist()
    data = Dataset.from_dict({"input_ids": prompts})
    args = PPOConfig(
        **common_args(a, outdir),
        # batch = per_device_train_batch_size * gradient_accumulation_steps = 32 rollouts; each of the
        # num_mini_batches=4 minibatches (8 rows) is one micro-batch and one Adam step
        per_device_train_batch_size=b, num_mini_batches=c["minibatches"], num_ppo_epochs=c["epochs"],
        local_rollout_forward_batch_size=b, total_episodes=b * iters, response_length=c["response_len"],
        stop_token=None, stop_token_id=None, temperature=1.0, missing_eos_penalty=None,
        kl_coef=1.0, kl_estimator="k1", cliprange=0.2, vf_coef=0.1, cliprange_value=0.2,
        gamma=1.0, lam=0.95, whiten_rewards=False, num_sample_generations=0)
    timer = StepTimer()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=data, value_model=value, callbacks=[timer])
    assert (args.batch_size, args.mini_batch_size, args.local_mini_batch_size) == (
        b, b // c["minibatches"], b // c["minibatches"]), vars(args)
    seen, scored = [], []
    check_generation_length(policy, c["response_len"], seen)
    record_reward_inputs(reward, scored)
    train(trainer, a)
    assert len(seen) == iters, seen
    check_reward_inputs(scored, c, iters)
    mapping = {"trainer": "trl.experimental.ppo.PPOTrainer", "attn_implementation": policy.config._attn_implementation,
               "per_device_train_batch_size": b, "gradient_accumulation_steps": 1,
               "num_mini_batches": c["minibatches"], "num_ppo_epochs": c["epochs"],
               "local_rollout_forward_batch_size": b, "total_episodes": b * iters,
               "response_length": c["response_len"], "stop_token_id": None, "temperature": 1.0,
               "kl_coef": 1.0, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95,
               "optimizer_steps_per_iteration": c["epochs"] * c["minibatches"]}
    return iteration_times(timer.marks, 1), mapping


# --------------------------------------------------------------------------- GRPO
def run_grpo(a, c: dict, outdir: str) -> tuple[list[float], dict]:
    from trl import GRPOConfig, GRPOTrainer

    b, iters = c["rollouts"], a.iterations + 1
    prompts_per_gen, mb = b // GROUP_SIZE, b // c["minibatches"]
    steps = c["epochs"] * c["minibatches"]  # optimizer steps per generation
    tok = make_tokenizer(c["vocab"])
    policy, _, reward = make_models(c, a.seed)
    # GRPOTrainer builds its reference with from_pretrained(policy.config._name_or_path): save the
    # random-init policy locally and load it back, so the reference is an exact copy of it
    model_dir = os.path.join(outdir, "policy")
    policy.save_pretrained(model_dir)
    policy = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32)
    rng = np.random.default_rng(1)
    prompts = [ids_to_text(r) for r in rng.integers(4, c["vocab"], size=(prompts_per_gen * iters, c["prompt_len"]))]
    assert all(len(tok(p)["input_ids"]) == c["prompt_len"] for p in prompts)
    data = Dataset.from_dict({"prompt": prompts})
    args = GRPOConfig(
        **common_args(a, outdir),
        per_device_train_batch_size=mb, steps_per_generation=c["minibatches"], num_generations=GROUP_SIZE,
        num_iterations=c["epochs"], max_steps=steps * iters, max_completion_length=c["response_len"],
        generation_kwargs={"min_new_tokens": c["response_len"]}, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.04, loss_type="grpo", scale_rewards="group", epsilon=0.2, use_vllm=False,
        disable_dropout=True, log_completions=False, shuffle_dataset=True)
    assert args.generation_batch_size == b and args.steps_per_generation == c["minibatches"], vars(args)
    timer = StepTimer()
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=data,
                          processing_class=tok, reward_processing_classes=[tok], callbacks=[timer])
    assert trainer.ref_model is not None
    seen, scored = [], []
    check_generation_length(trainer.accelerator.unwrap_model(trainer.model), c["response_len"], seen)
    record_reward_inputs(reward, scored)
    train(trainer, a)
    assert len(seen) == iters and all(s == b for s in seen), seen
    check_reward_inputs(scored, c, iters)
    assert trainer.state.global_step == steps * iters, trainer.state.global_step
    mapping = {"trainer": "trl.GRPOTrainer", "attn_implementation": policy.config._attn_implementation,
               "per_device_train_batch_size": mb, "gradient_accumulation_steps": 1,
               "steps_per_generation": c["minibatches"], "generation_batch_size": args.generation_batch_size,
               "num_generations": GROUP_SIZE, "num_iterations": c["epochs"], "max_steps": steps * iters,
               "max_completion_length": c["response_len"],
               "generation_kwargs": {"min_new_tokens": c["response_len"]}, "temperature": 1.0,
               "top_k": 0, "top_p": 1.0, "beta": 0.04, "loss_type": "grpo", "scale_rewards": "group",
               "use_vllm": False, "optimizer_steps_per_iteration": steps}
    return iteration_times(timer.marks, steps), mapping


def train(trainer, a):
    if a.dtype == "bf16":  # activations in bf16 everywhere (generation and scoring too); fp32 weights + Adam
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trainer.train()
    else:
        trainer.train()


# --------------------------------------------------------------------------- main
def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainer", choices=("ppo", "grpo"), required=True)
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up (default 3)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="tiny config for smoke tests")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.iterations < 1:
        ap.error("--iterations must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    c = dict(QUICK if a.quick else FULL)
    assert c["rollouts"] % GROUP_SIZE == 0 and c["rollouts"] % c["minibatches"] == 0

    outdir = tempfile.mkdtemp(prefix="trl-peer-bench-")
    stdout = sys.stdout
    sys.stdout = sys.stderr  # trainer prints ("===training policy===", ...) go to stderr
    try:
        run = run_ppo if a.trainer == "ppo" else run_grpo
        times, mapping = run(a, c, outdir)
    finally:
        sys.stdout = stdout
        shutil.rmtree(outdir, ignore_errors=True)
    assert len(times) == a.iterations + 1, times
    timed = times[1:]
    out = {
        "name": "TRL PPOTrainer" if a.trainer == "ppo" else "TRL GRPOTrainer",
        "library": "trl", "trl_version": trl.__version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "dtype": a.dtype,
        "bf16_mode": ("torch.autocast('cpu', torch.bfloat16) around trainer.train() (fp32 weights and Adam), "
                      "plus the config's bf16=True, use_cpu=True") if a.dtype == "bf16" else None,
        "threads": torch.get_num_threads(),
        "iteration_s": statistics.median(timed), "iteration_s_all": timed, "warmup_s": times[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": {**c, "quick": a.quick, "group_size": GROUP_SIZE if a.trainer == "grpo" else None,
                   "minibatch_size": c["rollouts"] // c["minibatches"], "lr": LR, "iterations": a.iterations},
        "trl_args": mapping,
        "cpu": cpu_name(),
        "generated_tokens_per_iteration": c["rollouts"] * c["response_len"],
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
