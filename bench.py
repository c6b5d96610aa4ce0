"""
Speed of model.py (training) and nanodoge/engine.py (generation) against transformers' DogeForCausalLM, measured in
the same run: training-step tokens/s and MFU (fwd + bwd + AdamW) in float32 and, where the device computes it
natively, under bfloat16 autocast, eagerly and with --compile; greedy generation tokens/s (batch 1) and time to
first token for a long prompt. Each speed trick has its row beside the plain path it replaces: the chunked
training loss against F.cross_entropy, the Engine against model.generate; and the compiled step has its row with
the deterministic setting that deterministic=auto does not pick (training.resolve_deterministic): what exact
resume costs. MFU is against a peak measured here (back-to-back large matmuls in the same dtype), not a
datasheet number. GPU timers synchronize.

    python bench.py                         # Doge-20M shape, B=8, T=512
    python bench.py --compile=True          # also torch.compile rows where auto leaves them out (about a minute
                                            # per dtype on a cold cache); --compile=False: eager rows only
    python bench.py --dtypes=float32 --reference=False
    python bench.py --startup=True          # each stage's start on recipe-sized data against the offline default's
"""
import os
import sys
import time
import shutil
import tempfile
import statistics
import subprocess

import numpy as np
import torch

from nanodoge import dataset_rows, devices, files, settings
from nanodoge.engine import Engine
from model import Doge, DogeConfig
from nanodoge.training import training_cross_entropy, resolve_compile, resolve_deterministic

DEFAULTS = dict(
    # model shape (Doge-20M)
    vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=2,
    num_key_value_heads=1, tie_word_embeddings=True,
    # training step
    batch_size=8, seq_len=512, warmup_steps=1, timed_steps=5, dtypes="float32,bfloat16",
    compile="auto",  # compiled rows beside the eager ones where training compiles by default (training.resolve_compile)
    # generation: greedy batch 1; GRPO-style rollouts (sampled, rollout_batch rows); the cost of a decode step
    # early and late in a long completion (constant with the KV cache, up to keep_window_size)
    new_tokens=128, prompt_len=16, ttft_prompt_len=512, generation_rounds=3, rollout_batch=64, rollout_tokens=96, long_tokens=1024,
    # tokenizer encoding throughput on the Shakespeare corpus (prepare_data.py's default)
    encode=True,
    # system
    device="auto", seed=1337, reference=True,  # reference: also measure transformers' DogeForCausalLM
    # instead of the above: seconds and peak RSS of each stage's start and first step on recipe-sized data (made
    # sparse from the offline default's: prepare it first) against the same on the offline default's
    startup=False, data_root="data",
)
MODEL_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "tie_word_embeddings"]

def reference_model(config):
    """transformers' DogeForCausalLM (sdpa attention) with the same weights as our model."""
    from transformers import DogeConfig as HFDogeConfig, DogeForCausalLM
    hf_config = HFDogeConfig.from_dict(config.to_hf_dict())
    return DogeForCausalLM(hf_config)

