"""The training step as the device sees it: the micro-steps of pre-training, SFT and DPO read nothing back to the
host (counted with a TorchDispatchMode on the CPU; tests/test_device.py runs the same under CUDA's sync debug
mode), the training forward with targets compiles to one graph without recompiling per batch, compile=auto's
and deterministic=auto's choices, and compiled generation gives the eager tokens."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanodoge import devices, post_training, training
import train_dpo
import train_grpo
import train_pt
import train_sft
from nanodoge.engine import Engine
from model import Doge, DogeConfig

MODEL = ["--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=2", "--num_attention_heads=2",
         "--num_key_value_heads=1", "--max_position_embeddings=256", "--keep_window_size=256"]
SYSTEM = ["--device=cpu", "--dtype=float32", "--compile=False", "--log_interval=3", "--eval_interval=100"]

# what reads a value back to the host: .item(), bool(tensor), and shapes the data decides (nonzero, a boolean index)
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select"}


class HostReads(TorchDispatchMode):
    """Counts the ops dispatched while .counting is on, and records those that read a value back to the host."""
    def __init__(self):
        super().__init__()
        self.counting, self.ops, self.reads = False, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            name = func._schema.name.split("::")[-1]
            self.ops += 1
            boolean_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                    for i in (args[1] if len(args) > 1 else []))
            if name in HOST_READS or boolean_index:
                self.reads.append(name)  # a boolean index shows as index: its nonzero runs inside it
        return func(*args, **(kwargs or {}))


def micro_step_windows(monkeypatch, enter, leave):
    """Call enter() when a step's micro-steps begin (after training.lr_at) and leave() when they end (when the
    optimizer part begins: scaler.unscale_, then clip), in every stage's loop."""
    lr_at, unscale = training.lr_at, torch.amp.GradScaler.unscale_

    def lr_at_then_enter(*args):
        lr = lr_at(*args)
        enter()
        return lr

    def leave_then_unscale(self, optimizer):
        leave()
        return unscale(self, optimizer)
    monkeypatch.setattr(training, "lr_at", lr_at_then_enter)
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", leave_then_unscale)


@contextlib.contextmanager
def counted_micro_steps(monkeypatch):
    mode = HostReads()

    def enter():
        mode.counting = True

    def leave():
        mode.counting = False
    micro_step_windows(monkeypatch, enter, leave)
    with mode:
        yield mode


def test_the_counter_sees_host_reads():
    """The counter itself: .item(), a Python if on a tensor and a boolean selection are what it must catch."""
    with HostReads() as mode:
        mode.counting = True
        x = torch.randn(8)
        x.sum().item()
        bool(x.sum() > 0)
        x[x > 0]
    assert mode.reads.count("_local_scalar_dense") == 2 and "index" in mode.reads


def test_micro_steps_read_nothing_back(tiny_data, tmp_path, monkeypatch):
    """6 steps of 2 micro-steps each of pre-training, SFT (the scored rows padded on the host) and DPO: every op of
    every micro-step stays on the device, logging steps included (the loss is read after the micro-steps)."""
    pt_args = [f"--data_dir={tiny_data['prose']}", f"--out_dir={tmp_path / 'pt'}", "--max_steps=6", "--batch_size=2",
               "--seq_len=32", "--batch_tokens=128", "--eval_batches=1", *MODEL, *SYSTEM]
    post_args = [f"--data_dir={tiny_data['arithmetic']}", f"--init_from={tmp_path / 'pt'}", "--max_steps=6",
                 "--batch_size=2", "--batch_examples=4", "--seq_len=128", "--eval_examples=2", *SYSTEM]
    for name, main, args in [("pre-training", train_pt.main, pt_args),
                             ("SFT", train_sft.main, post_args + [f"--out_dir={tmp_path / 'sft'}", "--max_new_tokens=4"]),
                             ("DPO", train_dpo.main, post_args + [f"--out_dir={tmp_path / 'dpo'}"])]:
        with monkeypatch.context() as patch, counted_micro_steps(patch) as mode:
            main(args)
        assert mode.ops > 100, f"{name}: the micro-steps were not counted"
        assert mode.reads == [], f"{name}: the micro-steps read back to the host: {mode.reads}"


