"""
The training loop every stage shares, and its pieces: processes and precision, AdamW, checkpoints with exact
resume, logging, DDP or DeepSpeed ZeRO, and the loss function chosen for the device.

train_pt.py, train_sft.py and train_dpo.py hand `train` their own batch_loss and evaluate functions;
train_grpo.py writes its own loop from the pieces. Across several nodes, out_dir must be one directory all of
them see (a shared file system): rank 0 writes the checkpoint file there, every rank its DeepSpeed shards, and
every rank reads them back to resume.
"""
import os
import json
import math
import time
import shutil
import signal
import dataclasses
import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import checkpoint as ckpt

# -----------------------------------------------------------------------------
# the loss, chosen for the device

class ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets) for logits [N, V], without its [N, V] buffers (a float32 copy,
    the log-softmax, in backward a one-hot and the log-softmax's gradient: on a CPU each is a fresh allocation
    written and read in full, and page faults). Rows go in chunks that stay in the cache: forward keeps one
    logsumexp per row, backward writes d loss / d logits = (softmax - onehot) / N once."""
    ROWS = 32  # a chunk of 32 rows of a 32k vocabulary is 4 MB in float32: it fits a CPU's L2/L3

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(ChunkedCrossEntropy.ROWS)])
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return (lse - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_loss / logits.size(0)
        rows = ChunkedCrossEntropy.ROWS
        for start in range(0, logits.size(0), rows):
            t, l = targets[start:start + rows, None], lse[start:start + rows, None]
            p = (logits[start:start + rows].float() - l).exp_()  # softmax, from the saved logsumexp
            p.scatter_add_(1, t, torch.full_like(t, -1, dtype=p.dtype))  # - onehot(target)
            grad[start:start + rows] = p.mul_(scale)
        return grad, None

def training_cross_entropy(device, compiled):
    """The loss function model.forward uses in training: the chunked one on a CPU in eager mode (a quarter
    faster a Doge-20M step there, bench.py); F.cross_entropy (None: the model's own) on a GPU, where it is a
    few fused kernels, and under torch.compile, which fuses it itself."""
    return ChunkedCrossEntropy.apply if device.type == "cpu" and not compiled else None

# -----------------------------------------------------------------------------
# setup shared by every stage

def setup_training(cfg):
    """Processes, device, precision, loss function and seed: a namespace every stage's loop reads."""
    run = common.setup_distributed(cfg.device)
    run.dtype, why = common.resolve_dtype(cfg.dtype, run.device)
    run.autocast = lambda: common.autocast(run.device, run.dtype)
    run.cross_entropy = training_cross_entropy(run.device, getattr(cfg, "compile", False))
    torch.manual_seed(cfg.seed + run.rank)
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if run.master:
        print(f"{run.device} | {why}", flush=True)
        os.makedirs(cfg.out_dir, exist_ok=True)
    return run

def resume_checkpoint(cfg):
    """The checkpoint a run continues from: the newest complete one in out_dir for init_from=resume."""
    if cfg.init_from != "resume":
        return None
    if not ckpt.checkpoint_paths(cfg.out_dir):
        raise FileNotFoundError(f"init_from=resume but {cfg.out_dir} holds no complete checkpoint")
    return ckpt.load_checkpoint(cfg.out_dir)

def grad_accum_steps(batch_tokens, tokens_per_micro_batch, world_size):
    per_pass = tokens_per_micro_batch * world_size
    if batch_tokens % per_pass:
        raise ValueError(f"batch_tokens={batch_tokens} is not a multiple of batch_size x seq_len x processes "
                         f"= {per_pass}: change one of them")
    return batch_tokens // per_pass

# -----------------------------------------------------------------------------
# pieces of a training loop (train_grpo.py writes its own loop from these too)

def make_optimizer(cfg, run, model, checkpoint=None):
    """AdamW over the model's decay groups (fused on GPUs). Resuming, its state and the RNG state come back from
    the checkpoint. Returns (optimizer, the step to start from)."""
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), fused=run.device.type == "cuda")
    if checkpoint is None:
        return optimizer, 0
    if "optimizer" in checkpoint:  # absent in a DeepSpeed run's file: its engine restores the optimizer
        optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if run.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    if run.device.type == "mps" and checkpoint["rng"].get("mps") is not None:
        torch.mps.set_rng_state(checkpoint["rng"]["mps"])
    return optimizer, checkpoint["step"]

