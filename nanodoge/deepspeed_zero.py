"""
DeepSpeed ZeRO stage 1/2/3: the engine a stage's loop calls with backend=deepspeed (engine.backward, engine.step,
written in the loop), its save and load beside the checkpoint file, and ZeRO-3's gathering of whole weights.
Imported only with backend=deepspeed (by training.model_to_train, whole_weights and save).
"""
import os
import shutil
import contextlib

import torch.distributed as dist

from nanodoge import checkpoint as ckpt

def initialize(cfg, run, model, optimizer, grad_accum, checkpoint):
    """A ZeRO engine around model and a plain torch AdamW (DeepSpeed's own Adam would JIT-build an op). It counts
    the micro-steps: its step() clips (gradient_clipping) and steps the optimizer at the last of every
    grad_accum. Resuming, it reloads its own sharded optimizer and fp32 master weights from beside the
    checkpoint file."""
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
    if run.compile:
        engine.compile()
    if checkpoint is not None:  # its shards lie beside it, in deepspeed/<tag>
        source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
        ckpt_dir = source if os.path.isdir(source) else os.path.dirname(source)
        engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag=checkpoint["deepspeed_tag"])
    return engine

def gathered(engine):
    """Whole weights on every rank meanwhile: under ZeRO-3 each holds a slice of every weight outside a forward."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    return contextlib.nullcontext()

def save(engine, cfg, run, state):
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
        print(f"saved {ckpt.save_checkpoint(cfg.out_dir, state['step'], state, cfg.keep_last)}")
        kept = {f"step{os.path.basename(p)[5:12]}" for p in ckpt.checkpoint_paths(cfg.out_dir)}
        for old in set(os.listdir(ds_dir)) - kept:  # the engine's shards of rotated-out checkpoints
            if old.startswith("step"):
                shutil.rmtree(os.path.join(ds_dir, old))
    if dist.is_initialized():
        dist.barrier()