def time_training(runs, cfg, device, dtype):
    """Tokens/s of full optimizer steps (forward, backward, AdamW) on random tokens for each (label, module,
    loss_fn, deterministic) of runs, each step under torch's deterministic algorithms or not: their steps
    interleaved so that every run meets the same machine, and the median step of each, as a shared machine's
    noise moves single steps by tens of percent."""
    idx = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)
    sync = lambda: devices.synchronize(device)
    optimizers = [torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type == "cuda") for _, module, *_ in runs]
    seconds = [[] for _ in runs]
    for step in range(cfg.warmup_steps + cfg.timed_steps):
        for (label, module, loss_fn, deterministic), optimizer, times in zip(runs, optimizers, seconds):
            torch.use_deterministic_algorithms(deterministic)  # a compiled module recompiles for each setting once
            sync()
            start = time.perf_counter()
            with devices.autocast(device, dtype):
                loss = loss_fn(module, idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
            if step < cfg.warmup_steps:
                print(f"  {label}: warm-up step {step} done (loss {loss.item():.3f})", flush=True)
    return [cfg.batch_size * cfg.seq_len / statistics.median(times[cfg.warmup_steps:]) for times in seconds]

def ours_loss(cross_entropy):
    return lambda model, idx: model(idx[:, :-1], idx[:, 1:], cross_entropy=cross_entropy)[1]

def reference_loss(model, idx):
    return model(input_ids=idx[:, :-1], labels=idx[:, :-1]).loss  # labels are shifted inside

def time_call(fn, device):
    devices.synchronize(device)
    start = time.perf_counter()
    fn()
    devices.synchronize(device)
    return time.perf_counter() - start

def time_generation(generators, cfg, device):
    """For each generate(prompt, n) function: (greedy tokens/s for new_tokens after a prompt_len prompt, seconds
    to the first token after a ttft_prompt_len prompt), batch 1. The functions take turns for
    generation_rounds rounds, so each meets the same machine, and each keeps its best round (noise only slows)."""
    prompt = torch.randint(cfg.vocab_size, (1, cfg.prompt_len), device=device)
    long_prompt = torch.randint(cfg.vocab_size, (1, cfg.ttft_prompt_len), device=device)
    for generate in generators:
        generate(prompt, 4)  # warm up
    seconds = [[] for _ in generators]
    ttft = [[] for _ in generators]
    for _ in range(cfg.generation_rounds):
        for generate, times, first in zip(generators, seconds, ttft):
            times.append(time_call(lambda: generate(prompt, cfg.new_tokens), device))
            first.append(time_call(lambda: generate(long_prompt, 1), device))
    return [(cfg.new_tokens / min(times), min(first)) for times, first in zip(seconds, ttft)]

def time_decode_steps(engine, cfg, device):
    """Milliseconds per decode step (batch 1, greedy) over the first 128 new tokens and the last 128 of
    long_tokens, and of one forward pass over long_tokens tokens: what each step would cost without the KV cache."""
    prompt = torch.randint(cfg.vocab_size, (1, cfg.prompt_len), device=device)
    stamps = [time.perf_counter()]
    for next_ids in engine.generate_stream(prompt, cfg.long_tokens, temperature=0.0):
        next_ids.cpu()  # the step's token on the host: the step is done
        stamps.append(time.perf_counter())
    early = (stamps[129] - stamps[1]) / 128
    late = (stamps[-1] - stamps[-129]) / 128
    with torch.inference_mode():
        recompute = time_call(lambda: engine.model(torch.randint(cfg.vocab_size, (1, cfg.long_tokens), device=device)),
                              device)
    return early * 1e3, late * 1e3, recompute * 1e3

def time_rollouts(engine, cfg, device, dtype):
    """Completion tokens/s of GRPO-style rollouts: rollout_batch rows sampled at temperature 1 under autocast."""
    prompts = torch.randint(cfg.vocab_size, (cfg.rollout_batch, cfg.prompt_len), device=device)
    with devices.autocast(device, dtype):
        engine.generate(prompts, 4)  # warm up
        seconds = time_call(lambda: engine.generate(prompts, cfg.rollout_tokens, temperature=1.0), device)
    return cfg.rollout_batch * cfg.rollout_tokens / seconds

def time_encoding():
    """Tokens/s of encoding Shakespeare's complete works with sentencepiece (8k BPE) and GPT-2 (tiktoken)."""
    from nanodoge import tokenizer as tk
    documents, _ = dataset_rows.shakespeare_documents()
    results = {}
    for name, tok in [("sentencepiece 8k", tk.train_sentencepiece(documents, 8192)),
                      ("gpt2 (tiktoken)", tk.Tokenizer({"kind": "tiktoken", "name": "gpt2"}))]:
        tok.encode_batch(documents[:2])  # warm up
        start = time.perf_counter()
        count = sum(map(len, tok.encode_batch(documents)))
        results[name] = count / (time.perf_counter() - start)
    return results

def main(argv=None):
    cfg = settings.load_config(DEFAULTS, argv)
    if cfg.startup:
        return time_startups(cfg.data_root)
    device = devices.setup_distributed(cfg.device).device
    torch.manual_seed(cfg.seed)
    config = DogeConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS})
    model = Doge(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.flops_per_token(cfg.seq_len)
    print(f"Doge: {n_params / 1e6:.1f}M parameters, {flops_per_token / 1e6:.0f} MFLOP per training token at "
          f"T={cfg.seq_len}; {torch.get_num_threads()} threads on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else torch.backends.cpu.get_cpu_capability()})")
    compiled, why = resolve_compile(cfg.compile, device)
    deterministic_auto, deterministic_why = resolve_deterministic("auto", device, compiled=True)
    other = f"nanodoge deterministic={not deterministic_auto}"  # the compiled row with the setting auto did not pick
    print(f"{why} | compiled training: {deterministic_why}")
    reference = None
    if cfg.reference:
        try:
            reference = reference_model(config).to(device)
            reference.load_state_dict(model.state_dict(), strict=False)  # lm_head is tied when the config ties
        except ImportError:
            print("transformers is not installed: measuring nanodoge only")

    results, peaks = {}, {}  # (who, dtype, compiled) -> tokens/s; dtype -> matmul FLOP/s
    native, why = devices.native_dtype(device)
    for dtype in cfg.dtypes.split(","):
        if dtype != "float32" and dtype != native:
            print(f"skipping {dtype}: {why}")
            continue
        peaks[dtype] = peak = devices.measure_peak_flops(device, dtype)
        print(f"{dtype}: measured matmul peak {peak / 1e9:.0f} GFLOP/s")
        # the loss the training loop uses on this device, and, where that is the chunked one, the plain one
        runs = {("nanodoge", dtype, False): (model, ours_loss(training_cross_entropy(device, compiled=False)), False)}
        if training_cross_entropy(device, compiled=False) is not None:
            runs[("nanodoge F.cross_entropy", dtype, False)] = (model, ours_loss(None), False)
        if compiled:  # as the training scripts compile it, and with the other deterministic setting: what auto's costs
            compiled_model = torch.compile(model, fullgraph=True)
            runs[("nanodoge", dtype, True)] = (compiled_model, ours_loss(None), deterministic_auto)
            runs[(other, dtype, True)] = (compiled_model, ours_loss(None), not deterministic_auto)
        if reference is not None:
            runs[("transformers", dtype, False)] = (reference, reference_loss, False)
        labels = [f"{who} {dtype}{' compiled' if compiled else ''}" for who, dtype, compiled in runs]
        rates = time_training([(label, *run) for label, run in zip(labels, runs.values())], cfg, device, dtype)
        for key, label, tokens_per_s in zip(runs, labels, rates):
            results[key] = tokens_per_s
            print(f"train {label:45s} {tokens_per_s:8.0f} tokens/s  MFU {flops_per_token * tokens_per_s / peak:6.1%}")
        if compiled:
            ratio = results[("nanodoge", dtype, True)] / results[(other, dtype, True)]
            print(f"train {dtype} compiled, deterministic={deterministic_auto} (auto) / {not deterministic_auto}: "
                  f"{ratio:.2f}x")
    torch.use_deterministic_algorithms(False)  # generation below runs eager, as sample.py does

    model.eval()
    dtypes = sorted({dtype for _, dtype, _ in results}, reverse=True)  # float32 first; those not skipped
    engine = Engine(model)
    generators = {}  # (who, dtype, compiled) -> generate(prompt, n)
    for dtype in dtypes:
        generators[("nanodoge", dtype, False)] = lambda p, n: engine.generate(p, n, temperature=0.0)
        generators[("nanodoge model.generate", dtype, False)] = lambda p, n: model.generate(p, n, temperature=0.0)
        if compiled:  # as sample.py --compile does it
            compiled_engine = Engine(model, compile=True)
            generators[("nanodoge", dtype, True)] = lambda p, n: compiled_engine.generate(p, n, temperature=0.0)
        if reference is not None:
            def reference_generate(prompt, n):
                with torch.no_grad():
                    return reference.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                                     min_new_tokens=n, do_sample=False, pad_token_id=0)
            generators[("transformers", dtype, False)] = reference_generate
    generation = {}  # (who, dtype, compiled) -> (greedy tokens/s, seconds to the first token)
    for dtype in dtypes:
        keys = [key for key in generators if key[1] == dtype]
        with devices.autocast(device, dtype):
            generation.update(zip(keys, time_generation([generators[key] for key in keys], cfg, device)))
        for (who, _, compiled) in keys:
            rate, ttft = generation[(who, dtype, compiled)]
            label = f"{who} {dtype}{' compiled' if compiled else ''}"
            print(f"generate {label:32s} {rate:8.1f} tokens/s   time to first token ({cfg.ttft_prompt_len}-token "
                  f"prompt) {ttft * 1e3:7.1f} ms", flush=True)
    early_ms, late_ms, recompute_ms = time_decode_steps(engine, cfg, device)
    print(f"decode step (batch 1)  {early_ms:8.2f} ms over new tokens 1-128, {late_ms:.2f} ms over "
          f"{cfg.long_tokens - 127}-{cfg.long_tokens}; without the KV cache a step there would cost {recompute_ms:.0f} ms")
    rollout_dtype = dtypes[-1]
    rollout_rate = time_rollouts(engine, cfg, device, rollout_dtype)
    print(f"rollouts nanodoge      {rollout_rate:8.0f} completion tokens/s ({cfg.rollout_batch} rows x "
          f"{cfg.rollout_tokens} sampled tokens, {rollout_dtype} autocast)", flush=True)
    if cfg.encode:
        for name, rate in time_encoding().items():
            print(f"encode {name:16s} {rate / 1e6:8.2f} M tokens/s (Shakespeare, {torch.get_num_threads()} threads)")
    if reference is not None:
        print("\nratios, nanodoge / transformers (same run):")
        for (who, dtype, compiled), tokens_per_s in results.items():
            if who.startswith("nanodoge"):
                like = results.get(("transformers", dtype, False))
                fp32 = results.get(("transformers", "float32", False))
                line = f"  train {who[9:] + ' ' if who != 'nanodoge' else ''}{dtype}{' compiled' if compiled else ''}: " \
                       f"{tokens_per_s / like:.2f}x like-for-like"
                if dtype != "float32" and fp32:
                    line += f", {tokens_per_s / fp32:.2f}x transformers float32"
                print(line)
        ref_fp32 = generation.get(("transformers", "float32", False))
        for (who, dtype, compiled), (rate, ttft) in generation.items():
            if not who.startswith("nanodoge"):
                continue
            ref_rate, ref_ttft = generation[("transformers", dtype, False)]
            print(f"  generate {who[9:] + ' ' if who != 'nanodoge' else ''}{dtype}{' compiled' if compiled else ''}: "
                  f"{rate / ref_rate:.2f}x tokens/s"
                  f"{f' ({rate / ref_fp32[0]:.1f}x its float32)' if dtype != 'float32' and ref_fp32 else ''}, "
                  f"time to first token {ref_ttft / ttft:.1f}x faster")

