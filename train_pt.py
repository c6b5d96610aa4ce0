"""
Pre-train a Doge model on a memory-mapped uint16 token file, nanoGPT style.

    python train_pt.py config/doge_tiny.py                       # offline quickstart on a laptop CPU
    torchrun --nproc_per_node=8 train_pt.py config/doge_160m.py  # DDP on one node
    torchrun --nproc_per_node=8 train_pt.py config/doge_160m.py --backend=deepspeed --zero_stage=2

main() is the whole run in execution order, its loop written out as nanoGPT's train.py: each step sets its
learning rate, runs the micro-steps (batch, autocast forward and loss, backward; DDP all-reduces in the last),
unscales and clips the gradients, steps the optimizer and zeroes them, then logs, evaluates and saves; with
backend=deepspeed the engine's own calls take over backward and step, written where they run.
nanodoge/training.py holds the tools it calls (optimizer, schedule, the wrapped model, checkpoint state, log).
"""
import os
import time
import contextlib

import numpy as np
import torch
import torch.distributed as dist

from nanodoge import checkpoint as ckpt, devices, files, settings, training
from model import Doge, DogeConfig
from nanodoge.tokenizer import load_tokenizer

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
    decay_shape="linear", weight_decay=0.01, beta1=0.9, beta2=0.95, adam_eps=1e-8, grad_clip=1.0,
    # system
    seed=1337, device="auto", dtype="auto", backend="ddp", zero_stage=2,
    compile="auto",  # auto | True | False: auto compiles where it is faster (training.resolve_compile)
    deterministic="auto",  # auto | True | False: auto is on for compiled training on a CPU (training.resolve_deterministic)
    dry_run=False,  # True: print what the run will take (tokens, FLOPs, memory, time) and train nothing
)

# -----------------------------------------------------------------------------
# pre-training data: random windows of the token file, chosen by (seed, step) alone

def batch_rows(seed, step, rows_per_step, high, split=0):
    """Start offsets of every row of one optimizer step, across all processes and micro-steps: a pure
    function of (seed, step), so resume is exact and the global batch is the same on any number of
    processes (OLMo's rule). split 0 is training, 1 the fixed validation batches."""
    return np.random.default_rng([seed, split, step]).integers(0, high, size=rows_per_step)

def get_batch(data, starts, seq_len, device):
    """Inputs and next-token targets [B, seq_len] of the windows at starts, copied to the device (on CUDA from
    pinned memory, without waiting)."""
    rows = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return training.to_device(rows[:, :-1], device), training.to_device(rows[:, 1:], device)

def spread_sample(data, tokens=2 ** 22, pieces=64):
    """The whole array if it holds at most `tokens`, else `pieces` contiguous runs spread evenly over it, `tokens`
    in all: a sample whose cost does not grow with the file (a recipe's train.bin holds billions)."""
    if len(data) <= tokens:
        return [data]
    run = tokens // pieces
    return [data[start:start + run] for start in np.linspace(0, len(data) - run, pieces).astype(np.int64)]

def unigram_loss(train_data, val_data, vocab_size):
    """Cross-entropy on val of the train set's token frequencies (add-one smoothed): the loss of a model that
    ignores context, the bar a trained model's val loss should clear by far. Both sides on spread_sample."""
    counts = np.ones(vocab_size)
    for piece in spread_sample(train_data):
        counts += np.bincount(piece, minlength=vocab_size)
    log_probs = np.log(counts / counts.sum())
    val = spread_sample(val_data)
    return float(-sum(log_probs[piece].sum() for piece in val) / sum(len(piece) for piece in val))

