"""Recipe-sized data: every stage starts, and takes a step, in the same time and memory on a file of billions of
tokens or a set of millions of conversations as on a small one. The large files are sparse (a valid header,
zeros past the real content: seconds to make, no disk used), so what is measured is what the start does with
the data's size, not how fast the disk is."""
import os
import shutil
import time

import numpy as np
import pytest
import torch

from nanodoge import checkpoint as ckpt, files
import train_dpo
from bench import sparse_array, tiled_jsonl, tiled_ragged
import train_grpo
import train_pt
import train_sft
from model import Doge, DogeConfig
from nanodoge.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset is Linux's")

SYSTEM = ["--device=cpu", "--dtype=float32", "--max_steps=1", "--log_interval=1"]
BIG_TOKENS = 2 ** 30  # a 2 GiB train.bin: a whole-file pass would take seconds and an int64 copy 8 GiB
BIG_EXAMPLES = 4_000_000  # conversations and pairs
BIG_PROMPTS = 1_000_000


def peak_rss_of(function):
    """(CPU seconds, peak resident memory in bytes) of this process while function() runs: CPU time, not wall
    time, so that another process on the machine does not make the start look slow."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    begin = time.process_time()
    function()
    seconds = time.process_time() - begin
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return seconds, int(status["VmHWM"].split()[0]) * 1024


def assert_same_cost(small, big, what):
    """The big data's run costs what the small one's does: no more than 256 MB more memory, and at most
    half as long again plus 3 s (a whole-data pass or a per-example Python loop costs tens of seconds here)."""
    print(f"{what}: small {small[0]:.1f} s, {small[1] / 2 ** 20:.0f} MB peak; big {big[0]:.1f} s, "
          f"{big[1] / 2 ** 20:.0f} MB peak")
    assert big[1] - small[1] < 256 * 2 ** 20, f"{what}: {(big[1] - small[1]) / 2 ** 20:.0f} MB more"
    assert big[0] < 1.5 * small[0] + 3, f"{what}: {big[0]:.1f} s against {small[0]:.1f} s"


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_data):
    """A tiny untrained Doge with the arithmetic data's tokenizer, saved as a checkpoint to start from."""
    root = tmp_path_factory.mktemp("scale_policy")
    tok = load_tokenizer(tiny_data["arithmetic"])
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    ckpt.save_checkpoint(str(root), 0, dict(model=model.state_dict(), model_config=vars(model.config),
                                            tokenizer=tok.state(), stage="pt"))
    return str(root)


def copy_dir(source, target, big):
    """source's files into target, the big sets among them (`big(name, path)` writes them) made at scale."""
    shutil.copytree(source, target)
    for name in os.listdir(target):
        big(name, os.path.join(target, name))
    return str(target)


def test_pretraining_starts_alike_on_a_billion_tokens(tiny_data, tmp_path):
    small = tiny_data["prose"]
    def big_train(name, path):
        if name == "train.bin":
            sparse_array(path, np.asarray(files.read_array(os.path.join(small, name))), BIG_TOKENS)
    big = copy_dir(small, tmp_path / "big", big_train)
    assert len(files.read_array(os.path.join(big, "train.bin"))) == BIG_TOKENS
    args = ["--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=2", "--num_attention_heads=2",
            "--num_key_value_heads=1", "--batch_size=2", "--seq_len=32", "--batch_tokens=64", "--eval_batches=1",
            "--compile=False", *SYSTEM]
    runs = {}
    for label, data_dir in (("small", small), ("big", big)):
        out = tmp_path / f"out_{label}"
        runs[label] = peak_rss_of(lambda: train_pt.main(args + [f"--data_dir={data_dir}", f"--out_dir={out}"]))
        # and a restart of the same run (one more step) costs the same
        resume = ["--init_from=resume", "--max_steps=2", f"--data_dir={data_dir}", f"--out_dir={out}"]
        runs[label + " resume"] = peak_rss_of(lambda: train_pt.main(args + resume))
    assert_same_cost(runs["small"], runs["big"], "pre-training")
    assert_same_cost(runs["small resume"], runs["big resume"], "pre-training resumed")
    # --dry_run states the cost of the big run and trains nothing
    seconds, _ = peak_rss_of(lambda: train_pt.main(args + [f"--data_dir={big}", f"--out_dir={tmp_path}/dry",
                                                           "--dry_run=True", "--max_steps=1000"]))
    assert not os.path.exists(tmp_path / "dry" / "log.jsonl") and seconds < 1.5 * runs["small"][0] + 3


def test_sft_and_dpo_start_alike_on_millions_of_conversations(tiny_data, policy, tmp_path):
    small = tiny_data["arithmetic"]
    def big_sets(name, path):
        for prefix in ("sft_train", "dpo_train.chosen", "dpo_train.rejected"):
            if name == f"{prefix}.offsets.bin":
                tiled_ragged(path[:-len(".offsets.bin")], os.path.join(small, prefix), BIG_EXAMPLES)
    big = copy_dir(small, tmp_path / "big", big_sets)
    assert len(files.read_ragged(os.path.join(big, "sft_train"))[2]) == BIG_EXAMPLES + 1
    common_args = [f"--init_from={policy}", "--batch_size=4", "--batch_examples=4", "--seq_len=128",
                   "--eval_examples=4", "--compile=False", *SYSTEM]
    for stage, main, extra in (("SFT", train_sft.main, ["--max_new_tokens=4"]), ("DPO", train_dpo.main, [])):
        runs = {label: peak_rss_of(lambda: main(common_args + extra + [f"--data_dir={data_dir}",
                                                                       f"--out_dir={tmp_path}/{stage}_{label}"]))
                for label, data_dir in (("small", small), ("big", big))}
        assert_same_cost(runs["small"], runs["big"], stage)


def test_grpo_starts_alike_on_millions_of_prompts(tiny_data, policy, tmp_path):
    small = tiny_data["arithmetic"]
    def big_prompts(name, path):
        if name == "grpo_train.jsonl":
            tiled_jsonl(path, os.path.join(small, name), BIG_PROMPTS)
    big = copy_dir(small, tmp_path / "big", big_prompts)
    assert len(files.JsonlRows(os.path.join(big, "grpo_train.jsonl"))) == BIG_PROMPTS
    args = [f"--init_from={policy}", "--prompts_per_step=2", "--num_generations=2", "--batch_size=4",
            "--max_completion_length=4", "--eval_prompts=2", "--eval_generations=1", *SYSTEM]
    runs = {label: peak_rss_of(lambda: train_grpo.main(args + [f"--data_dir={data_dir}",
                                                                f"--out_dir={tmp_path}/grpo_{label}"]))
            for label, data_dir in (("small", small), ("big", big))}
    assert_same_cost(runs["small"], runs["big"], "GRPO")
