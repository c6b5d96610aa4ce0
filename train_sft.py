"""
Supervised fine-tuning: next-token cross-entropy on what the assistant says, and nothing else.

    python train_sft.py config/sft_tiny.py                       # offline quickstart: the arithmetic curriculum
    python train_sft.py config/sft_doge_20m.py                   # instruction tuning (smoltalk)
    torchrun --nproc_per_node=8 train_sft.py config/sft_reasoning_doge_20m.py   # reasoning distillation

The data is what prepare_data.py writes: chat-rendered conversations (ragged token arrays) and the loss mask
the chat renderer made with them, 1 exactly on assistant content and its <|im_end|>. A micro-batch is right-
padded to its longest conversation: under the causal mask no real token ever attends to a pad, and pads and
user/system tokens are never targets (-1). The loop (schedule, accumulation, DDP/DeepSpeed, checkpoints, exact
resume) is training.train; this file only says what a batch and its loss are, and how the model is evaluated.
"""
import os
import json

import numpy as np
import torch
import torch.distributed as dist

import common
from training import setup_training, train
from post_training import (step_indices, micro_batch, get_examples, pad_examples, target_counts, check_data,
                           steps_per_run, examples_per_micro_step, load_policy, evaluate_accuracy)

DEFAULTS = dict(
    # I/O
    out_dir="out/sft",
    init_from="out/pt",  # resume | <nanodoge out dir or ckpt file> | <Hugging Face dir or hub id>
    data_dir="data/arithmetic",  # sft_train.*, sft_val.* (and test.jsonl for answer accuracy, if there)
    data={},  # what `python prepare_data.py <config>` prepares into data_dir: prepare_data.py settings (its defaults if unset)
    eval_interval=100, log_interval=10, ckpt_interval=100, keep_last=2,
    eval_examples=200,  # val loss and answer accuracy on (at most) this many held-out examples
    max_new_tokens=128,  # greedy answer length for the accuracy check
    # batch: batch_examples conversations per optimizer step = batch_size x processes x gradient accumulation;
    # a conversation longer than seq_len is truncated to its first seq_len tokens
    batch_size=8, batch_examples=64, seq_len=2048,
    # optimizer and schedule; max_steps=-1 means `epochs` passes over the data (each one a fresh shuffle)
    epochs=2.0, max_steps=-1, learning_rate=8e-4, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.1,
    min_lr_rate=0.0, decay_shape="linear", weight_decay=0.01, beta1=0.9, beta2=0.95, grad_clip=1.0,
    # system
    seed=1337, device="auto", dtype="auto", compile=False, backend="ddp", zero_stage=2,
)

# -----------------------------------------------------------------------------
# batches and data

def sft_batch(ragged, indices, max_len, pad_id, device):
    """Inputs x and targets y [B, T-1]: y[t] = x[t+1] where the renderer's mask is 1, else -1 (ignored)."""
    ids, mask = pad_examples(get_examples(ragged, indices, max_len), pad_id)
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    return x.to(device), y.to(device)

def read_jsonl(path, limit):
    with open(path) as f:
        return [json.loads(line) for line, _ in zip(f, range(limit))]

# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.load_config(DEFAULTS, argv)
    common.require_prepared(cfg.data_dir, argv, offline_dir="data/arithmetic")
    run = setup_training(cfg)
    train_set = common.read_ragged(os.path.join(cfg.data_dir, "sft_train"))
    val_set = common.read_ragged(os.path.join(cfg.data_dir, "sft_val"))
    model, tok, checkpoint = load_policy(cfg, run.device)
    check_data(tok, model, cfg.data_dir, {"sft_train": train_set, "sft_val": val_set}, cfg.seq_len)
    test_path = os.path.join(cfg.data_dir, "test.jsonl")
    test_examples = read_jsonl(test_path, cfg.eval_examples) if os.path.exists(test_path) else []

    # examples whose loss tokens all fall beyond seq_len teach nothing: leave them out
    train_counts = target_counts(train_set, cfg.seq_len)
    usable = np.flatnonzero(train_counts > 0)
    val_counts = target_counts(val_set, cfg.seq_len)
    val_usable = np.flatnonzero(val_counts > 0)[:cfg.eval_examples]
    if len(usable) == 0 or len(val_usable) == 0:
        raise ValueError(f"no conversation in {cfg.data_dir} has an assistant token within seq_len={cfg.seq_len}")
    examples_per_step, grad_accum = examples_per_micro_step(cfg, run.world_size)
    cfg.max_steps = steps_per_run(cfg, len(usable), examples_per_step)
    lengths = np.minimum(np.diff(train_set[2]), cfg.seq_len)[usable]
    tokens_per_step = int(lengths.mean() * examples_per_step)
    scored = train_counts[usable].mean() / lengths.mean()  # the share of tokens that pass the output head
    flops_per_step = model.flops_per_token(lengths.mean(), scored) * tokens_per_step
    pad_id = tok.eos_id  # any id: pads are never targets and come after every real token
    if run.master:
        truncated = int((np.diff(train_set[2]) > cfg.seq_len).sum())
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(usable):,} conversations "
              f"({truncated:,} truncated to seq_len={cfg.seq_len}, {len(train_counts) - len(usable):,} left out: "
              f"no assistant token left) | {cfg.max_steps} steps of {examples_per_step} = {cfg.batch_size} x "
              f"{run.world_size} processes x {grad_accum} accumulation = {cfg.max_steps * examples_per_step / len(usable):.2f} "
              f"epochs | {run.device} {run.dtype}")

    def batch_loss(model, step, micro_step):
        indices = usable[step_indices(cfg.seed, step, examples_per_step, len(usable))]
        mine = micro_batch(indices, micro_step, run.rank, run.world_size, cfg.batch_size)
        x, y = sft_batch(train_set, mine, cfg.seq_len, pad_id, run.device)
        _, loss = model(x, y, cross_entropy=run.cross_entropy)  # mean over this micro-batch's assistant tokens
        # Re-weight so the step's gradient is the mean over every assistant token of the global batch, however
        # it is split into micro-batches and processes (the loop divides by grad_accum, DDP averages ranks):
        # a micro-batch of short answers must not count as much as one of long answers.
        share = float(train_counts[mine].sum() / train_counts[indices].sum())
        return loss * (share * grad_accum * run.world_size), {}

    @torch.no_grad()
    def evaluate(model):
        model.eval()
        loss_sum = 0.0
        for first in range(0, len(val_usable), cfg.batch_size):
            chunk = val_usable[first:first + cfg.batch_size]
            x, y = sft_batch(val_set, chunk, cfg.seq_len, pad_id, run.device)
            with run.autocast():
                loss_sum += model(x, y)[1].item() * val_counts[chunk].sum()
        metrics = dict(val_loss=loss_sum / float(val_counts[val_usable].sum()))
        if test_examples:  # greedy, exact match inside <answer> (the arithmetic curriculum's test set)
            with run.autocast():
                metrics["accuracy"], completions = evaluate_accuracy(model, tok, test_examples,
                                                                            cfg.max_new_tokens)
            if run.master:
                print(f"sample answer: {completions[0]!r}")
        model.train()
        return metrics

    train(cfg, run, model, tok, batch_loss, evaluate, tokens_per_step, flops_per_step, grad_accum, checkpoint,
          stage="sft")
    if run.world_size > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    common.run(main)
