"""
Supervised fine-tuning: next-token cross-entropy on what the assistant says, and nothing else.

    python train_sft.py config/sft_tiny.py                       # offline quickstart: the arithmetic curriculum
    python train_sft.py config/sft_doge_20m.py                   # instruction tuning (smoltalk)
    torchrun --nproc_per_node=8 train_sft.py config/sft_reasoning_doge_20m.py   # reasoning distillation

The data is what prepare_data.py writes: chat-rendered conversations (ragged token arrays) and the loss mask
the chat renderer made with them, 1 exactly on assistant content and its <|im_end|>. A micro-batch is right-
padded to its longest conversation: under the causal mask no real token ever attends to a pad, and pads and
user/system tokens are never targets (-1), and the output head runs on the scored rows only. main() is the whole
run in execution order, its loop written out as train_pt.py's (learning rate, micro-steps, unscale, clip,
optimizer step, zero_grad; DeepSpeed's calls where it takes over; log, eval, save); nanodoge/training.py holds
the tools it calls.
"""
import os
import json
import time
import functools
import contextlib

import torch
import torch.distributed as dist

from nanodoge import devices, files, settings, training
from nanodoge.post_training import (step_indices, micro_batch, get_examples, pad_examples, target_counts, usable_examples,
                           example_lengths, length_sample, check_data, steps_per_run, examples_per_micro_step, load_policy, evaluate_accuracy, scored_positions)

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
    min_lr_rate=0.0, decay_shape="linear", weight_decay=0.01, beta1=0.9, beta2=0.95, adam_eps=1e-8, grad_clip=1.0,
    # system
    seed=1337, device="auto", dtype="auto", backend="ddp", zero_stage=2,
    compile="auto",  # auto | True | False: auto compiles where it is faster (training.resolve_compile)
    deterministic="auto",  # auto | True | False: auto is on for compiled training on a CPU (training.resolve_deterministic)
)

# -----------------------------------------------------------------------------
# batches and data

def sft_batch(ragged, indices, max_len, pad_id, device):
    """Inputs x and targets y [B, T-1]: y[t] = x[t+1] where the renderer's mask is 1, else -1 (ignored); and the
    flat indices of the scored positions (scored_positions), all made on the host, then copied to the device."""
    ids, mask = pad_examples(get_examples(ragged, indices, max_len), pad_id)
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    scored = scored_positions(y)
    return training.to_device(x, device), training.to_device(y, device), training.to_device(scored, device)

def read_jsonl(path, limit):
    with open(path) as f:
        return [json.loads(line) for line, _ in zip(f, range(limit))]

@torch.no_grad()
def evaluate(model, tok, val_set, val_usable, val_counts, test_examples, pad_id, cfg, run):
    """Held-out loss per assistant token, and (with a test set) greedy answer accuracy, exact match inside
    <answer> (the arithmetic curriculum's test set)."""
    model.eval()
    loss_sum = 0.0
    for first in range(0, len(val_usable), cfg.batch_size):
        chunk = val_usable[first:first + cfg.batch_size]
        x, y, scored = sft_batch(val_set, chunk, cfg.seq_len, pad_id, run.device)
        with devices.autocast(run.device, run.dtype):
            loss_sum += model(x, y, scored=scored)[1] * float(val_counts[first:first + cfg.batch_size].sum())
    metrics = dict(val_loss=loss_sum.item() / float(val_counts.sum()))
    if test_examples:
        with devices.autocast(run.device, run.dtype):
            metrics["accuracy"], completions = evaluate_accuracy(model, tok, test_examples, cfg.max_new_tokens)
        if run.master:
            print(f"sample answer: {completions[0]!r}")
    model.train()
    return metrics

# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = settings.load_config(DEFAULTS, argv)
    settings.require_prepared(cfg.data_dir, argv, offline_dir="data/arithmetic")
    run = training.setup(cfg)
    train_set = files.read_ragged(os.path.join(cfg.data_dir, "sft_train"))
    val_set = files.read_ragged(os.path.join(cfg.data_dir, "sft_val"))
    model, tok, checkpoint = load_policy(cfg, run.device)
    check_data(tok, model, cfg.data_dir, ["sft_train", "sft_val"], cfg.seq_len)
    test_path = os.path.join(cfg.data_dir, "test.jsonl")
    test_examples = read_jsonl(test_path, cfg.eval_examples) if os.path.exists(test_path) else []

    # examples whose loss tokens all fall beyond seq_len teach nothing: leave them out
    usable = usable_examples([os.path.join(cfg.data_dir, "sft_train")], cfg.seq_len)
    val_usable = usable_examples([os.path.join(cfg.data_dir, "sft_val")], cfg.seq_len)[:cfg.eval_examples]
    if len(usable) == 0 or len(val_usable) == 0:
        raise ValueError(f"no conversation in {cfg.data_dir} has an assistant token within seq_len={cfg.seq_len}")
    val_counts = target_counts(val_set, val_usable, cfg.seq_len)
    examples_per_step, grad_accum = examples_per_micro_step(cfg, run.world_size)
    cfg.max_steps = steps_per_run(cfg, len(usable), examples_per_step)
    # the step's tokens and the share of them that pass the output head, measured on a sample of the examples
    sample = usable[length_sample(len(usable))]
    lengths = example_lengths(train_set, sample, cfg.seq_len)
    tokens_per_step = int(lengths.mean() * examples_per_step)
    scored_share = target_counts(train_set, sample, cfg.seq_len).mean() / lengths.mean()
    flops_per_step = model.flops_per_token(lengths.mean(), scored_share) * tokens_per_step
    pad_id = tok.eos_id  # any id: pads are never targets and come after every real token
    if run.master:
        truncated = (example_lengths(train_set, sample, cfg.seq_len + 1) > cfg.seq_len).mean()  # of the sample
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(usable):,} conversations "
              f"({truncated:.1%} truncated to seq_len={cfg.seq_len}, {len(train_set[2]) - 1 - len(usable):,} left out: "
              f"no assistant token left) | {cfg.max_steps} steps of {examples_per_step} = {cfg.batch_size} x "
              f"{run.world_size} processes x {grad_accum} accumulation = {cfg.max_steps * examples_per_step / len(usable):.2f} "
              f"epochs | {run.device} {run.dtype}")

    @functools.lru_cache(maxsize=2)  # the micro-steps of a step share them: counted once a step
    def step_examples(step):
        """The step's examples (a pure function of (seed, step): exact resume on any number of processes) and their
        assistant-token counts."""
        indices = usable[step_indices(cfg.seed, step, examples_per_step, len(usable))]
        return indices, target_counts(train_set, indices, cfg.seq_len)

    def train_batch(step, micro_step):
        """This process's micro-batch of the step's examples, and its weight: the step's loss is the mean over every
        assistant token of the global batch, so a micro-batch's mean counts by its share of those tokens (one of
        short answers must not count as much as one of long answers), times the processes, whose gradients DDP
        averages. Counted on the host."""
        indices, counts = step_examples(step)
        mine = micro_batch(indices, micro_step, run.rank, run.world_size, cfg.batch_size)
        weight = float(micro_batch(counts, micro_step, run.rank, run.world_size, cfg.batch_size).sum() / counts.sum())
        weight *= run.world_size
        return (*sft_batch(train_set, mine, cfg.seq_len, pad_id, run.device), weight)

    def evaluate_now(model):
        with training.whole_weights(engine):
            return evaluate(model, tok, val_set, val_usable, val_counts, test_examples, pad_id, cfg, run)

    optimizer, start_step = training.make_optimizer(cfg, run, model, checkpoint)
    model_to_call, scaler, engine = training.model_to_train(cfg, run, model, optimizer, grad_accum, checkpoint)
    ddp = engine is None and run.world_size > 1
    cross_entropy = training.training_cross_entropy(run.device, run.compile)  # None: the model's F.cross_entropy
    peak = devices.MatmulPeak(run.device, run.dtype)  # MFU's denominator
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    training.truncate_log(run, log_path, lambda record: record["step"] < start_step)
    if start_step == 0:  # the numbers every later evaluation is compared with
        training.log_eval(run, log_path, 0, evaluate_now(model), "before training")
    if start_step >= cfg.max_steps:
        print(f"already trained to max_steps={cfg.max_steps}")
    x, y, scored, weight = train_batch(start_step, 0)
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
                    with autocast:  # mean over this micro-batch's assistant tokens
                        _, loss = model_to_call(x, y, cross_entropy=cross_entropy, scored=scored)
                    loss = loss * weight  # this micro-step's share of the step's loss
                    # the next micro-batch, cut and copied while the device still runs this one
                    x, y, scored, weight = train_batch(*divmod(step * grad_accum + micro_step + 1, grad_accum))
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
                              tokens_per_s=tokens_per_step / seconds,
                              mfu=peak.mfu(flops_per_step / seconds / run.world_size))
                training.log(run, log_path, record, f"step {step} | loss {loss:.4f} | lr {lr:.2e} | grad norm "
                             f"{grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%")
                timer, timed_from = time.perf_counter(), step + 1
            if step % cfg.eval_interval == cfg.eval_interval - 1 or last_step:
                training.log_eval(run, log_path, step, evaluate_now(model), f"eval step {step}")
                timer, timed_from = time.perf_counter(), step + 1
            if save:
                state = training.training_state(cfg, run, model, tok, step + 1, "sft")
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