# -----------------------------------------------------------------------------
# starting on recipe-sized data: sparse files (a valid header, zeros past the real content) of the recipes' sizes

def sparse_array(path, real, count):
    """An array file of `count` items whose first items are `real` and the rest zeros never written."""
    real = np.asarray(real)
    with open(path, "wb") as f:
        f.write(files.array_header(real.dtype, count, int(real.max())).tobytes())
        f.write(real[:count].tobytes())
        f.truncate(files.HEADER_INTS * 4 + count * real.dtype.itemsize)

def tiled_ragged(prefix, source, n, length=16):
    """A ragged set of n examples: source's, then examples of `length` tokens (ids 0, every position after the
    first a target) up to n."""
    tokens, mask, offsets = files.read_ragged(source)
    first = np.asarray(files.first_targets(source))
    extra = n - len(first)
    new_offsets = np.concatenate([offsets, offsets[-1] + length * np.arange(1, extra + 1)]).astype(np.int64)
    sparse_array(f"{prefix}.tokens.bin", np.asarray(tokens), int(new_offsets[-1]))
    files.write_array(f"{prefix}.mask.bin", np.concatenate([mask, np.tile(np.r_[0, np.ones(length - 1)], extra)
                                                             .astype(np.uint8)]))
    files.write_array(f"{prefix}.offsets.bin", new_offsets)
    files.write_array(f"{prefix}.first_target.bin", np.concatenate([first, np.ones(extra, np.int64)]))

