"""The device check: what a GPU (or any accelerator) must do for nanodoge to be fast and right on it.

    python -m pytest tests/test_device.py -s      # on a CUDA machine: about 5 minutes

On every device: training (forward and backward) and generation (padded prefill, decode steps) find a fused
SDPA kernel (the math kernel, which materialises T x T scores, is switched off: SDPA then raises instead of
falling back), and a training step in the device's native low precision stays near the float32 one. On CUDA
only (skipped elsewhere): the micro-steps of pre-training and SFT never synchronize with the host (CUDA's sync
debug mode set to "error" around them: tests/test_step.py counts the same on a CPU), 2-process DDP (NCCL) equal
to one process, when 2 GPUs are present, and Doge-20M and Doge-160M training tokens/s and MFU against
transformers (bench.py, printed with -s).
"""
import os
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
from nanodoge import devices
import train_pt
import train_sft
from nanodoge.engine import Engine
from model import Doge, DogeConfig, left_pad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = devices.setup_distributed("auto").device
NATIVE, WHY = devices.native_dtype(DEVICE)
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")

def fused_attention_only():
    """SDPA limited to its fused kernels: where none fits, it raises instead of using the math kernel."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])

def small_doge(**overrides):
    """The published head size (128) and GQA of Doge-20M/160M, with few layers and a small vocabulary."""
    torch.manual_seed(0)
    config = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return Doge(DogeConfig(**{**config, **overrides})).to(DEVICE)

def test_training_and_generation_use_fused_attention():
    print(f"\n{DEVICE}: {WHY}")
    model = small_doge()
    idx = torch.randint(1024, (2, 256), device=DEVICE)
    with fused_attention_only(), devices.autocast(DEVICE, NATIVE):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        model.eval()
        prompts, attention_mask = left_pad([[1, 2, 3], list(range(4, 40))], pad_id=0, device=DEVICE)
        out = Engine(model).generate(prompts, 8, temperature=0.0, attention_mask=attention_mask)  # masked prefill
        assert torch.equal(out, model.generate(prompts, 8, temperature=0.0, attention_mask=attention_mask))

def test_native_precision_training_step_is_near_float32():
    """Loss and gradient of one step in the device's native dtype against float32 (skipped where that is
    float32: nothing to compare)."""
    if NATIVE == "float32":
        pytest.skip(f"{DEVICE}: {WHY}")
    model = small_doge()
    idx = torch.randint(1024, (4, 129), device=DEVICE)
    grads = {}
    for dtype in ("float32", NATIVE):
        model.zero_grad()
        with devices.autocast(DEVICE, dtype):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads[dtype] = (loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    (loss32, grad32), (loss16, grad16) = grads["float32"], grads[NATIVE]
    assert abs(loss16 - loss32) <= 0.01 * loss32
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) >= 0.99

@cuda_only
@pytest.mark.parametrize("compile", ["False", "auto"])
def test_micro_steps_never_wait_for_the_gpu(compile, tiny_data, tmp_path, monkeypatch):
    """Pre-training then SFT from it, eager and compiled (auto compiles on CUDA): a host sync inside any micro-step
    (a .item(), a boolean selection, a copy from pageable memory) raises under sync debug mode "error"."""
    from test_step import MODEL, micro_step_windows
    micro_step_windows(monkeypatch, lambda: torch.cuda.set_sync_debug_mode("error"),
                       lambda: torch.cuda.set_sync_debug_mode("default"))
    system = ["--device=cuda", "--dtype=auto", f"--compile={compile}", "--log_interval=3", "--eval_interval=100"]
    try:
        train_pt.main([f"--data_dir={tiny_data['prose']}", f"--out_dir={tmp_path / 'pt'}", "--max_steps=6",
                       "--batch_size=2", "--seq_len=32", "--batch_tokens=128", "--eval_batches=1", *MODEL, *system])
        train_sft.main([f"--data_dir={tiny_data['arithmetic']}", f"--init_from={tmp_path / 'pt'}",
                        f"--out_dir={tmp_path / 'sft'}", "--max_steps=6", "--batch_size=2", "--batch_examples=4",
                        "--seq_len=128", "--eval_examples=2", "--max_new_tokens=4", *system])
    finally:
        torch.cuda.set_sync_debug_mode("default")

@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_process_ddp_equals_one_process(tmp_path, tiny_data):
    args = [f"--data_dir={tiny_data['prose']}", "--hidden_size=64", "--intermediate_size=128",
            "--num_hidden_layers=2", "--num_attention_heads=2", "--num_key_value_heads=1", "--batch_size=2",
            "--seq_len=64", "--batch_tokens=256", "--max_steps=3", "--dtype=float32", "--device=cuda",
            "--eval_interval=100", "--eval_batches=1", "--log_interval=1"]
    losses = {}
    for n in (1, 2):
        out_dir = tmp_path / f"n{n}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port=29533",
                        os.path.join(ROOT, "train_pt.py"), *args, f"--out_dir={out_dir}"], check=True, cwd=ROOT)
        losses[n] = [r["loss"] for r in map(json.loads, open(out_dir / "log.jsonl")) if "loss" in r]
    assert losses[1] == pytest.approx(losses[2], rel=1e-4)

@cuda_only
@pytest.mark.parametrize("shape", [
    dict(),  # bench.py's default: Doge-20M
    dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=6, num_key_value_heads=3),
], ids=["doge-20m", "doge-160m"])
def test_training_speed_against_transformers(shape, capsys):
    argv = [f"--{k}={v}" for k, v in shape.items()] + [
        "--batch_size=8", "--seq_len=2048", "--timed_steps=5", f"--dtypes=float32,{NATIVE}", "--encode=False",
        "--new_tokens=64", "--long_tokens=256", "--rollout_tokens=32"]
    bench.main(argv)
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    assert "train nanodoge" in out and "train transformers" in out
