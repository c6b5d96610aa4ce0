"""
The toolbox every stage's training loop draws on, plain functions and no loop: processes, precision and
compile, the loss function chosen for the device, AdamW with exact resume, the learning-rate schedule, the model
the loop calls (compiled, wrapped in DDP; or a DeepSpeed ZeRO engine: deepspeed_zero.py, imported only with
backend=deepspeed), checkpoint state, stop signals, the NaN check and the JSONL log.

Each stage script (train_pt.py, train_sft.py, train_dpo.py, train_grpo.py) writes its own loop from these, in
execution order, and its step in full: learning rate, autocast, forward and loss, backward, the all-reduce
boundary, clip, optimizer step, zero_grad. Across several nodes, out_dir must be one directory all of them see
(a shared file system): rank 0 writes the checkpoint file there, every rank its DeepSpeed shards, and every rank
reads them back.
"""
import os
import json
import math
import signal
import dataclasses
import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanodoge import checkpoint as ckpt, devices, files

# -----------------------------------------------------------------------------
# the loss, chosen for the device

class ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index=-1) for logits [N, V], without its [N, V] buffers (a
    float32 copy, the log-softmax, in backward a one-hot and the log-softmax's gradient: on a CPU each is a fresh
    allocation written and read in full, and page faults). Rows go in chunks that stay in the cache: forward keeps
    one logsumexp per row, backward writes d loss / d logits = (softmax - onehot) / N once. The mean is over the
    rows whose target is not -1, their count kept on the device (no host read)."""
    ROWS = 32  # a chunk of 32 rows of a 32k vocabulary is 4 MB in float32: it fits a CPU's L2/L3

    @staticmethod
    def forward(ctx, logits, targets):
        scored = targets >= 0
        targets = targets.clamp(min=0)  # an ignored row reads any logit; its loss and gradient are zeroed
        lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(ChunkedCrossEntropy.ROWS)])
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        count = scored.sum()
        ctx.save_for_backward(logits, targets, lse, scored, count)
        return ((lse - target_logits) * scored).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, scored, count = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_loss / count
        rows = ChunkedCrossEntropy.ROWS
        for start in range(0, logits.size(0), rows):
            t, l = targets[start:start + rows, None], lse[start:start + rows, None]
            p = (logits[start:start + rows].float() - l).exp_()  # softmax, from the saved logsumexp
            p.scatter_add_(1, t, torch.full_like(t, -1, dtype=p.dtype))  # - onehot(target)
            grad[start:start + rows] = p.mul_(scale * scored[start:start + rows, None])
        return grad, None

def training_cross_entropy(device, compiled):
    """The loss function model.forward uses in training: the chunked one on a CPU in eager mode (a quarter
    faster a Doge-20M step there, bench.py); F.cross_entropy (None: the model's own) on a GPU, where it is a
    few fused kernels, and under torch.compile, which fuses it itself."""
    return ChunkedCrossEntropy.apply if device.type == "cpu" and not compiled else None

# -----------------------------------------------------------------------------
# setup shared by every stage

def resolve_compile(setting, device):
    """(whether to torch.compile the training forward, a line that says why). auto compiles where bench.py
    measured it faster: on CUDA, and on a CPU with AVX-512 (train 1.14x in float32, 1.44x in bf16 on the Doge-20M
    shape); on an AVX2-only CPU it measured 0.99x against eager with the chunked loss, so it stays eager there."""
    if setting not in ("auto", "True", "False", True, False):
        raise ValueError(f"compile must be auto, True or False, got {setting!r}")
    if setting in ("True", "False", True, False):
        return setting in ("True", True), f"compile {setting in ('True', True)}"
    if device.type == "cuda":
        return True, "compile auto: on (CUDA)"
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
    if device.type == "cpu" and capability.startswith("AVX512"):
        return True, f"compile auto: on (this CPU has {capability})"
    return False, f"compile auto: off ({capability}: eager measured as fast)"

def resolve_deterministic(setting, device, compiled):
    """(whether to run torch's deterministic algorithms, a line that says why). auto turns them on for compiled
    training on a CPU: there inductor adds the embedding's gradient rows (an index_put over the token ids) with
    atomic adds from several threads, whose order, and so the float rounding, changes run to run and a resumed
    run drifts from the uninterrupted one; deterministic mode makes inductor fall back to ATen's serial kernel
    (bench.py: the cost). Eager CPU kernels are deterministic already. On CUDA auto leaves it off, as it costs
    speed there: --deterministic=True for bit-exact runs (with cuBLAS's fixed workspace)."""
    if setting not in ("auto", "True", "False", True, False):
        raise ValueError(f"deterministic must be auto, True or False, got {setting!r}")
    if setting != "auto":
        return setting in ("True", True), f"deterministic {setting in ('True', True)}"
    if device.type == "cpu" and compiled:
        return True, "deterministic auto: on (compiled on a CPU)"
    return False, "deterministic auto: off"

def setup(cfg):
    """Processes, device, precision, compile, deterministic kernels and seed: a namespace every stage's loop
    reads. The first line printed says which device, dtype, compile and deterministic setting the
    run got, and why."""
    run = devices.setup_distributed(cfg.device)
    run.dtype, dtype_why = devices.resolve_dtype(cfg.dtype, run.device)
    run.compile, compile_why = resolve_compile(getattr(cfg, "compile", False), run.device)
    deterministic, deterministic_why = resolve_deterministic(cfg.deterministic, run.device, run.compile)
    if deterministic and run.device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)  # set either way: a process may run several stages
    torch.manual_seed(cfg.seed + run.rank)
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if run.master:
        print(f"{run.device} | {dtype_why} | {compile_why} | {deterministic_why}", flush=True)
        os.makedirs(cfg.out_dir, exist_ok=True)
    return run

def resume_dir(cfg):
    """Where a run continues from, its newest complete checkpoint: out_dir for init_from=resume, None otherwise."""
    if cfg.init_from != "resume":
        return None
    if not ckpt.checkpoint_paths(cfg.out_dir):
        raise FileNotFoundError(f"init_from=resume but {cfg.out_dir} holds no complete checkpoint")
    return cfg.out_dir

def grad_accum_steps(batch_tokens, tokens_per_micro_batch, world_size):
    per_pass = tokens_per_micro_batch * world_size
    if batch_tokens % per_pass:
        raise ValueError(f"batch_tokens={batch_tokens} is not a multiple of batch_size x seq_len x processes "
                         f"= {per_pass}: change one of them")
    return batch_tokens // per_pass

def to_device(tensor, device):
    """A host tensor on the device. On CUDA from pinned memory and non-blocking: the copy runs while the GPU
    still computes the micro-step queued before it (from pageable memory it would wait for it)."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

# -----------------------------------------------------------------------------
# optimizer, checkpoint state, the model the loop calls

def make_optimizer(cfg, run, model, checkpoint=None):
    """AdamW over the model's decay groups (fused on GPUs). Resuming, its state and the RNG state come back from
    the checkpoint. Returns (optimizer, the step to start from)."""
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=run.device.type == "cuda")
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

def model_to_train(cfg, run, model, optimizer, grad_accum, checkpoint):
    """(the model the loop calls, the float16 GradScaler, the DeepSpeed engine or None). backend=ddp: ddp_model's;
    backend=deepspeed: a ZeRO 1/2/3 engine around model and optimizer (deepspeed_zero.py, and deepspeed itself,
    imported only then), which is also the model the loop calls, and no GradScaler: the engine scales fp16 itself."""
    if cfg.backend not in ("ddp", "deepspeed"):
        raise ValueError(f"backend must be 'ddp' or 'deepspeed', got {cfg.backend!r}")
    if checkpoint is not None and ("deepspeed_tag" in checkpoint) != (cfg.backend == "deepspeed"):
        raise ValueError(f"{cfg.init_from}: the checkpoint's optimizer state was written with backend="
                         f"{checkpoint['config'].get('backend')}: continue it with that --backend")
    if cfg.backend == "deepspeed":
        from nanodoge import deepspeed_zero
        engine = deepspeed_zero.initialize(cfg, run, model, optimizer, grad_accum, checkpoint)
        return engine, None, engine
    return *ddp_model(run, model), None

def ddp_model(run, model):
    """(the model the loop calls, the GradScaler): compiled first with run.compile (one graph, fullgraph), then in
    DDP across several processes, whose no_sync() skips the all-reduce of a micro-step's gradients. The RoPE
    tables are constants: no broadcast of buffers before each forward. The GradScaler is on for float16 only
    (elsewhere its calls do nothing)."""
    model_to_call = torch.compile(model, fullgraph=True) if run.compile else model
    if run.world_size > 1:
        model_to_call = DDP(model_to_call, device_ids=[run.local_rank] if run.device.type == "cuda" else None,
                            broadcast_buffers=False)
    return model_to_call, torch.amp.GradScaler(run.device.type, enabled=run.dtype == "float16")

def whole_weights(engine):
    """Around an evaluation: under ZeRO-3 each rank holds a slice of every weight outside a forward pass, and an
    evaluation that reads weights directly (the generation engine's fused weights) needs them whole meanwhile;
    without DeepSpeed (engine None) they always are."""
    if engine is None:
        return contextlib.nullcontext()
    from nanodoge import deepspeed_zero
    return deepspeed_zero.gathered(engine)

def save(cfg, run, state, optimizer, engine):
    """Rank 0 writes the checkpoint out_dir/ckpt_<step>.pt with the optimizer state (atomically, rotating out all
    but keep_last); with DeepSpeed the engine's shards beside it (deepspeed_zero.save)."""
    if engine is not None:
        from nanodoge import deepspeed_zero
        return deepspeed_zero.save(engine, cfg, run, state)
    if run.master:
        state = dict(state, optimizer=optimizer.state_dict())
        print(f"saved {ckpt.save_checkpoint(cfg.out_dir, state['step'], state, cfg.keep_last)}")

# -----------------------------------------------------------------------------
# the end of a step: stop signals, when to save, the NaN check, the log

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

def save_due(cfg, step, stopping):
    """Save after this step: every ckpt_interval steps, at the last step, and when a stop was asked for."""
    return step % cfg.ckpt_interval == cfg.ckpt_interval - 1 or step == cfg.max_steps - 1 or stopping

def mean_over_processes(run, values):
    """values (a 0-d tensor or a dict of them, each this process's share summed over its micro-steps) averaged
    over the processes and read on the host: the one device-to-host read of a step, at log and save steps."""
    names = list(values) if isinstance(values, dict) else None
    stacked = torch.stack([values[k] for k in names] if names else [values]).float()
    if run.world_size > 1:
        dist.all_reduce(stacked)
        stacked = stacked / run.world_size
    numbers = stacked.tolist()
    return dict(zip(names, numbers)) if names else numbers[0]

def check_finite(loss, grad_norm, step, cfg, run):
    """Stop loudly on a NaN/inf loss or gradient (fp16 overflows are the GradScaler's to skip); a NaN on any rank
    reaches every rank's grad norm through the all-reduce, so all ranks stop together. Called at every log and
    save step, so no checkpoint is written after a step that went wrong."""
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and run.dtype != "float16"):
        raise ValueError(f"loss {loss} / grad norm {grad_norm} at step {step}: stopping; the last good "
                         f"checkpoint in {cfg.out_dir} is intact (lower learning_rate or check the data)")

def log(run, log_path, record, line):
    """Print a line and append its record to the run's JSONL log (rank 0 only)."""
    if run.master:
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

def log_eval(run, log_path, step, metrics, label="eval"):
    log(run, log_path, dict(step=step, **metrics), f"{label} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

def truncate_log(run, log_path, keep):
    """Keep the log records for which keep(record) holds: a resumed run drops those of the steps it redoes, so
    the log tells the one trajectory the weights took (and a run from step 0 starts an empty log)."""
    if run.master and os.path.exists(log_path):
        with open(log_path) as f:
            records = [line for line in f if keep(json.loads(line))]
        files.write_file(log_path, "".join(records))

def export(cfg):
    """The newest checkpoint of out_dir as a Hugging Face-format directory (config.json, model.safetensors) with
    its tokenizer: out_dir/hf, for lighteval, transformers or the hub."""
    model, tok, _ = ckpt.load_model(cfg.out_dir)
    export_dir = os.path.join(cfg.out_dir, "hf")
    model.save_pretrained(export_dir)
    tok.save(export_dir)
    print(f"exported the final model to {export_dir} (Hugging Face format)")

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

# -----------------------------------------------------------------------------
# what a run will cost, before it starts (--dry_run=True)

# dense bf16 tensor-core peaks from the datasheets, for the time a run would take at a stated MFU
GPU_PEAK_TFLOPS = {"H100 SXM": 989, "A100": 312}
STATED_MFU = 0.4

def activation_bytes(model_config, batch_size, seq_len, dtype):
    """Bytes the autograd graph keeps for the backward of one micro-batch: every tensor saved for backward,
    counted once per storage, parameters excepted. Measured by running the forward on the meta device (no
    memory, no compute) with the model cast to the run's dtype; autocast keeps a few of them in float32."""
    from model import Doge
    with torch.device("meta"):
        model = Doge(model_config).to(getattr(torch, dtype))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}
    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return tensor
    x = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, x)
    return sum(saved.values())

def dry_run(cfg, run, model, train_tokens, flops_per_step):
    """Print what the run will take (tokens, epochs, parameters, FLOPs, memory per process, time) and train
    nothing. Memory: float32 weights and gradients, AdamW's two moments, and the activations of one micro-batch
    in the dtype a GPU run gets (bf16 under dtype=auto); ZeRO divides what its stage shards by the processes."""
    n_params = sum(p.numel() for p in model.parameters())
    dtype = "bfloat16" if cfg.dtype == "auto" else run.dtype
    tokens = cfg.max_steps * cfg.batch_tokens
    shards = dict(optimizer=1, gradients=2, weights=3)  # the ZeRO stage from which each is sharded
    sharded = lambda what: run.world_size if cfg.backend == "deepspeed" and cfg.zero_stage >= shards[what] else 1
    memory = dict(weights=4 * n_params / sharded("weights"), gradients=4 * n_params / sharded("gradients"),
                  optimizer=8 * n_params / sharded("optimizer"),
                  activations=activation_bytes(model.config, cfg.batch_size, cfg.seq_len, dtype))
    gb = lambda n: f"{n / 1e9:.2f} GB"
    print(f"dry run: nothing is trained\n"
          f"  data      {train_tokens:,} train tokens | {cfg.max_steps:,} steps x {cfg.batch_tokens:,} tokens = "
          f"{tokens / 1e9:.2f}B tokens = {tokens / train_tokens:.2f} epochs\n"
          f"  model     {n_params / 1e6:.2f}M parameters | {flops_per_step:.3g} FLOPs per step, "
          f"{flops_per_step * cfg.max_steps:.3g} in all\n"
          f"  memory    per process ({run.world_size} x {cfg.backend}"
          f"{f' ZeRO-{cfg.zero_stage}' if cfg.backend == 'deepspeed' else ''}): "
          + ", ".join(f"{k} {gb(v)}" for k, v in memory.items())
          + f" (a micro-batch of {cfg.batch_size} x {cfg.seq_len} in {dtype}) = {gb(sum(memory.values()))}")
    seconds = lambda peak: flops_per_step * cfg.max_steps / (STATED_MFU * peak * run.world_size)
    times = [f"{name} ({tflops} TFLOP/s) {seconds(tflops * 1e12) / 3600:.2f} h" for name, tflops in GPU_PEAK_TFLOPS.items()]
    peak = devices.measure_peak_flops(run.device, run.dtype)
    times.append(f"this {run.device.type} ({peak / 1e12:.3f} TFLOP/s measured, {run.dtype}) {seconds(peak) / 3600:.1f} h")
    print(f"  time      at {STATED_MFU:.0%} MFU on {run.world_size} of each: " + "; ".join(times))
    return memory

# -----------------------------------------------------------------------------
# learning-rate schedules

def lr_at(step, cfg):
    """The learning rate of a step under cfg's schedule (max_steps, learning_rate, schedule, warmup_ratio,
    decay_ratio, min_lr_rate, decay_shape): warmup-stable-decay (linear warmup to the peak, constant, then decay
    to min_lr_rate x peak in the last decay_ratio of training; the decay is linear or 1-sqrt, arXiv 2405.18392),
    or warmup + cosine.
    WSD lets training continue from any stable-phase checkpoint: only the final decay is re-run."""
    max_steps, learning_rate = cfg.max_steps, cfg.learning_rate
    warmup_steps = int(cfg.warmup_ratio * max_steps)
    min_lr = cfg.min_lr_rate * learning_rate
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr + (learning_rate - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule != "wsd":
        raise ValueError(f"schedule must be 'wsd' or 'cosine', got {cfg.schedule!r}")
    decay_start = max_steps - int(cfg.decay_ratio * max_steps)
    if step < decay_start:
        return learning_rate
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    if cfg.decay_shape == "linear":
        remaining = 1 - progress
    elif cfg.decay_shape == "sqrt":
        remaining = 1 - math.sqrt(progress)
    else:
        raise ValueError(f"decay_shape must be 'linear' or 'sqrt', got {cfg.decay_shape!r}")
    return min_lr + (learning_rate - min_lr) * remaining
