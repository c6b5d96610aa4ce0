"""
Devices, processes and precision: the process group from torchrun's environment, the dtype a device computes
natively, autocast, and the matmul peak that MFU is measured against.
"""
import os
import time
import contextlib
from types import SimpleNamespace

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# devices, processes, precision

def setup_distributed(device="auto"):
    """One process, or one of many under torchrun (nccl on GPUs, gloo on CPUs; torchrun's own flags
    take it across nodes). Rank 0 is the master: it alone writes files and logs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else \
                 "mps" if torch.backends.mps.is_available() else "cpu"
    rank, local_rank, world_size = 0, 0, 1
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size,
                           device=torch.device(device), master=rank == 0)

def cpu_has_native_bf16():
    """True where the CPU computes bfloat16 matmuls in hardware (AVX-512 BF16 or AMX), as inductor checks it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

def native_dtype(device):
    """(the dtype the device trains fastest in, why): bf16 where it is computed in hardware, else fp16 with a
    GradScaler on a GPU, else float32 (a CPU without AVX-512 BF16 or AMX emulates bf16, many times slower)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "this GPU computes bf16"
        return "float16", "this GPU has no bf16: float16 with a GradScaler"
    if device.type == "mps":
        if torch.backends.mps.is_macos_or_newer(14, 0):
            return "bfloat16", "MPS computes bf16 from macOS 14"
        return "float32", "MPS before macOS 14 has no bf16"
    if cpu_has_native_bf16():
        return "bfloat16", "this CPU has bf16 instructions (AVX-512 BF16 or AMX)"
    return "float32", f"this CPU has no bf16 instructions ({torch.backends.cpu.get_cpu_capability()}): bf16 would be emulated"

def resolve_dtype(dtype, device):
    """(the training dtype to use, a line that says why): dtype="auto" is native_dtype's choice; an explicit
    bfloat16 on a device that emulates it is kept, with a warning; bf16 becomes fp16 on GPUs without it."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    native, why = native_dtype(device)
    if dtype == "auto":
        return native, f"dtype auto: {native} ({why})"
    if dtype == "bfloat16" and device.type == "cuda" and native == "float16":
        return "float16", f"dtype float16 instead of bfloat16 ({why})"
    if dtype == "bfloat16" and native == "float32":
        return dtype, f"warning: dtype bfloat16 asked for, but {why}: --dtype=auto picks float32"
    return dtype, f"dtype {dtype}"

def autocast(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in dtype."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))

def synchronize(device):
    """Wait for the device's queued work (GPU kernels run asynchronously: a timer must wait for them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

def measure_peak_flops(device, dtype, seconds=0.5):
    """The device's achievable matmul FLOP/s in dtype, measured (not a datasheet number): MFU's denominator.
    Back-to-back large matmuls (4096 on a GPU, 1024 on a CPU) timed in windows of four, so the launch latency of
    each is hidden as in a training step; the fastest window counts, so a moment of load from another process
    does not lower the figure (a load that lasts the whole half second does: MatmulPeak measures again)."""
    size = 1024 if device.type == "cpu" else 4096
    torch_dtype = getattr(torch, dtype)
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    a @ b  # warm up
    synchronize(device)
    fastest, begin = float("inf"), time.perf_counter()
    while time.perf_counter() - begin < seconds:
        window = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - window)
    return 2 * size ** 3 * 4 / fastest

class MatmulPeak:
    """MFU against the matmul peak measured at the start, which a busy start understates (MFU then reads above
    100%): whenever the training runs faster than the peak, the peak is measured again, and where the device
    still ran faster than that measure, what it ran is its peak. So MFU never exceeds 100%."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.flops = measure_peak_flops(device, dtype)

    def mfu(self, flops_per_second):
        if flops_per_second > self.flops:
            self.flops = max(measure_peak_flops(self.device, self.dtype), flops_per_second)
        return flops_per_second / self.flops