@torch.no_grad()
def evaluate(model, val_data, cfg, run):
    """Mean loss on eval_batches fixed validation batches (the same ones at every evaluation)."""
    model.eval()
    starts = batch_rows(cfg.seed, 0, cfg.eval_batches * cfg.batch_size, len(val_data) - cfg.seq_len - 1, split=1)
    losses = []
    for i in range(cfg.eval_batches):
        x, y = get_batch(val_data, starts[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg.seq_len, run.device)
        with devices.autocast(run.device, run.dtype):
            losses.append(model(x, y)[1])
    model.train()
    return torch.stack(losses).mean().item()

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
    cfg = settings.load_config(DEFAULTS, argv)
    run = training.setup(cfg)
    settings.require_prepared(cfg.data_dir, argv, offline_dir="data/shakespeare")
    tok = load_tokenizer(cfg.data_dir)
    train_data = files.read_array(os.path.join(cfg.data_dir, "train.bin"))
    val_data = files.read_array(os.path.join(cfg.data_dir, "val.bin"))
    # a checkpoint continues its run with its optimizer and step: this run's (init_from=resume), or another's,
    # e.g. a stable-phase WSD checkpoint on new data with a new max_steps, so that only the final decay is new
    source = training.resume_dir(cfg) or cfg.init_from
    checkpoint = ckpt.load_checkpoint(source) if ckpt.is_checkpoint(source) else None
    model, checkpoint, grown = build_model(cfg, tok, checkpoint)
    model = model.to(run.device)
    if grown and run.master:
        print(grown)
    for name, data in (("train.bin", train_data), ("val.bin", val_data)):
        if len(data) <= cfg.seq_len + 1:
            raise ValueError(f"{cfg.data_dir}/{name} holds {len(data)} tokens, fewer than seq_len={cfg.seq_len}")
        # the token ids are checked once here, against the largest the file records, not in every batch
        largest = files.array_max_value(os.path.join(cfg.data_dir, name))
        if largest >= model.config.vocab_size:
            raise ValueError(f"{cfg.data_dir}/{name} holds token id {largest} but the model's vocabulary has "
                             f"{model.config.vocab_size}: set vocab_size > {largest} or use the model's tokenizer")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the data's tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: set vocab_size >= {tok.vocab_size}")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    grad_accum = training.grad_accum_steps(cfg.batch_tokens, cfg.batch_size * cfg.seq_len, run.world_size)
    rows_per_step = cfg.batch_size * grad_accum * run.world_size
    unigram = unigram_loss(train_data, val_data, model.config.vocab_size)
    if run.master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{n_params / 1e6:.2f}M parameters | {cfg.batch_tokens:,} tokens per step = "
              f"{cfg.batch_size} x {cfg.seq_len} x {run.world_size} processes x {grad_accum} accumulation | "
              f"{run.device} {run.dtype} | train {len(train_data):,} tokens | unigram baseline val loss "
              f"{unigram:.3f}")

    def train_batch(step, micro_step):
        """This process's micro-batch: its rows of the step's, a pure function of (seed, step), so a resumed run
        (on any number of processes) sees what the uninterrupted one would."""
        starts = batch_rows(cfg.seed, step, rows_per_step, len(train_data) - cfg.seq_len - 1)
        first = (micro_step * run.world_size + run.rank) * cfg.batch_size
        return get_batch(train_data, starts[first:first + cfg.batch_size], cfg.seq_len, run.device)

    flops_per_step = model.flops_per_token(cfg.seq_len) * cfg.batch_tokens
    if cfg.dry_run:
        return training.dry_run(cfg, run, model, len(train_data), flops_per_step)
    optimizer, start_step = training.make_optimizer(cfg, run, model, checkpoint)
    model_to_call, scaler, engine = training.model_to_train(cfg, run, model, optimizer, grad_accum, checkpoint)
    ddp = engine is None and run.world_size > 1
    cross_entropy = training.training_cross_entropy(run.device, run.compile)  # None: the model's F.cross_entropy
    peak = devices.MatmulPeak(run.device, run.dtype)  # MFU's denominator
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    training.truncate_log(run, log_path, lambda record: record["step"] < start_step)
    if start_step == 0:  # the number every later evaluation is compared with
        with training.whole_weights(engine):
            val_loss = evaluate(model, val_data, cfg, run)
        training.log_eval(run, log_path, 0, dict(val_loss=val_loss, unigram_val_loss=unigram), "before training")
    if start_step >= cfg.max_steps:
        print(f"already trained to max_steps={cfg.max_steps}")
    x, y = train_batch(start_step, 0)
    timer, timed_from = time.perf_counter(), start_step
    autocast = devices.autocast(run.device, run.dtype)  # as nanoGPT's ctx: matmuls in dtype, weights in float32
    with training.stop_requests() as stop_signal:
        for step in range(start_step, cfg.max_steps):
            lr = training.lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the micro-steps queue work on the device and read nothing back: the loss stays there until a log step
            loss_sum = torch.zeros((), device=run.device)
            for micro_step in range(grad_accum):
                # DDP all-reduces the gradients in the last micro-step's backward only
                skip_all_reduce = ddp and micro_step < grad_accum - 1
                with model_to_call.no_sync() if skip_all_reduce else contextlib.nullcontext():
                    with autocast:
                        _, loss = model_to_call(x, y, cross_entropy=cross_entropy)
                    loss = loss / grad_accum  # this micro-step's share of the step's mean loss
                    # the next micro-batch, cut and copied while the device still runs this one
                    x, y = train_batch(*divmod(step * grad_accum + micro_step + 1, grad_accum))
                    loss_sum += loss.detach()
                    if engine is None:
                        scaler.scale(loss).backward()
                    else:  # loss is already its share: the engine must not divide by the accumulation steps again
                        engine.backward(loss, scale_wrt_gas=False)
                        engine.step()  # at its accumulation boundary (the last micro-step): clip, step, zero_grad
            if engine is None:
                scaler.unscale_(optimizer)  # the true gradients (float16: they were scaled up), for the clip
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # a tensor: no read
                scaler.step(optimizer)  # float16: skipped if a gradient overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            else:
                grad_norm = float(engine.get_global_grad_norm() or 0.0)  # before its clip (a tensor or None)

            last_step, stopping = step == cfg.max_steps - 1, bool(stop_signal)  # a signal arriving later: next step
            save = training.save_due(cfg, step, stopping)
            logging = step % cfg.log_interval == 0 or last_step
            if logging or save:  # the host reads the step's numbers: here, and only here, it waits for the device
                loss, grad_norm = training.mean_over_processes(run, loss_sum), float(grad_norm)
                training.check_finite(loss, grad_norm, step, cfg, run)
            if logging:
                seconds = (time.perf_counter() - timer) / (step - timed_from + 1)
                record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=cfg.batch_tokens / seconds,
                              mfu=peak.mfu(flops_per_step / seconds / run.world_size))
                training.log(run, log_path, record, f"step {step} | loss {loss:.4f} | lr {lr:.2e} | grad norm "
                             f"{grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%")
                timer, timed_from = time.perf_counter(), step + 1
            if step % cfg.eval_interval == cfg.eval_interval - 1 or last_step:
                with training.whole_weights(engine):
                    val_loss = evaluate(model, val_data, cfg, run)
                training.log_eval(run, log_path, step, dict(val_loss=val_loss, unigram_val_loss=unigram),
                                  f"eval step {step}")
                timer, timed_from = time.perf_counter(), step + 1
            if save:
                state = training.training_state(cfg, run, model, tok, step + 1, "pt")
                training.save(cfg, run, state, optimizer, engine)
            if stopping:
                print(f"stopped by signal {stop_signal[0]} after step {step}; resume with --init_from=resume")
                break
    if run.master and not stop_signal:
        training.export(cfg)
        training.plot_losses(log_path, os.path.join(cfg.out_dir, "loss.png"))
    if run.world_size > 1:
        dist.destroy_process_group()
    return model

if __name__ == "__main__":
    settings.run(main)