def training_state(cfg, run, model, tok, step, stage, **extra):
    """What a checkpoint holds besides the optimizer: weights, shapes, the next step, config, tokenizer, RNG."""
    return dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config), step=step,
                config=vars(cfg), tokenizer=tok.state(), stage=stage, **extra,
                rng=dict(cpu=torch.get_rng_state(),
                         cuda=torch.cuda.get_rng_state() if run.device.type == "cuda" else None,
                         mps=torch.mps.get_rng_state() if run.device.type == "mps" else None))

@contextlib.contextmanager
def stop_requests():
    """Inside this block SIGINT/SIGTERM are only recorded (in the yielded list): the loop finishes its step,
    saves and exits, instead of dying halfway through a step or a save."""
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

def save_training_state(cfg, run, state):
    """Rank 0 writes the checkpoint out_dir/ckpt_<step>.pt (atomically, rotating out all but keep_last)."""
    if run.master:
        print(f"saved {ckpt.save_checkpoint(cfg.out_dir, state['step'], state, cfg.keep_last)}")

def save_or_stop(cfg, step, stop_signal, save):
    """End of a step: save(step + 1) every ckpt_interval steps, at the last step and when a stop was asked for;
    True when the loop must stop (a SIGINT/SIGTERM arrived)."""
    if step % cfg.ckpt_interval == cfg.ckpt_interval - 1 or step == cfg.max_steps - 1 or stop_signal:
        save(step + 1)
    if stop_signal:
        print(f"stopped by signal {stop_signal[0]} after step {step}; resume with --init_from=resume")
    return bool(stop_signal)

def check_finite(loss, grad_norm, step, cfg, run):
    """Stop loudly on a NaN/inf loss or gradient (fp16 overflows are the GradScaler's to skip); a NaN on any rank
    reaches every rank's grad norm through the all-reduce, so all ranks stop together."""
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and run.dtype != "float16"):
        raise ValueError(f"loss {loss} / grad norm {grad_norm} at step {step}: stopping; the last good "
                         f"checkpoint in {cfg.out_dir} is intact (lower learning_rate or check the data)")

def log(run, log_path, record, line):
    """Print a line and append its record to the run's JSONL log (rank 0 only)."""
    if run.master:
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

def truncate_log(run, log_path, keep):
    """Keep the log records for which keep(record) holds: a resumed run drops those of the steps it redoes, so
    the log tells the one trajectory the weights took (and a run from step 0 starts an empty log)."""
    if run.master and os.path.exists(log_path):
        with open(log_path) as f:
            records = [line for line in f if keep(json.loads(line))]
        common.write_file(log_path, "".join(records))

def export(cfg):
    """The newest checkpoint of out_dir as a Hugging Face-format directory (config.json, model.safetensors) with
    its tokenizer: out_dir/hf, for lighteval, transformers or the hub."""
    model, tok, _ = ckpt.load_model(cfg.out_dir)
    export_dir = os.path.join(cfg.out_dir, "hf")
    model.save_pretrained(export_dir)
    tok.save(export_dir)
    print(f"exported the final model to {export_dir} (Hugging Face format)")

# -----------------------------------------------------------------------------
# the training loop

