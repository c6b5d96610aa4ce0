import getpass
import os
import sys
import json
import tempfile

import pytest

# hub calls fail at once instead of retrying for a minute (there is no network in CI)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# inductor's on-disk graph cache is keyed without the vector width it generated C++ for, which ATEN_CPU_CAPABILITY
# sets: a kernel written for AVX-512's 16 floats, cached by a native run and compiled again for AVX2's 8 under
# ATEN_CPU_CAPABILITY=avx2 (or the reverse), reads and writes past its buffers (a NaN loss, heap corruption).
# One cache directory per value; subprocesses inherit it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log_records(out_dir, key=None):
    """The records of a run's log.jsonl (those with `key`, if given)."""
    return [r for r in map(json.loads, open(os.path.join(str(out_dir), "log.jsonl"))) if key is None or key in r]


def write_bpe_tokenizer_json(directory, text, vocab_size):
    """A byte-level BPE tokenizer.json trained on text, written into directory: what SmallDoge publishes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.save(os.path.join(str(directory), "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_text():
    """~200 kB of English prose that every Python install has: the pydoc topic texts."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))[:200_000]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_text):
    """prepare_data.py on tiny_text with a 512-token sentencepiece vocabulary: data/prose (pre-training) and
    data/arithmetic (the post-training curriculum), one tokenizer for both."""
    import prepare_data
    root = tmp_path_factory.mktemp("tiny_data")
    text_path = root / "prose.txt"
    text_path.write_text(tiny_text)
    prepare_data.main([f"--dataset={text_path}", "--vocab_size=512", f"--out_dir={root}"])
    return {"prose": str(root / "prose"), "arithmetic": str(root / "arithmetic")}
