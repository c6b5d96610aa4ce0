"""
Supervised fine-tuning: next-token cross-entropy on what the assistant says, and nothing else.

    python train_sft.py config/sft_tiny.py                       # offline quickstart: the arithmetic curriculum
    python train_sft.py config/sft_doge_20m.py                   # instruction tuning (smoltalk)
    torchrun --nproc_per_node=8 train_sft.py config/sft_reasoning_doge_20m.py   # reasoning distillation

The data is what prepare_data.py writes: chat-rendered conversations (ragged token arrays) and the loss mask
the chat renderer made with them, 1 exactly on assistant content and its <|im_end|>. A micro-batch is right-
padded to its longest conversation: under the causal mask no real token ever attends to a pad, and pads and
user/system tokens are never targets (-1). The loop (schedule, accumulation, DDP/DeepSpeed, checkpoints, exact
resume) is train_pt.train; this file only says what a batch and its loss are, and how the model is evaluated.
"""
import os
import json
import functools

import numpy as np
import torch
import torch.distributed as dist

import common
from tokenizer import load_tokenizer
from train_pt import setup_training, train

DEFAULTS = dict(
    # I/O
    out_dir="out/sft",
    init_from="out/pt",  # resume | <nanodoge out dir or ckpt file> | <Hugging Face dir or hub id>
    data_dir="data/arithmetic",  # sft_train.*, sft_val.* (and test.jsonl for answer accuracy, if there)
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
    seed=1337, device="auto", dtype="bfloat16", compile=False, backend="ddp", zero_stage=2,
)

# -----------------------------------------------------------------------------
# ragged examples -> padded batches (train_dpo.py uses these too)

@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)

def step_indices(seed, step, examples_per_step, n):
    """The examples of one optimizer step, across all processes and micro-steps: a pure function of
    (seed, step), so a resumed run (on any number of processes) sees what the uninterrupted one would.
    Epochs are reshuffles: example position p is epoch p // n, slot p % n of that epoch's permutation."""
    positions = step * examples_per_step + np.arange(examples_per_step)
    epochs, slots = np.divmod(positions, n)
    return np.array([epoch_order(seed, int(e), n)[s] for e, s in zip(epochs, slots)], dtype=np.int64)

def micro_batch(indices, micro_step, rank, world_size, batch_size):
    """This process's share of a step's examples for one micro-step."""
    first = (micro_step * world_size + rank) * batch_size
    return indices[first:first + batch_size]

def get_examples(ragged, indices, max_len):
    """(ids, mask) numpy pairs of the examples, each truncated to its first max_len tokens."""
    tokens, mask, offsets = ragged
    return [(tokens[offsets[i]:offsets[i + 1]][:max_len], mask[offsets[i]:offsets[i + 1]][:max_len])
            for i in indices]

def pad_examples(examples, pad_id):
    """ids and mask LongTensors [B, T], right-padded to the longest example; the mask is 0 on pads."""
    length = max(len(ids) for ids, _ in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), length), dtype=np.int64)
    for row, (example_ids, example_mask) in enumerate(examples):
        ids[row, :len(example_ids)] = example_ids
        mask[row, :len(example_mask)] = example_mask
    return torch.from_numpy(ids), torch.from_numpy(mask)

def target_counts(ragged, max_len):
    """Per example, how many loss tokens it has after truncation to max_len (position 0 is never a target)."""
    _, mask, offsets = ragged
    ends = np.minimum(offsets[1:], offsets[:-1] + max_len)
    return np.array([int(mask[start + 1:end].sum()) for start, end in zip(offsets[:-1], ends)], dtype=np.int64)

def sft_batch(ragged, indices, max_len, pad_id, device):
    """Inputs x and targets y [B, T-1]: y[t] = x[t+1] where the renderer's mask is 1, else -1 (ignored)."""
    ids, mask = pad_examples(get_examples(ragged, indices, max_len), pad_id)
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    return x.to(device), y.to(device)

def check_data(tok, model, data_dir, ragged_sets, seq_len):
    """One-line errors for data that cannot train this model (another tokenizer, ids beyond its vocabulary)."""
    data_tok = load_tokenizer(data_dir)
    probe = "<think>12+9=21</think><answer>21</answer> Hello, world!"
    if (data_tok.vocab_size, data_tok.special_ids, data_tok.encode(probe)) != \
            (tok.vocab_size, tok.special_ids, tok.encode(probe)):
        raise ValueError(f"{data_dir} was tokenized with another tokenizer than the model's: re-run prepare_data.py "
                         f"with --tokenizer=<the pre-training data dir> and --out_dir=<somewhere new>")
    for name, (tokens, _, _) in ragged_sets.items():
        if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
            raise ValueError(f"{data_dir}/{name} holds token id {int(tokens.max())} but the model's vocabulary "
                             f"has {model.config.vocab_size}: the data does not belong to this model")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}: lower seq_len")

def steps_per_run(cfg, n_examples, examples_per_step):
    """max_steps, or enough steps for `epochs` passes over n_examples."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.epochs <= 0:
        raise ValueError(f"epochs={cfg.epochs}: set epochs > 0 or max_steps > 0")
    return max(1, round(cfg.epochs * n_examples / examples_per_step))

def examples_per_micro_step(cfg, world_size):
    """(examples per optimizer step, gradient accumulation steps), from the global batch in examples."""
    per_pass = cfg.batch_size * world_size
    if cfg.batch_examples % per_pass:
        raise ValueError(f"batch_examples={cfg.batch_examples} is not a multiple of batch_size x processes = "
                         f"{per_pass}: change one of them")
    return cfg.batch_examples, cfg.batch_examples // per_pass

def load_policy(cfg, device):
    """(model, tokenizer, checkpoint to resume or None): init_from=resume continues this run from out_dir;
    anything else starts a new run (step 0, fresh optimizer) from the weights it names."""
    source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    if cfg.init_from == "resume" and not common.checkpoint_paths(cfg.out_dir):
        raise FileNotFoundError(f"init_from=resume but {cfg.out_dir} holds no complete checkpoint")
    model, tok, checkpoint = common.load_model(source, device)
    return model, tok, checkpoint if cfg.init_from == "resume" else None

def read_jsonl(path, limit):
    with open(path) as f:
        return [json.loads(line) for line, _ in zip(f, range(limit))]

# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.load_config(DEFAULTS, argv)
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
        _, loss = model(x, y)  # mean over this micro-batch's assistant tokens
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
                metrics["accuracy"], completions = common.evaluate_accuracy(model, tok, test_examples,
                                                                            cfg.max_new_tokens)
            if run.master:
                print(f"sample answer: {completions[0]!r}")
        model.train()
        return metrics

    if checkpoint is None and run.master:
        print("before SFT: " + " | ".join(f"{k} {v:.4f}" for k, v in evaluate(model).items()), flush=True)
    train(cfg, run, model, tok, batch_loss, evaluate, tokens_per_step, grad_accum, checkpoint, stage="sft")
    if run.world_size > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    common.run(main)