def train(cfg, run, model, tok, batch_loss, evaluate, tokens_per_step, flops_per_step, grad_accum, checkpoint=None,
          stage="pt"):
    """Optimise model for steps [start, max_steps). batch_loss(model, step, micro_step) -> (loss, metrics)
    must pick its batch as a pure function of (seed, step, micro_step, rank): with the step, model,
    optimizer and RNG restored from a checkpoint, a resumed run then repeats the uninterrupted one exactly.
    evaluate(model) -> metrics runs on every rank (ZeRO-3 needs all of them for a forward pass), once before the
    first step (logged with before=True) and every eval_interval steps."""
    raw_model = model
    optimizer, start_step = make_optimizer(cfg, run, raw_model, checkpoint)
    if checkpoint is not None and ("deepspeed_tag" in checkpoint) != (cfg.backend == "deepspeed"):
        raise ValueError(f"{cfg.init_from}: the checkpoint's optimizer state was written with backend="
                         f"{checkpoint['config'].get('backend')}: continue it with that --backend")
    engine = None
    if cfg.backend not in ("ddp", "deepspeed"):
        raise ValueError(f"backend must be 'ddp' or 'deepspeed', got {cfg.backend!r}")
    if cfg.backend == "deepspeed":
        engine = model = deepspeed_engine(cfg, run, raw_model, optimizer, grad_accum, checkpoint)
    else:
        model = wrap_model(cfg, run, raw_model)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == "float16")

    def save(step):  # step = the next step to run
        if engine is not None:
            save_deepspeed_checkpoint(cfg, run, engine, training_state(cfg, run, raw_model, tok, step, stage))
        else:
            save_training_state(cfg, run, training_state(cfg, run, raw_model, tok, step, stage,
                                                         optimizer=optimizer.state_dict()))

    peak_flops = common.measure_peak_flops(run.device, run.dtype)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    truncate_log(run, log_path, lambda record: record["step"] < start_step)
    if start_step == 0:  # the numbers every later evaluation is compared with
        with gathered_parameters(cfg, raw_model):
            metrics = evaluate(raw_model)
        log(run, log_path, dict(step=0, before=True, **metrics),
            "before training | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if start_step >= cfg.max_steps:
        print(f"already trained to max_steps={cfg.max_steps}")
    step_start, timed_from = time.perf_counter(), start_step
    with stop_requests() as stop_signal:
        for step in range(start_step, cfg.max_steps):
            lr = common.lr_at(step, cfg.max_steps, cfg.learning_rate, cfg.schedule, cfg.warmup_ratio,
                              cfg.decay_ratio, cfg.min_lr_rate, cfg.decay_shape)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, metric_sums = 0.0, {}
            for micro_step in range(grad_accum):
                last_micro_step = micro_step == grad_accum - 1
                no_sync = model.no_sync() if isinstance(model, DDP) and not last_micro_step else contextlib.nullcontext()
                with no_sync:
                    with run.autocast():
                        loss, metrics = batch_loss(model, step, micro_step)
                    if engine is not None:
                        engine.backward(loss)  # deepspeed divides by the accumulation steps itself
                        engine.step()  # an optimizer step at the last micro-step only
                    else:
                        scaler.scale(loss / grad_accum).backward()
                loss_sum += loss.item() / grad_accum
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + value / grad_accum
            if run.world_size > 1:  # log the loss and metrics of the whole global batch, not rank 0's share
                values = torch.tensor([loss_sum, *metric_sums.values()], device=run.device)
                dist.all_reduce(values)
                loss_sum, *means = (values / run.world_size).tolist()
                metric_sums = dict(zip(metric_sums, means))
            if engine is not None:
                grad_norm = float(engine.get_global_grad_norm() or 0.0)  # a tensor or None
            else:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip).item()
            check_finite(loss_sum, grad_norm, step, cfg, run)
            if engine is None:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

            last_step = step == cfg.max_steps - 1
            if step % cfg.log_interval == 0 or last_step:
                common.synchronize(run.device)
                seconds = (time.perf_counter() - step_start) / (step - timed_from + 1)
                record = dict(step=step, loss=loss_sum, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=tokens_per_step / seconds,
                              mfu=flops_per_step / seconds / (peak_flops * run.world_size), **metric_sums)
                extra = "".join(f" | {k} {v:.4f}" for k, v in metric_sums.items())
                log(run, log_path, record, f"step {step} | loss {loss_sum:.4f} | lr {lr:.2e} | grad norm "
                    f"{grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%{extra}")
                step_start, timed_from = time.perf_counter(), step + 1
            if step % cfg.eval_interval == cfg.eval_interval - 1 or last_step:
                with gathered_parameters(cfg, raw_model):
                    metrics = evaluate(raw_model)
                log(run, log_path, dict(step=step, **metrics),
                    f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                step_start, timed_from = time.perf_counter(), step + 1
            if save_or_stop(cfg, step, stop_signal, save):
                break
    if run.master and not stop_signal:
        export(cfg)
        plot_losses(log_path, os.path.join(cfg.out_dir, "loss.png"))
    return raw_model

def wrap_model(cfg, run, raw_model):
    """The module the loop calls: compiled first (cfg.compile), then in DDP across processes. In that order
    the outer module is the DDP instance, whose no_sync() then skips the all-reduce of all but the last
    micro-step's gradients. The RoPE tables are constants: no broadcast of buffers before each forward."""
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if run.world_size > 1:
        model = DDP(model, device_ids=[run.local_rank] if run.device.type == "cuda" else None,
                    broadcast_buffers=False)
    return model

def gathered_parameters(cfg, model):
    """Under ZeRO-3 each rank holds a slice of every weight outside a forward pass; an evaluation that reads
    weights directly (the generation engine's fused weights) needs them whole on every rank for its duration."""
    if cfg.backend == "deepspeed" and cfg.zero_stage == 3:
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()

def deepspeed_engine(cfg, run, model, optimizer, grad_accum, checkpoint):
    """ZeRO stage 1/2/3 around a plain torch AdamW (DeepSpeed's own Adam would JIT-build an op); resuming, the
    engine reloads its own sharded optimizer and fp32 master weights."""
    try:
        import deepspeed
    except ImportError:
        raise ValueError("backend=deepspeed needs `pip install deepspeed`") from None
    if cfg.zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage must be 1, 2 or 3, got {cfg.zero_stage}")
    if not dist.is_initialized():  # a single process still needs a process group
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT="29512").items():
            os.environ.setdefault(key, value)
        dist.init_process_group(backend="nccl" if run.device.type == "cuda" else "gloo")
    ds_config = dict(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=grad_accum,
                     gradient_clipping=cfg.grad_clip, zero_optimization=dict(stage=cfg.zero_stage),
                     bf16=dict(enabled=run.dtype == "bfloat16"), fp16=dict(enabled=run.dtype == "float16"),
                     zero_allow_untested_optimizer=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.compile:
        engine.compile()
    if checkpoint is not None:  # its shards lie beside it, in deepspeed/<tag>
        source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
        ckpt_dir = source if os.path.isdir(source) else os.path.dirname(source)
        engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag=checkpoint["deepspeed_tag"])
    return engine

def save_deepspeed_checkpoint(cfg, run, engine, state):
    """Every rank writes its shards (engine.save_checkpoint, into out_dir/deepspeed/step<N>); rank 0 then
    rebuilds the full fp32 weights from them (the master weights, not the bf16 copy the engine computes with)
    for the ckpt file, which is then like any other: later stages and sample.py read it as it is."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ds_dir = os.path.join(cfg.out_dir, "deepspeed")
    tag = f"step{state['step']:07d}"
    engine.save_checkpoint(ds_dir, tag=tag)
    if run.master:
        fp32 = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag)
        state["model"] = {key: fp32[key].clone() for key in state["model"]}  # tied weights: one tensor each
        state["deepspeed_tag"] = tag
        save_training_state(cfg, run, state)
        kept = {f"step{os.path.basename(p)[5:12]}" for p in ckpt.checkpoint_paths(cfg.out_dir)}
        for old in set(os.listdir(ds_dir)) - kept:  # the engine's shards of rotated-out checkpoints
            if old.startswith("step"):
                shutil.rmtree(os.path.join(ds_dir, old))
    if dist.is_initialized():
        dist.barrier()

def plot_losses(log_path, png_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "val_loss"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    print(f"loss curve: {png_path}")