def tiny_model():
    torch.manual_seed(0)
    return Doge(DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def test_training_forward_compiles_to_one_graph_without_recompiling_per_batch():
    """fullgraph=True: a graph break is an error. Batches of 4 lengths with 4 numbers of scored rows: the first
    compile is for the first shape, the second (when the shape changes) makes the sizes symbolic, and no later
    batch compiles again."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    torch._dynamo.reset()
    model = tiny_model().train()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    for T, ignored in [(16, 0.5), (24, 0.3), (20, 0.7), (28, 0.4)]:
        idx = torch.randint(97, (2, T))
        targets = idx.masked_fill(torch.rand(2, T) < ignored, -1)
        _, loss = compiled(idx, targets, scored=post_training.scored_positions(targets, bucket=8))
        loss.backward()
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} compiles for 4 batches"


def test_compile_auto_is_on_where_bench_measured_it_faster(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert training.resolve_compile("auto", cpu) == (False, "compile auto: off (AVX2: eager measured as fast)")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert training.resolve_compile("auto", cpu)[0] is True
    assert training.resolve_compile("auto", torch.device("cuda"))[0] is True
    assert training.resolve_compile("False", torch.device("cuda"))[0] is False  # --compile=False, as typed
    assert training.resolve_compile("True", cpu)[0] is True
    with pytest.raises(ValueError, match="compile must be auto, True or False"):
        training.resolve_compile("yes", cpu)
    for script in (train_pt, train_sft, train_dpo):
        assert script.DEFAULTS["compile"] == "auto"


def test_deterministic_auto_is_on_for_compiled_training_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training.resolve_deterministic("auto", cpu, compiled=True) == (True, "deterministic auto: on (compiled on a CPU)")
    assert training.resolve_deterministic("auto", cpu, compiled=False)[0] is False  # eager CPU kernels already are
    assert training.resolve_deterministic("auto", cuda, compiled=True)[0] is False  # it costs speed there
    assert training.resolve_deterministic("True", cuda, compiled=True)[0] is True  # --deterministic=True, as typed
    assert training.resolve_deterministic("False", cpu, compiled=True)[0] is False
    with pytest.raises(ValueError, match="deterministic must be auto, True or False"):
        training.resolve_deterministic("yes", cpu, compiled=True)
    for script in (train_pt, train_sft, train_dpo, train_grpo):
        assert script.DEFAULTS["deterministic"] == "auto"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_generation_gives_the_eager_tokens(dtype):
    """Engine(compile=True) decodes on plain weights (oneDNN's packed bf16 layout is eager-only): greedy tokens
    equal to the eager engine's, in float32 and, where the CPU computes it, bfloat16."""
    if dtype == "bfloat16" and not devices.cpu_has_native_bf16():
        pytest.skip(f"this CPU emulates bfloat16 ({torch.backends.cpu.get_cpu_capability()})")
    model = tiny_model().eval()
    idx = torch.randint(97, (2, 5))
    with devices.autocast(torch.device("cpu"), dtype):
        eager = Engine(model).generate(idx, 12, temperature=0.0)
        compiled = Engine(model, compile=True).generate(idx, 12, temperature=0.0)
    assert torch.equal(compiled, eager)


def test_moe_training_forward_compiles_to_one_graph():
    """The MoE forward with targets (product-key routing and the load-balancing loss) has no data-dependent shape
    either: one graph under fullgraph=True, equal to eager."""
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, is_moe=True, num_experts=16,
                            num_experts_per_tok=4)).train()
    idx = torch.randint(97, (2, 12))
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    torch._dynamo.reset()
    _, loss = torch.compile(model, backend=counting_backend, fullgraph=True)(idx, idx)
    assert len(graphs) == 1 and abs(loss.item() - model(idx, idx)[1].item()) <= 1e-6
