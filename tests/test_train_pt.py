"""Pre-training: the schedule, exact resume, DDP == one process, DeepSpeed ZeRO-2, and one-line errors."""
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanodoge import checkpoint as ckpt, devices, files, settings, training
import train_pt
from model import Doge, DogeConfig
from conftest import log_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=2", "--num_attention_heads=2",
        "--num_key_value_heads=1", "--batch_size=2", "--seq_len=32", "--batch_tokens=128",
        "--learning_rate=1e-2", "--dtype=float32", "--device=cpu", "--compile=False", "--eval_batches=2",
        "--log_interval=1"]


@pytest.fixture(scope="module")
def data_dir(tiny_data):
    return tiny_data["prose"]


def test_wsd_and_cosine_boundaries():
    schedule = dict(max_steps=100, learning_rate=1.0, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.1,
                    min_lr_rate=0.0, decay_shape="linear")
    lr = lambda step, **kw: training.lr_at(step, SimpleNamespace(**{**schedule, **kw}))
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)  # warmup: 10 steps to the peak
    assert lr(10) == lr(89) == 1.0  # stable
    assert lr(90) == 1.0 and lr(95) == pytest.approx(0.5) and lr(100) == 0.0  # linear decay to min lr
    assert lr(95, decay_shape="sqrt") == pytest.approx(1 - 0.5 ** 0.5)
    assert lr(100, min_lr_rate=0.1) == pytest.approx(0.1)
    assert lr(10, schedule="cosine") == 1.0 and lr(55, schedule="cosine") == pytest.approx(0.5)
    assert lr(100, schedule="cosine", min_lr_rate=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay_shape"):
        lr(95, decay_shape="cubic")


@pytest.mark.parametrize("compile", [False, True])
def test_resume_is_exact(data_dir, tmp_path, compile):
    """Bit for bit, eager and compiled: compiled on a CPU only with deterministic=auto (training.resolve_deterministic)."""
    args = [f"--data_dir={data_dir}", "--max_steps=6", "--eval_interval=100"] + TINY + [f"--compile={compile}"]
    train_pt.main(args + [f"--out_dir={tmp_path}/full"])
    train_pt.main(args + [f"--out_dir={tmp_path}/split", "--ckpt_interval=3", "--keep_last=5"])
    # pretend the run died after step 3: drop the later checkpoint and resume from the step-3 one
    os.remove(f"{tmp_path}/split/ckpt_0000006.pt")
    train_pt.main(args + [f"--out_dir={tmp_path}/split", "--ckpt_interval=3", "--init_from=resume"])
    full, split = log_records(f"{tmp_path}/full", "loss"), log_records(f"{tmp_path}/split", "loss")
    # the resumed run dropped the log records of the steps it redid: one trajectory, the uninterrupted one's
    assert [r["step"] for r in split] == [r["step"] for r in full] == [0, 1, 2, 3, 4, 5]
    assert [r["loss"] for r in full] == [r["loss"] for r in split]
    full_weights = ckpt.load_checkpoint(f"{tmp_path}/full")["model"]
    split_weights = ckpt.load_checkpoint(f"{tmp_path}/split")["model"]
    assert all(torch.equal(full_weights[k], split_weights[k]) for k in full_weights)
    assert full[-1]["loss"] < full[0]["loss"]


def test_compiled_training_is_deterministic_run_to_run(tmp_path):
    """Two compiled runs (training.setup, training.ddp_model, 3 AdamW steps) end in identical weights. 64 rows of a
    16-token vocabulary put each token hundreds of times in every thread's share of the batch: without deterministic
    algorithms the threads' atomic adds into the embedding gradient collide and round in another order each run
    (10 pairs of 10 differed so, on 2 busy cores)."""
    cfg = SimpleNamespace(device="cpu", dtype="float32", compile="True", deterministic="auto", seed=0,
                          out_dir=str(tmp_path))
    run = training.setup(cfg)
    assert run.compile and torch.are_deterministic_algorithms_enabled()
    idx = torch.randint(16, (64, 65), generator=torch.Generator().manual_seed(0))
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Doge(DogeConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1))
        model_to_call, _ = training.ddp_model(run, model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            model_to_call(idx[:, :-1], idx[:, 1:])[1].backward()  # compiled: F.cross_entropy, fused
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_loss_decreases(data_dir, tmp_path):
    train_pt.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_steps=40", "--eval_interval=20",
                   "--learning_rate=2e-2"] + TINY)
    val = log_records(tmp_path, "val_loss")
    train, held_out = (files.read_array(f"{data_dir}/{split}.bin") for split in ("train", "val"))
    unigram = train_pt.unigram_loss(train, held_out, 512)
    assert val[-1]["val_loss"] < val[0]["val_loss"] and val[-1]["val_loss"] < unigram - 0.1
    assert os.path.exists(f"{tmp_path}/hf/config.json")  # the final export


def torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=29533", "train_pt.py"] + args
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_ddp_equals_one_process(data_dir, tmp_path):
    args = [f"--data_dir={data_dir}", "--max_steps=3", "--eval_interval=100"] + TINY
    train_pt.main(args + [f"--out_dir={tmp_path}/one"])
    torchrun(args + [f"--out_dir={tmp_path}/ddp"])
    one, ddp = log_records(f"{tmp_path}/one", "loss"), log_records(f"{tmp_path}/ddp", "loss")
    for a, b in zip(one, ddp):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def test_deepspeed_zero2_matches_ddp_and_resumes_exactly(data_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    args = [f"--data_dir={data_dir}", "--max_steps=3", "--eval_interval=100"] + TINY
    zero2 = ["--backend=deepspeed", "--zero_stage=2", "--ckpt_interval=2", "--keep_last=5"]
    torchrun(args + [f"--out_dir={tmp_path}/ddp"])
    torchrun(args + zero2 + [f"--out_dir={tmp_path}/zero2"])
    ddp, ds = log_records(f"{tmp_path}/ddp", "loss"), log_records(f"{tmp_path}/zero2", "loss")
    assert len(ds) == 3
    for a, b in zip(ddp, ds):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    # the ckpt file holds the full fp32 weights rebuilt from the shards: later stages read it as any other
    final = ckpt.load_checkpoint(f"{tmp_path}/zero2")["model"]
    assert final["lm_head.weight"].dtype == torch.float32 and not torch.equal(final["lm_head.weight"],
                                                                               ckpt.load_checkpoint(f"{tmp_path}/zero2/ckpt_0000002.pt")["model"]["lm_head.weight"])
    # as if killed after step 2 (in a copy of the out dir): resuming restores the engine's sharded optimizer
    # from beside the checkpoint and repeats step 3 exactly
    shutil.copytree(f"{tmp_path}/zero2", f"{tmp_path}/resumed")
    os.remove(f"{tmp_path}/resumed/ckpt_0000003.pt")
    torchrun(args + zero2 + [f"--out_dir={tmp_path}/resumed", "--init_from=resume"])
    assert [r["loss"] for r in log_records(f"{tmp_path}/resumed", "loss")] == [r["loss"] for r in ds]
    resumed = ckpt.load_checkpoint(f"{tmp_path}/resumed")["model"]
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_one_line_errors(data_dir, tmp_path):
    base = [f"--out_dir={tmp_path}/run", "--max_steps=2"] + TINY
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        train_pt.main(base + [f"--data_dir={tmp_path}/missing"])
    with pytest.raises(ValueError, match="unknown config key 'learnin_rate'"):
        train_pt.main(base + [f"--data_dir={data_dir}", "--learnin_rate=1"])
    truncated = tmp_path / "truncated"
    shutil.copytree(data_dir, truncated)
    with open(truncated / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "train.bin") - 10)
    with pytest.raises(ValueError, match="truncated"):
        train_pt.main(base + [f"--data_dir={truncated}"])
    with pytest.raises(ValueError, match=r"holds token id \d+ but the model's vocabulary has 100"):
        train_pt.main(base + [f"--data_dir={data_dir}", "--vocab_size=100"])  # checked once, from the file
    train_pt.main(base + [f"--data_dir={data_dir}"])
    with pytest.raises(ValueError, match="another shape"):
        train_pt.main(base + [f"--data_dir={data_dir}", "--init_from=resume", "--hidden_size=64"])
    # the CLI prints one line, not a traceback
    result = subprocess.run([sys.executable, "train_pt.py", "--no_such_key=1"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "unknown config key" in result.stderr


def test_sigterm_saves_and_exits_then_resumes(data_dir, tmp_path):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint is saved, the process exits 0; resume goes on."""
    args = [sys.executable, "train_pt.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_steps=100000",
            "--eval_interval=100000", "--ckpt_interval=100000"] + TINY
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("step 3 "):
            process.send_signal(signal.SIGTERM)
            break
    output = process.stdout.read()
    assert process.wait(timeout=60) == 0, output
    assert "stopped by signal" in output
    step = ckpt.load_checkpoint(str(tmp_path))["step"]
    assert step >= 4
    train_pt.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--init_from=resume", f"--max_steps={step + 2}",
                   "--eval_interval=100000"] + TINY)
    assert ckpt.load_checkpoint(str(tmp_path))["step"] == step + 2


def test_nan_loss_stops_with_last_good_checkpoint(data_dir, tmp_path):
    """An absurd learning rate blows the weights up: the run stops with one line, the last checkpoint loads."""
    args = [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_steps=50", "--ckpt_interval=1",
            "--eval_interval=1000", "--warmup_ratio=0", "--grad_clip=1e30"] + TINY
    with pytest.raises(ValueError, match="stopping; the last good checkpoint"):
        train_pt.main(args + ["--learning_rate=1e30"])
    checkpoint = ckpt.load_checkpoint(str(tmp_path))
    assert 1 <= checkpoint["step"] < 50


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})

    def dies_halfway(obj, path):
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    # a process killed outright leaves its temp file behind: it must never be taken for a checkpoint
    open(tmp_path / "ckpt_0000003.pt.tmp999", "wb").write(b"half")
    assert ckpt.checkpoint_paths(tmp_path) == [os.path.join(tmp_path, "ckpt_0000001.pt")]
    assert ckpt.load_checkpoint(str(tmp_path))["step"] == 1


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "config"))))
def test_config_files_hold_only_known_keys(name):
    """Every config file loads in its script (no unknown key, no wrong type), and the pre-training recipes'
    batch divides into micro-batches on 1 and 8 processes."""
    import train_dpo, train_grpo, train_sft
    script = {"doge": train_pt, "sft": train_sft, "dpo": train_dpo, "grpo": train_grpo}[name.split("_")[0]]
    cfg = settings.load_config(script.DEFAULTS, [os.path.join(ROOT, "config", name)])
    if script is train_pt:
        for world_size in (1,) if name == "doge_tiny.py" else (1, 8):
            assert training.grad_accum_steps(cfg.batch_tokens, cfg.batch_size * cfg.seq_len, world_size) >= 1

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_torch_with_its_gradient(dtype):
    """The training loss (training.ChunkedCrossEntropy: chunks of rows, logsumexp kept, softmax - onehot written once) against
    F.cross_entropy on the float32 logits: value and gradient, rows not a multiple of a chunk, ignored rows (-1:
    the padding of SFT's scored rows) adding nothing."""
    torch.manual_seed(0)
    logits = (torch.randn(77, 50) * 3).to(dtype).requires_grad_()
    targets = torch.randint(50, (77,))
    targets[::5] = -1
    ours = training.ChunkedCrossEntropy.apply(logits, targets)
    (ours_grad,) = torch.autograd.grad(ours * 3, logits)
    torch_loss = F.cross_entropy(logits.float(), targets, ignore_index=-1)
    (torch_grad,) = torch.autograd.grad(torch_loss * 3, logits)
    assert abs(ours.item() - torch_loss.item()) <= 1e-5
    assert ours_grad.dtype == dtype and (ours_grad.float() - torch_grad.float()).abs().max() <= 1e-6

def test_no_sync_engages_under_compile_and_ddp(monkeypatch):
    """With compile and DDP the outer module is the DDP instance (compiled first, then wrapped), so the loop's
    no_sync() skips the gradient all-reduce of every micro-step but the last: counted here with a comm hook."""
    import torch.distributed as dist
    from types import SimpleNamespace
    from torch.nn.parallel import DistributedDataParallel as DDP
    from model import Doge, DogeConfig
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    try:
        raw = Doge(DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1))
        run = SimpleNamespace(world_size=2, device=torch.device("cpu"), local_rank=0, dtype="float32", compile=True)
        model, _ = training.ddp_model(run, raw)
        assert isinstance(model, DDP) and not model.broadcast_buffers
        all_reduces = []
        def counting_hook(state, bucket):
            all_reduces.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future
        model.register_comm_hook(None, counting_hook)
        idx = torch.randint(97, (2, 9))
        with model.no_sync():  # micro-step 1 of 2
            model(idx[:, :-1], idx[:, 1:])[1].backward()
        assert all_reduces == []
        model(idx[:, :-1], idx[:, 1:])[1].backward()  # the last micro-step
        assert all_reduces
    finally:
        dist.destroy_process_group()

def test_dtype_auto_is_native_per_device(monkeypatch):
    """auto: bf16 only where the CPU computes it (AVX-512 BF16, AMX), float32 on others; an explicit bfloat16
    on a CPU that would emulate it is kept, with a one-line warning. Every script defaults to auto."""
    import importlib
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_dtype("auto", cpu)[0] == "float32"
    dtype, line = devices.resolve_dtype("bfloat16", cpu)
    assert dtype == "bfloat16" and line.startswith("warning:") and "emulated" in line and "\n" not in line
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_dtype("auto", cpu) == ("bfloat16", "dtype auto: bfloat16 (this CPU has bf16 instructions "
                                                              "(AVX-512 BF16 or AMX))")
    with pytest.raises(ValueError, match="dtype must be"):
        devices.resolve_dtype("fp8", cpu)
    for script in ("train_pt", "train_sft", "train_dpo", "train_grpo", "sample"):
        assert importlib.import_module(script).DEFAULTS["dtype"] == "auto", script
    for name in os.listdir(os.path.join(ROOT, "config")):
        assert "\ndtype" not in "\n" + open(os.path.join(ROOT, "config", name)).read(), name  # auto, not fixed


def test_mfu_stays_at_most_one_when_the_peak_was_measured_on_a_busy_start():
    peak = devices.MatmulPeak(torch.device("cpu"), "float32")
    measured = peak.flops
    peak.flops = measured / 10  # as if another process had held the CPU while it was measured
    assert peak.mfu(measured / 2) <= 1.0 and peak.flops > measured / 10  # a step outran it: measured again
    assert peak.mfu(100 * measured) == 1.0  # the device ran that fast, so that is its peak
