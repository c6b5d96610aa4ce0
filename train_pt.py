"""
Pre-train a Doge model on a memory-mapped uint16 token file, nanoGPT style.

    python train_pt.py config/doge_tiny.py                       # offline quickstart on a laptop CPU
    torchrun --nproc_per_node=8 train_pt.py config/doge_160m.py  # DDP on one node
    torchrun --nproc_per_node=8 train_pt.py config/doge_160m.py --backend=deepspeed --zero_stage=2

The loop is training.train (shared with SFT and DPO); this file says what a pre-training batch, its loss and
its evaluation are.
"""
import os

import numpy as np
import torch
import torch.distributed as dist

import common
import checkpoint as ckpt
from model import Doge, DogeConfig
from tokenizer import load_tokenizer
from training import setup_training, resume_checkpoint, grad_accum_steps, train

MODEL_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "keep_window_size", "tie_word_embeddings",
              "rope_theta", "hidden_dropout", "is_moe", "num_experts", "num_experts_per_tok"]

DEFAULTS = dict(
    # I/O
    out_dir="out/pt",
    init_from="scratch",  # scratch | resume | <ckpt file or out dir> | <Hugging Face dir or hub id>
    data_dir="data/shakespeare",
    data={},  # what `python prepare_data.py <config>` prepares into data_dir: prepare_data.py settings (its defaults if unset)
    eval_interval=200, eval_batches=20, log_interval=10, ckpt_interval=200, keep_last=2,
    # model: DogeConfig fields (vocab_size None = the data's tokenizer's)
    vocab_size=None, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=2048, keep_window_size=2048, tie_word_embeddings=True,
    rope_theta=10000.0, hidden_dropout=0.0, is_moe=False, num_experts=16384, num_experts_per_tok=64,
    # batch: batch_tokens per optimizer step = batch_size x seq_len x processes x gradient accumulation
    batch_size=8, seq_len=512, batch_tokens=32768,
    # optimizer and schedule (the SmallDoge recipe: WSD, warmup 0.1, decay 0.1, wd 0.01, min lr rate 0)
    max_steps=1000, learning_rate=8e-3, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.1, min_lr_rate=0.0,
    decay_shape="linear", weight_decay=0.01, beta1=0.9, beta2=0.95, grad_clip=1.0,
    # system
    seed=1337, device="auto", dtype="auto", compile=False, backend="ddp", zero_stage=2,
)

# -----------------------------------------------------------------------------
# pre-training data: random windows of the token file, chosen by (seed, step) alone

def batch_rows(seed, step, rows_per_step, high, split=0):
    """Start offsets of every row of one optimizer step, across all processes and micro-steps: a pure
    function of (seed, step), so resume is exact and the global batch is the same on any number of
    processes (OLMo's rule). split 0 is training, 1 the fixed validation batches."""
    return np.random.default_rng([seed, split, step]).integers(0, high, size=rows_per_step)

def get_batch(data, starts, seq_len, device):
    rows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

def unigram_loss(train_data, val_data, vocab_size):
    """Cross-entropy on val of the train set's token frequencies (add-one smoothed): the loss of a model that
    ignores context, the bar a trained model's val loss should clear by far."""
    counts = np.bincount(train_data, minlength=vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val_data].mean())

def build_model(cfg, tok, checkpoint):
    """(model, checkpoint to continue, growth note) for a fresh Doge, a nanodoge checkpoint or a published Hugging
    Face Doge; --is_moe=True on a dense one grows it into a CDMoE (checkpoint.fit_model): a fresh optimizer."""
    values = {key: getattr(cfg, key) for key in MODEL_KEYS}
    values["vocab_size"] = values["vocab_size"] or tok.vocab_size
    if cfg.init_from == "scratch":
        return Doge(DogeConfig(**values)), None, None
    if checkpoint is not None:
        model = Doge(DogeConfig(**checkpoint["model_config"]))
        ckpt.load_state_dict_checked(model, checkpoint["model"], cfg.init_from)
    else:  # a Hugging Face model has its own shape: only what the run sets away from the defaults is checked
        model = ckpt.load_model(cfg.init_from, "cpu")[0]
        values = {key: getattr(cfg, key) for key in MODEL_KEYS if getattr(cfg, key) != DEFAULTS[key]}
    model, grown = ckpt.fit_model(model, values, cfg.init_from)
    return model, None if grown else checkpoint, grown

def main(argv=None):
    cfg = common.load_config(DEFAULTS, argv)
    run = setup_training(cfg)
    common.require_prepared(cfg.data_dir, argv, offline_dir="data/shakespeare")
    tok = load_tokenizer(cfg.data_dir)
    train_data = common.read_array(os.path.join(cfg.data_dir, "train.bin"))
    val_data = common.read_array(os.path.join(cfg.data_dir, "val.bin"))
    for name, data in (("train.bin", train_data), ("val.bin", val_data)):
        if len(data) <= cfg.seq_len + 1:
            raise ValueError(f"{cfg.data_dir}/{name} holds {len(data)} tokens, fewer than seq_len={cfg.seq_len}")
    checkpoint = resume_checkpoint(cfg)
    if checkpoint is None and ckpt.is_checkpoint(cfg.init_from):
        # continue another run with its optimizer and step, e.g. a stable-phase WSD checkpoint on new data
        # with a new max_steps, so that only the final decay is new
        checkpoint = ckpt.load_checkpoint(cfg.init_from)
    model, checkpoint, grown = build_model(cfg, tok, checkpoint)
    model = model.to(run.device)
    if grown and run.master:
        print(grown)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the data's tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: set vocab_size >= {tok.vocab_size}")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    grad_accum = grad_accum_steps(cfg.batch_tokens, cfg.batch_size * cfg.seq_len, run.world_size)
    rows_per_step = cfg.batch_size * grad_accum * run.world_size
    unigram = unigram_loss(train_data, val_data, model.config.vocab_size)
    if run.master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{n_params / 1e6:.2f}M parameters | {cfg.batch_tokens:,} tokens per step = "
              f"{cfg.batch_size} x {cfg.seq_len} x {run.world_size} processes x {grad_accum} accumulation | "
              f"{run.device} {run.dtype} | train {len(train_data):,} tokens | unigram baseline val loss "
              f"{unigram:.3f}")

    def batch_loss(model, step, micro_step):
        starts = batch_rows(cfg.seed, step, rows_per_step, len(train_data) - cfg.seq_len - 1)
        first = (micro_step * run.world_size + run.rank) * cfg.batch_size
        x, y = get_batch(train_data, starts[first:first + cfg.batch_size], cfg.seq_len, run.device)
        _, loss = model(x, y, cross_entropy=run.cross_entropy)
        return loss, {}

    @torch.no_grad()
    def evaluate(model):
        model.eval()
        starts = batch_rows(cfg.seed, 0, cfg.eval_batches * cfg.batch_size, len(val_data) - cfg.seq_len - 1, split=1)
        losses = []
        for i in range(cfg.eval_batches):
            x, y = get_batch(val_data, starts[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg.seq_len, run.device)
            with run.autocast():
                losses.append(model(x, y)[1].item())
        model.train()
        return dict(val_loss=sum(losses) / len(losses), unigram_val_loss=unigram)  # the bar to clear, beside it

    flops_per_step = model.flops_per_token(cfg.seq_len) * cfg.batch_tokens
    train(cfg, run, model, tok, batch_loss, evaluate, cfg.batch_tokens, flops_per_step, grad_accum, checkpoint,
          stage="pt")
    if run.world_size > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    common.run(main)