def tiled_jsonl(path, source, n):
    """A .jsonl set of n rows (source's, repeated) with its line index, as prepare_data.py writes them."""
    content = open(source, "rb").read()
    lengths = np.array([len(line) for line in content.splitlines(keepends=True)], dtype=np.int64)
    copies, rest = divmod(n, len(lengths))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(content)
        f.write(content[:lengths[:rest].sum()])
    files.write_array(files.jsonl_index_path(str(path)), np.concatenate([[0], np.cumsum(np.resize(lengths, n))]))

def recipe_sized(source, target, tokens=None, examples=None):
    """A copy of a prepared data dir whose train sets hold `tokens` tokens (pre-training) or `examples`
    conversations, pairs and prompts (post-training)."""
    shutil.copytree(source, target)
    if tokens:
        sparse_array(os.path.join(target, "train.bin"), files.read_array(os.path.join(source, "train.bin")), tokens)
    if examples:
        for prefix in ("sft_train", "dpo_train.chosen", "dpo_train.rejected"):
            tiled_ragged(os.path.join(target, prefix), os.path.join(source, prefix), examples)
        tiled_jsonl(os.path.join(target, "grpo_train.jsonl"), os.path.join(source, "grpo_train.jsonl"), examples)
    return target

def run_measured(command):
    """(wall seconds, peak RSS bytes) of a child process."""
    begin = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise RuntimeError(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - begin, usage.ru_maxrss * 1024

def time_startups(data_root):
    """Each stage from a cold start through its first optimizer step (a tiny model, so what grows is the data's
    share): on the offline default's data and on copies of the recipes' sizes."""
    tiny = ["--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=2", "--num_attention_heads=2",
            "--num_key_value_heads=1"]
    system = ["--device=cpu", "--dtype=float32", "--max_steps=1", "--log_interval=1"]
    pre, post = os.path.join(data_root, "shakespeare"), os.path.join(data_root, "arithmetic")
    stages = {"pre-training": ["train_pt.py", *tiny, "--seq_len=32", "--batch_size=2", "--batch_tokens=64",
                               "--eval_batches=1", "--compile=False"],
              "SFT": ["train_sft.py", "--batch_size=4", "--batch_examples=4", "--seq_len=128", "--eval_examples=4",
                      "--max_new_tokens=4", "--compile=False"],
              "DPO": ["train_dpo.py", "--batch_size=4", "--batch_examples=4", "--seq_len=128", "--eval_examples=4",
                      "--compile=False"],
              "GRPO": ["train_grpo.py", "--prompts_per_step=2", "--num_generations=2", "--batch_size=4",
                       "--max_completion_length=4", "--eval_prompts=2", "--eval_generations=1"]}
    with tempfile.TemporaryDirectory() as work:
        policy = f"{work}/policy"  # the tiny model the post-training stages start from
        run_measured([sys.executable, "train_pt.py", *tiny, *system, "--compile=False", f"--data_dir={pre}",
                      f"--out_dir={policy}", "--seq_len=32", "--batch_size=2", "--batch_tokens=64"])
        big_post = recipe_sized(post, f"{work}/post", examples=1_000_000)
        runs = [("pre-training", "offline default", pre),
                ("pre-training", "4.2B tokens (Doge-20M)", recipe_sized(pre, f"{work}/pt4", tokens=4_200_000_000)),
                ("pre-training", "64B tokens (Doge-320M)", recipe_sized(pre, f"{work}/pt64", tokens=64_000_000_000))]
        for stage in ("SFT", "DPO", "GRPO"):
            runs += [(stage, "offline default", post), (stage, "1M examples", big_post)]
        print("| stage | data | seconds to the first step's end | peak RSS |\n|---|---|---|---|")
        for i, (stage, label, data_dir) in enumerate(runs):
            start = [] if stage == "pre-training" else [f"--init_from={policy}"]
            seconds, rss = run_measured([sys.executable, *stages[stage], *system, *start, f"--data_dir={data_dir}",
                                         f"--out_dir={work}/out{i}"])
            print(f"| {stage} | {label} | {seconds:.1f} | {rss / 2 ** 20:.0f} MB |", flush=True)

if __name__ == "__main__":
    settings.run(main)
