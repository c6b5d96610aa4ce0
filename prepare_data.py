"""
Every stage's data, offline by default, real datasets by name.

    python prepare_data.py                       # Shakespeare (pre-training) + the arithmetic curriculum
                                                 # (SFT, DPO, GRPO), one sentencepiece tokenizer for both
    python prepare_data.py --dataset=tinystories --tokenizer=gpt2 --sft=none --dpo=none --grpo=none
    python prepare_data.py --dataset=smollm-mix --tokenizer=SmallDoge/Doge-tokenizer --max_tokens=2_000_000_000
    python prepare_data.py --dataset=none --tokenizer=data/shakespeare --sft=chats.jsonl --dpo=none --grpo=none
    python prepare_data.py config/doge_20m.py   # what a training config trains on: its `data` settings, its data_dir

Pre-training sets go to <out_dir>/<dataset>/: train.bin and val.bin (uint16 token arrays, documents separated by
<|endoftext|>, every 20th document held out for val), meta.json and the tokenizer file. Post-training sets go
to <out_dir>/<sources joined by +>/ (data/arithmetic/ by default): sft_{train,val}.*, dpo_{train,val}.{chosen,
rejected}.* (ragged token/mask/offset arrays), grpo_train.jsonl and test.jsonl. A directory whose meta.json
exists is done: re-running skips it unless --force=True; meta.json is written last, every file atomically.
Worker processes (--workers, one per core) encode, the main process writes in order, so memory stays flat in
the token count; an unfinished set, pre- or post-training, resumes from its directory's partial/ when run again.

    python prepare_data.py --bench --tokenizer=data/shakespeare --max_tokens=500_000_000   # tokens/s, peak RSS
"""
import collections
import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from tqdm import tqdm

from nanodoge import arithmetic, dataset_rows, files, settings, tokenizer as tk

config = dict(
    # pre-training corpus: shakespeare | fineweb-edu | cosmopedia-v2 | python-edu | finemath | smollm-mix
    # (the four mixed 7:2:0.5:0.5) | tinystories | a local .txt / .jsonl / .parquet file ("text" column) | none
    dataset="shakespeare",
    # post-training sources, each a name, a hub id or a local .jsonl/.parquet file in the hub dataset's schema,
    # or none: SFT conversations (smoltalk "messages"; bespoke-stratos "conversations"), DPO pairs
    # (ultrafeedback prompt/chosen/rejected), GRPO prompts with answers (numinamath problem/solution)
    sft="arithmetic",
    dpo="arithmetic",
    grpo="arithmetic",
    arithmetic_digits=2,  # the curriculum's longest operand; 3 or 4 make it harder (and slower to learn)
    arithmetic_ops="+-",  # its operations; "+-*" adds multiplication by one digit (the tiny model learns it last)
    # sentencepiece (BPE trained here) | gpt2 (tiktoken) | a tokenizer.json path or hub id | a prepared data
    # directory (reuse its tokenizer, e.g. data/shakespeare, so post-training data matches a pre-trained model)
    tokenizer="sentencepiece",
    vocab_size=4096,  # sentencepiece only: the tiny offline models, whose cost is mostly the output head;
                      # 32768 for Doge-sized runs
    max_tokens=100_000_000,  # pre-training token budget (streams from the hub stop there)
    max_examples=100_000,  # per post-training source
    seed=1337,
    out_dir="data",
    force=False,
    workers=os.cpu_count() or 1,  # tokenizer processes (any number writes the same bytes)
    bench=False,  # measure instead: preparation tokens/s against the tokenizer alone, peak RSS (bench() below)
)

VAL_EVERY = 20  # every 20th document / example is held out (a deterministic 5% split)
HELD_OUT = {"sft": "sft_val", "dpo": "dpo_val", "grpo": "test"}  # each stage's held-out set
SENTENCEPIECE_SAMPLE_CHARS = 50_000_000  # sentencepiece trains on the first 50 MB of a streamed corpus
BATCH_CHARS = 50_000  # documents go to the workers in batches this long: under the 100k characters from which
                      # nanodoge/tokenizer.py encodes with threads, so each worker encodes on one core
IN_FLIGHT = 4  # batches handed out per worker ahead of the writer: what bounds memory
PROGRESS_SECONDS = 120  # a long pre-training set saves where it is this often, and a re-run resumes from there

# hub datasets: name -> (path, config, split, text column)
PRETRAINING_HUB = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text"),
    "cosmopedia-v2": ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train", "text"),
    "python-edu": ("HuggingFaceTB/smollm-corpus", "python-edu", "train", "text"),
    "finemath": ("HuggingFaceTB/finemath", "finemath-4plus", "train", "text"),
    "tinystories": ("roneneldan/TinyStories", None, "train", "text"),
}
SMOLLM_MIX = {"fineweb-edu": 0.7, "cosmopedia-v2": 0.2, "python-edu": 0.05, "finemath": 0.05}  # the guide's ratio
POSTTRAINING_HUB = {
    "smoltalk": ("HuggingFaceTB/smoltalk", "all", "train"),
    "bespoke-stratos": ("bespokelabs/Bespoke-Stratos-17k", None, "train"),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs"),
    "numinamath": ("AI-MO/NuminaMath-TIR", None, "train"),
}

# -----------------------------------------------------------------------------
# reading sources: local files, the hub (streamed), the Shakespeare package

def is_local_file(source):
    return source.endswith((".txt", ".jsonl", ".json", ".parquet")) or os.path.exists(source)


def offline_hint(name, flag):
    """What to do instead when --{flag}={name} names a hub dataset and the hub is out of reach."""
    return (f"cannot reach the Hugging Face Hub for --{flag}={name}: offline, use the built-in default "
            f"(plain `python prepare_data.py`) or pass a local file in the same schema, "
            f"--{flag}=path/to/file.jsonl or .parquet")


def source_rows(source, hub_table, flag, start=None):
    """(rows, position) of a local file or of a hub dataset given by short name (hub_table) or hub id, from
    `start` (None: the beginning); position() is where the rows are after those yielded (a row count, or the
    stream's state), which a later call continues from."""
    if is_local_file(source):
        return counted(dataset_rows.local_rows(source, start or 0), start or 0, skipped=True)
    if source in hub_table:
        return dataset_rows.hub_stream(*hub_table[source][:3], offline_hint(source, flag), start)
    if source.count("/") == 1:
        return dataset_rows.hub_stream(source, None, "train", offline_hint(source, flag), start)
    raise ValueError(f"--{flag}={source} is neither a file nor a known name ({', '.join(hub_table)}) "
                     "nor a hub id owner/name")


def pretraining_documents(dataset, start=None):
    """(documents, position, description of the source, whether it streams): an iterator of document texts
    from `start` (None: the beginning), and position(), where the iterator is after the documents it has
    yielded (a JSON value: a document count, or a hub stream's state), which a resumed run starts from.
    Streams (a file of rows, the hub) are read as they are used, so they usually end at the token budget."""
    if dataset == "shakespeare":
        documents, source = dataset_rows.shakespeare_documents()
        return (*counted(documents, start or 0), source, False)
    if is_local_file(dataset):
        if dataset.endswith(".txt"):
            if not os.path.isfile(dataset):
                raise FileNotFoundError(f"{dataset} does not exist")
            with open(dataset, encoding="utf-8") as f:
                return (*counted([f.read()], start or 0), dataset, False)
        rows_ = dataset_rows.local_rows(dataset, start or 0)
        return (*counted((text_of(row, dataset) for row in rows_), start or 0, skipped=True), dataset, True)
    if dataset == "smollm-mix":
        return (*mixed_documents(SMOLLM_MIX, start), f"smollm-mix {SMOLLM_MIX}", True)
    if dataset in PRETRAINING_HUB or dataset.count("/") == 1:
        path, config_name, split, column = PRETRAINING_HUB.get(dataset, (dataset, None, "train", "text"))
        rows_, position = dataset_rows.hub_stream(path, config_name, split, offline_hint(dataset, "dataset"), start)
        return (text_of(row, dataset, column) for row in rows_), position, f"{path} ({config_name})", True
    raise ValueError(f"--dataset={dataset} is unknown: use shakespeare, {', '.join(PRETRAINING_HUB)}, smollm-mix, "
                     "a hub id, a .txt/.jsonl/.parquet file, or none (arithmetic is post-training data: "
                     "--sft/--dpo/--grpo)")


def counted(documents, start, skipped=False):
    """(documents from number `start` on, position(): how many have been yielded, counting from the first);
    skipped: the first `start` are already left out of documents."""
    where = [start]

    def count():
        for text in documents if skipped else itertools.islice(documents, start, None):
            where[0] += 1
            yield text
    return count(), lambda: where[0]


def text_of(row, source, column="text"):
    if column not in row:
        if "blob_id" in row:  # smollm-corpus python-edu ships only Software Heritage blob ids
            raise ValueError(f"{source} rows hold blob ids, not text: the code must be fetched from Software "
                             "Heritage's S3 bucket first; pass a local file with a 'text' column instead")
        raise ValueError(f"{source} rows have no '{column}' field (fields: {sorted(row)[:8]})")
    return row[column]


def mixed_documents(weights, start=None):
    """(documents, position) from several hub datasets in proportion to weights (by characters, ~ tokens): the
    next document always comes from the source furthest below its share."""
    start = start or {"chars": dict.fromkeys(weights, 0), "streams": dict.fromkeys(weights)}
    streams = {name: pretraining_documents(name, start["streams"][name])[:2] for name in weights}
    chars, live = dict(start["chars"]), list(weights)

    def mix():
        while live:
            name = min(live, key=lambda n: chars[n] / weights[n])
            text = next(streams[name][0], None)
            if text is None:
                live.remove(name)
                continue
            chars[name] += len(text)
            yield text
    return mix(), lambda: {"chars": dict(chars), "streams": {n: position() for n, (_, position) in streams.items()}}


def take_chars(documents, chars):
    """The first documents up to `chars` characters."""
    head, size = [], 0
    for text in documents:
        head.append(text)
        size += len(text)
        if size >= chars:
            break
    return head

# -----------------------------------------------------------------------------
# pre-training: documents -> train.bin / val.bin, tokenized on all cores, written as they come, resumable

def write_pretraining(tok, args, settings, pre_dir, partial, progress):
    """train.bin and val.bin: each document's tokens then <|endoftext|>, every VAL_EVERY-th document to val,
    until max_tokens. Written in chunks into partial/ as the workers encode batches of documents (in order, so
    any number of workers writes the same bytes), the progress saved there every PROGRESS_SECONDS; a run given
    that progress continues from it. Returns ({"train": tokens, "val": tokens}, description of the source)."""
    state = progress or {"settings": settings, "position": None, "documents": 0, "tokens": 0,
                         "train": None, "val": None, "source": None, "finished": False}
    paths = {split: (os.path.join(pre_dir, f"{split}.bin"), os.path.join(partial, f"{split}.bin"))
             for split in ("train", "val")}
    if not state["finished"]:
        writers = {split: files.ArrayWriter(*paths[split], np.uint16, resume=state[split]) for split in paths}
        # the pool first: its processes fork before a hub stream starts threads of its own
        with multiprocessing.Pool(args.workers, initializer=start_worker, initargs=(tok.state(),)) as pool:
            documents, position, state["source"], streamed = pretraining_documents(args.dataset, state["position"])
            bar = tqdm(total=args.max_tokens if streamed else None, initial=state["tokens"], unit="tok",
                       unit_scale=True, desc="encoding")
            saved = time.time()
            batches = batched_by_chars(documents, position, BATCH_CHARS)
            for tokens, lengths, after in in_order(pool, encode_in_worker, batches, IN_FLIGHT * args.workers):
                for ids in np.split(tokens, np.cumsum(lengths)[:-1]):
                    ids = ids[:args.max_tokens - state["tokens"]]
                    writers["val" if state["documents"] % VAL_EVERY == VAL_EVERY - 1 else "train"].append(ids)
                    state["tokens"], state["documents"] = state["tokens"] + len(ids), state["documents"] + 1
                    if state["tokens"] >= args.max_tokens:
                        break
                bar.update(state["tokens"] - bar.n)
                if state["tokens"] >= args.max_tokens:
                    break
                if time.time() - saved > PROGRESS_SECONDS:  # a batch boundary: every document before is written
                    state.update(position=after, train=writers["train"].sync(), val=writers["val"].sync())
                    save_progress(partial, state)
                    saved = time.time()
            bar.close()
        if not state["tokens"]:
            raise ValueError(f"--dataset={args.dataset} holds no documents")
        if not writers["val"].count:  # too few documents for a document-level holdout: the last 1/20 of tokens
            train = writers["train"]
            train.sync()
            kept = train.count - max(1, train.count // VAL_EVERY)
            stream = np.memmap(train.partial, np.uint16, "r", offset=files.HEADER_INTS * 4, shape=(train.count,))
            writers["val"].append(stream[kept:])
            largest = int(stream[:kept].max()) if kept else 0
            del stream
            train.file.close()
            writers["train"] = files.ArrayWriter(*paths["train"], np.uint16, resume={"count": kept, "max": largest})
        for writer in writers.values():
            writer.finish()  # headers written: the files are complete, only their renaming remains
        state.update(finished=True, **{split: {"count": w.count, "max": w.max} for split, w in writers.items()})
        save_progress(partial, state)
    move_into_place(paths.values())
    return {"train": state["train"]["count"], "val": state["val"]["count"]}, state["source"]


def batched_by_chars(documents, position, chars):
    """(batch of documents of about `chars` characters, the stream's position after it)."""
    batch, size = [], 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= chars:
            yield batch, position()
            batch, size = [], 0
    if batch:
        yield batch, position()


def in_order(pool, function, items, in_flight):
    """function(item) for each item on the pool's processes, the results in the items' order; at most in_flight
    items are handed out ahead of the one awaited, so a long stream is never read far ahead of the writer
    (Pool.imap reads its whole input as fast as it can)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def start_worker(tokenizer_state):
    """A worker process holds its own tokenizer; Ctrl-C is the main process's to handle."""
    global worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_tokenizer = tk.tokenizer_from_state(tokenizer_state)


def encode_in_worker(batch_and_position):
    """(all the batch's tokens, each document's followed by <|endoftext|>; each document's length; the
    position, passed through)."""
    batch, position = batch_and_position
    ids = [np.array(ids + [worker_tokenizer.eos_id], dtype=np.uint16) for ids in worker_tokenizer.encode_batch(batch)]
    return np.concatenate(ids), np.array([len(x) for x in ids], dtype=np.int64), position

# -----------------------------------------------------------------------------
# post-training sources in the hub schemas -> the same shapes as the curriculum

def sft_example(row, source):
    """smoltalk: {"messages": [{role, content}]}; Bespoke-Stratos: {"system", "conversations": [{from, value}]}
    with <|begin_of_thought|>/<|begin_of_solution|> sections, rewritten to <think>/<answer> and SYSTEM_PROMPT."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if "conversations" in row:
        messages = [{"role": "system", "content": tk.SYSTEM_PROMPT}]
        for turn in row["conversations"]:
            text = turn["value"]
            if turn["from"] == "assistant":
                text = re.sub(r"<\|begin_of_thought\|>\s*(.*?)\s*<\|end_of_thought\|>", r"<think>\1</think>", text, flags=re.S)
                text = re.sub(r"\s*<\|begin_of_solution\|>\s*(.*?)\s*<\|end_of_solution\|>", r"<answer>\1</answer>", text, flags=re.S)
            messages.append({"role": "assistant" if turn["from"] in ("assistant", "gpt") else "user", "content": text})
        return messages
    raise ValueError(f"--sft={source}: rows need 'messages' (smoltalk) or 'conversations' (Bespoke-Stratos), "
                     f"got fields {sorted(row)[:8]}")


def dpo_example(row, source):
    """ultrafeedback_binarized: {"prompt", "chosen": [messages], "rejected": [messages]} (or plain strings)."""
    if not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise ValueError(f"--dpo={source}: rows need prompt/chosen/rejected, got fields {sorted(row)[:8]}")

    def split(conversation):  # -> (prompt messages, final assistant reply)
        if isinstance(conversation, str):
            return [{"role": "user", "content": row["prompt"]}], conversation
        if not conversation or conversation[-1].get("role") != "assistant":
            raise ValueError(f"--dpo={source}: chosen/rejected must end with an assistant message")
        return [{"role": m["role"], "content": m["content"]} for m in conversation[:-1]], conversation[-1]["content"]

    prompt, chosen = split(row["chosen"])
    _, rejected = split(row["rejected"])
    return prompt, chosen, rejected


def grpo_example(row, source):
    """NuminaMath-TIR: {"problem", "solution"} with the reference answer in the solution's last \\boxed{};
    or already {"messages", "answer"}. None if the solution has no boxed answer."""
    if "messages" in row and "answer" in row:
        return {"messages": row["messages"], "answer": str(row["answer"])}
    if "problem" not in row or "solution" not in row:
        raise ValueError(f"--grpo={source}: rows need problem/solution (NuminaMath-TIR), got fields {sorted(row)[:8]}")
    answer = last_boxed(row["solution"])
    if answer is None:
        return None
    return {"messages": [{"role": "system", "content": tk.SYSTEM_PROMPT},
                         {"role": "user", "content": row["problem"]}], "answer": answer}


def last_boxed(text):
    """Content of the last \\boxed{...} in text, braces matched."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth < 0:
            return text[i:j].strip()
    return None


def post_training_sources(args, curriculum, starts=None):
    """{stage: (examples, position)} for every source that is not none: an iterator of (set name, example), each
    example in the shape the curriculum has, the held-out set getting every VAL_EVERY-th, from starts[stage]
    (absent: the beginning); and position(), where the stage's source is after the examples yielded (a JSON
    value), which a resumed run starts from. A hub source is opened here (offline, an error at once), its rows
    read only as they are used."""
    starts = starts or {}
    sources = {}
    for stage, source in (("sft", args.sft), ("dpo", args.dpo), ("grpo", args.grpo)):
        if source == "arithmetic":  # the curriculum is made whole from the seed: a resumed run skips its start
            sets = [name for name in curriculum if name.startswith(stage) or name == HELD_OUT[stage]]
            sources[stage] = counted(((name, example) for name in sets for example in curriculum[name]),
                                     starts.get(stage) or 0)
        elif source != "none":
            sources[stage] = split_examples(source, stage, args.max_examples, starts.get(stage))
    return sources


def split_examples(source, stage, max_examples, start=None):
    """(examples, position): (set name, example) for the first max_examples usable examples of the source's
    rows, every VAL_EVERY-th held out, from `start`; position() is {"rows": where the rows are, "examples": how
    many examples have been yielded} (a source's rows may be unusable: a GRPO solution without an answer)."""
    start = start or {"rows": None, "examples": 0}
    rows_, rows_position = source_rows(source, POSTTRAINING_HUB, stage, start["rows"])
    convert = {"sft": sft_example, "dpo": dpo_example, "grpo": grpo_example}[stage]
    usable = (example for example in (convert(row, source) for row in rows_) if example is not None)
    first = start["examples"]
    named = (((HELD_OUT[stage] if n % VAL_EVERY == VAL_EVERY - 1 else f"{stage}_train"), example)
             for n, example in enumerate(itertools.islice(usable, max_examples - first), first))
    examples, examples_position = counted(named, first, skipped=True)
    return examples, lambda: {"rows": rows_position(), "examples": examples_position()}


def example_texts(sources):
    """All text in the post-training sets, roles included (what sentencepiece also trains on)."""
    for stage, (examples, _) in sources.items():
        for _, example in examples:
            if stage == "dpo":
                prompt, chosen, rejected = example
                example = prompt + [{"role": "assistant", "content": reply} for reply in (chosen, rejected)]
            for message in example["messages"] if stage == "grpo" else example:
                yield f"{message['role']}\n{message['content']}"


def write_post_training(tok, args, settings, post_dir, partial, progress, curriculum):
    """Every set of every stage, its examples rendered with the chat template on the workers (in order) and
    written into partial/ as they come: SFT conversations and DPO pairs as ragged token/mask arrays, GRPO prompts
    as jsonl. The progress is saved there every PROGRESS_SECONDS and after each stage; a run given that progress
    skips the finished stages and continues the unfinished one. Returns ({set: examples}, {set: tokens})."""
    # per stage begun: where its source is, its sets' example and token counts, their writers' sync() states, and
    # once the stage is finished the names of its files (None until then)
    state = progress or {"settings": settings, "stages": {}}
    # the pool first: its processes fork before a hub stream starts threads of its own
    with multiprocessing.Pool(args.workers, initializer=start_worker, initargs=(tok.state(),)) as pool:
        starts = {stage: done["position"] for stage, done in state["stages"].items()}
        for stage, (examples, position) in tqdm(post_training_sources(args, curriculum, starts).items(),
                                                desc="post-training sets"):
            done = state["stages"].setdefault(stage, {"position": None, "examples": {}, "tokens": {},
                                                      "writers": {}, "files": None})
            if done["files"] is None:
                write_stage(pool, args, post_dir, partial, state, stage, examples, position)
    for done in state["stages"].values():
        move_into_place((os.path.join(post_dir, name), os.path.join(partial, name)) for name in done["files"])
    return ({name: n for done in state["stages"].values() for name, n in done["examples"].items()},
            {name: n for done in state["stages"].values() for name, n in done["tokens"].items()})


def write_stage(pool, args, post_dir, partial, state, stage, examples, position):
    """One stage's sets, continued from state["stages"][stage]: its sets' example and token counts and their
    writers' sync() states, which it updates and saves (with all of state) every PROGRESS_SECONDS. At the end
    the sets' files are complete in partial/ and named in the stage's "files" (only their renaming remains)."""
    done = state["stages"][stage]
    example_counts, token_counts = collections.Counter(done["examples"]), collections.Counter(done["tokens"])
    writers = {name: set_writers(stage, post_dir, partial, name, resume) for name, resume in done["writers"].items()}
    saved = time.time()
    batches = ((stage, batch, position()) for batch in iter(lambda: list(itertools.islice(examples, 64)), []))
    for batch, rendered, after in in_order(pool, render_in_worker, batches, IN_FLIGHT * args.workers):
        for (name, example), result in zip(batch, rendered):
            if name not in writers:
                writers[name] = set_writers(stage, post_dir, partial, name)
            if stage == "grpo":
                writers[name][0].append(example)
            for writer, (ids, mask) in zip(writers[name], result if stage == "dpo" else [result]):
                if stage != "grpo":
                    writer.append(ids, mask)
                token_counts[name] += len(ids)
            example_counts[name] += 1
        if time.time() - saved > PROGRESS_SECONDS:  # a batch boundary: every example before is written
            done.update(position=after, examples=example_counts, tokens=token_counts,
                        writers={name: [writer.sync() for writer in writers[name]] for name in writers})
            save_progress(partial, state)
            saved = time.time()
    if len(writers) < 2:
        source = getattr(args, stage)
        raise ValueError(f"--{stage}={source} gave {sum(example_counts.values())} usable examples: "
                         f"need at least {VAL_EVERY}")
    every_writer = list(itertools.chain(*writers.values()))
    for writer in every_writer:
        writer.finish()  # headers written: the files are complete, only their renaming remains
    done.update(position=position(), examples=example_counts, tokens=token_counts,
                files=[os.path.basename(path) for writer in every_writer for path in writer.paths()])
    save_progress(partial, state)


def set_writers(stage, post_dir, partial, name, resume=None):
    """The writers of one set, its files kept in partial/ until they are complete: a GRPO set's prompts as jsonl,
    a DPO set's chosen and rejected sides as two ragged sets, an SFT set's conversations as one; resume: their
    sync() states."""
    if stage == "grpo":
        make, suffixes = files.JsonlWriter, [".jsonl"]
    else:
        make, suffixes = files.RaggedWriter, [".chosen", ".rejected"] if stage == "dpo" else [""]
    return [make(os.path.join(post_dir, name + suffix), os.path.join(partial, name + suffix), state)
            for suffix, state in zip(suffixes, resume or [None] * len(suffixes))]


def render_in_worker(stage_batch_and_position):
    """(the batch, each example rendered: (ids, mask); a DPO pair two of them; a GRPO prompt up to the reply;
    the position, passed through)."""
    stage, batch, position = stage_batch_and_position
    tok = worker_tokenizer
    if stage == "sft":
        rendered = [tk.render_chat(tok, messages) for _, messages in batch]
    elif stage == "dpo":
        rendered = [render_pair(tok, *example) for _, example in batch]
    else:
        rendered = [tk.render_chat(tok, example["messages"], add_generation_prompt=True) for _, example in batch]
    return batch, rendered, position


def render_pair(tok, prompt, chosen, rejected):
    """Chosen and rejected conversations, each rendered whole; the mask covers only the final reply and its
    end-of-turn token (nothing before the generation prompt that precedes it)."""
    before = len(tk.render_chat(tok, prompt, add_generation_prompt=True)[0])
    rendered = []
    for reply in (chosen, rejected):
        ids, mask = tk.render_chat(tok, prompt + [{"role": "assistant", "content": reply}])
        rendered.append((ids, [0] * before + mask[before:]))
    return rendered

# -----------------------------------------------------------------------------
# writing

def save_progress(partial, state):
    """state, which holds the settings, as partial/progress.json (atomically: a kill leaves the last one whole)."""
    files.write_file(os.path.join(partial, "progress.json"), json.dumps(state))


def saved_progress(partial, settings):
    """The progress an unfinished run saved in partial/, or None; a one-line error if it ran with other settings."""
    path = os.path.join(partial, "progress.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        progress = json.load(f)
    if progress["settings"] != settings:
        raise ValueError(f"{partial} holds an unfinished run with other settings ({progress['settings']}): run "
                         "again with those to finish it, or pass --force=True to start over")
    return progress


def move_into_place(paths):
    """Rename each complete (final, unfinished) file to its final name; one renamed already is passed over, so a
    run killed half-way through the renaming finishes it."""
    for final, unfinished in paths:
        if os.path.exists(unfinished):
            os.replace(unfinished, final)


def already_done(data_dir, settings, force):
    """True if data_dir was prepared with these settings; a one-line error if with others."""
    meta_path = os.path.join(data_dir, "meta.json")
    if force or not os.path.exists(meta_path):
        return False
    with open(meta_path) as f:
        previous = json.load(f).get("settings")
    if previous != settings:
        changed = [f"{k}: {previous.get(k) if previous else None} -> {v}" for k, v in settings.items()
                   if not previous or previous.get(k) != v]
        raise ValueError(f"{data_dir} was prepared with other settings ({'; '.join(changed)}): "
                         "pass --force=True to overwrite it, or another --out_dir")
    print(f"{data_dir} is already prepared (--force=True to redo it)")
    return True

# -----------------------------------------------------------------------------

def output_dirs(args):
    """(pre-training directory, post-training directory), each None when there is nothing of that kind to make:
    <out_dir>/<dataset name> and <out_dir>/<post-training source names joined by +>."""
    pre_name = None if args.dataset == "none" else os.path.splitext(os.path.basename(args.dataset))[0]
    post_sources = [s for s in (args.sft, args.dpo, args.grpo) if s != "none"]
    post_name = "+".join(dict.fromkeys(os.path.splitext(os.path.basename(s))[0] for s in post_sources))
    return (pre_name and os.path.join(args.out_dir, pre_name)), (post_name and os.path.join(args.out_dir, post_name))


def training_config_arguments(path):
    """prepare_data.py arguments that make what a training config trains on: its `data` dict (settings of this
    script; these defaults where unset) into the parent directory of its data_dir."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    values = {}
    exec(compile(open(path).read(), path, "exec"), values)
    data, data_dir = values.get("data", {}), values.get("data_dir")
    if not data_dir:
        raise ValueError(f"{path} names no data_dir: it is not a training config (pass --key=value settings instead)")
    if not isinstance(data, dict) or set(data) - set(config) - {"out_dir"}:
        raise ValueError(f"{path}: data must be a dict of prepare_data.py settings ({', '.join(config)})")
    return [f"--{key}={value}" for key, value in data.items()] + [f"--out_dir={os.path.dirname(data_dir) or '.'}"], \
        os.path.normpath(data_dir)


def bench(args):
    """Pre-training preparation (`python prepare_data.py` on a local jsonl, in a child process) at max_tokens/10
    and max_tokens: tokens/s against the tokenizer's own batch encode on all cores of the first max_tokens/10
    tokens' documents, and peak RSS. The jsonl is --dataset, or 1,000-word windows over Shakespeare's works."""
    if args.tokenizer == "sentencepiece":
        raise ValueError("--bench encodes with a tokenizer made already: --tokenizer=data/shakespeare (after "
                         "`python prepare_data.py`), gpt2 or a tokenizer.json")
    work = os.path.join(args.out_dir, "bench")
    rows_file = args.dataset if args.dataset.endswith((".jsonl", ".parquet")) else os.path.join(work, "windows.jsonl")
    tok = tk.load_tokenizer(args.tokenizer) if os.path.isfile(os.path.join(args.tokenizer, "meta.json")) else \
        tk.Tokenizer({"kind": "tiktoken", "name": "gpt2"}) if args.tokenizer == "gpt2" else tk.hf_tokenizer(args.tokenizer)
    try:
        if rows_file.startswith(work):  # enough windows for max_tokens, at this tokenizer's tokens per word
            words = " ".join(dataset_rows.shakespeare_documents()[0]).split(" ")
            rng, window = random.Random(0), 1000
            per_window = len(tok.encode(" ".join(words[:100 * window]))) / 100
            os.makedirs(work, exist_ok=True)
            with open(rows_file, "w") as f:
                for _ in range(int(args.max_tokens / per_window * 1.05) + 20):
                    start = rng.randrange(len(words) - window)
                    f.write(json.dumps({"text": " ".join(words[start:start + window])}) + "\n")
        small = args.max_tokens // 10
        documents, tokens, seconds = iter(text_of(row, rows_file) for row in dataset_rows.local_rows(rows_file)), 0, 0.0
        while tokens < small:  # the tokenizer alone, all cores (its threads), batches of 2M characters
            batch = take_chars(documents, 2_000_000)
            if not batch:
                break
            t0 = time.perf_counter()
            tokens += sum(len(ids) + 1 for ids in tok.encode_batch(batch))
            seconds += time.perf_counter() - t0
        alone = tokens / seconds
        print(f"tokenizer encode_batch alone, {os.cpu_count()} cores: {alone / 1e6:.2f}M tokens/s")
        for max_tokens in (small, args.max_tokens):
            command = [sys.executable, os.path.abspath(__file__), f"--dataset={rows_file}", f"--tokenizer={args.tokenizer}",
                       "--sft=none", "--dpo=none", "--grpo=none", f"--max_tokens={max_tokens}", f"--workers={args.workers}",
                       f"--out_dir={os.path.join(work, str(max_tokens))}"]
            t0 = time.perf_counter()
            child, summed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), 0
            while not (ended := os.wait4(child.pid, os.WNOHANG))[0]:
                summed = max(summed, process_tree_rss(child.pid))
                time.sleep(0.2)
            rate = max_tokens / (time.perf_counter() - t0)
            if os.waitstatus_to_exitcode(ended[1]):
                raise ValueError(f"{' '.join(command)} failed")
            print(f"prepare_data {max_tokens / 1e6:,.0f}M tokens, {args.workers} workers: {rate / 1e6:.2f}M tokens/s "
                  f"({rate / alone:.2f}x the tokenizer alone), peak RSS {ended[2].ru_maxrss / 1e3:,.0f} MB (its largest "
                  f"process), {summed / 1e6:,.0f} MB (all its processes, summed)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def process_tree_rss(pid):
    """Resident bytes of a process and its descendants (Linux /proc; shared pages count in each)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except (OSError, StopIteration):
        return 0
    return rss + sum(process_tree_rss(child) for child in children)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    trains_on = None  # the data_dir of a training config given on the command line
    config_path = settings.config_file(argv)
    if config_path:
        config_args, trains_on = training_config_arguments(config_path)
        argv = config_args + [arg for arg in argv if arg != config_path]
    args = settings.load_config(config, argv)
    if args.bench:
        return bench(args)
    if not args.arithmetic_ops or set(args.arithmetic_ops) - set("+-*"):
        raise ValueError(f"--arithmetic_ops={args.arithmetic_ops}: use some of + - * (e.g. +-*)")
    t0 = time.time()
    for flag in ("dataset", "sft", "dpo", "grpo"):
        source = getattr(args, flag)
        if source.endswith((".txt", ".jsonl", ".json", ".parquet")) and not os.path.isfile(source):
            raise FileNotFoundError(f"--{flag}={source}: file not found")
    pre_dir, post_dir = output_dirs(args)
    if trains_on and trains_on not in (pre_dir and os.path.normpath(pre_dir), post_dir and os.path.normpath(post_dir)):
        raise ValueError(f"{config_path} trains on {trains_on}, but its data settings make "
                         f"{' and '.join(d for d in (pre_dir, post_dir) if d)}: make its data_dir and data agree")
    reuse = os.path.isfile(os.path.join(args.tokenizer, "meta.json"))
    train_tokenizer = args.tokenizer == "sentencepiece"
    tokenizer_setting = f"sentencepiece {args.vocab_size}" if train_tokenizer else args.tokenizer
    pre_settings = {"dataset": args.dataset, "tokenizer": tokenizer_setting, "max_tokens": args.max_tokens}
    post_settings = {"sft": args.sft, "dpo": args.dpo, "grpo": args.grpo, "tokenizer": tokenizer_setting,
                     "max_examples": args.max_examples, "seed": args.seed,
                     "arithmetic_digits": args.arithmetic_digits, "arithmetic_ops": args.arithmetic_ops}
    if train_tokenizer:  # trained on the corpus and the post-training text, so both sets are made together
        post_settings["dataset"] = args.dataset
    pre_todo = bool(pre_dir) and not already_done(pre_dir, pre_settings, args.force)
    post_todo = bool(post_dir) and (not already_done(post_dir, post_settings, args.force) or
                                    (pre_todo and train_tokenizer))
    if not pre_todo and not post_todo:
        return

    curriculum = arithmetic.arithmetic_sets(args.seed, args.arithmetic_digits, args.arithmetic_ops) \
        if post_todo and "arithmetic" in (args.sft, args.dpo, args.grpo) else {}
    if post_todo:
        post_training_sources(args, curriculum)  # offline, a hub source fails now, not after the pre-training set
    # the tokenizer: reused from a prepared directory (which may be the pre-training set made earlier), or made
    if reuse:
        tok = tk.load_tokenizer(args.tokenizer)
    elif pre_dir and not pre_todo:
        tok = tk.load_tokenizer(pre_dir)
    elif train_tokenizer and not pre_dir:
        raise ValueError("--tokenizer=sentencepiece trains on the pre-training corpus, and --dataset=none: pass "
                         "--tokenizer=<a prepared data dir> (e.g. data/shakespeare) so the data matches its model")
    elif not train_tokenizer:
        tok = tk.Tokenizer({"kind": "tiktoken", "name": "gpt2"}) if args.tokenizer == "gpt2" \
            else tk.hf_tokenizer(args.tokenizer)
    if pre_todo:
        # an unfinished run left partial/: its progress, its tokenizer and the token files so far
        partial = os.path.join(pre_dir, "partial")
        progress = None if args.force else saved_progress(partial, pre_settings)
        if progress:
            tok = tk.load_tokenizer(partial)
            print(f"{pre_dir}: resuming after {progress['documents']:,} documents, {progress['tokens']:,} tokens")
        else:
            shutil.rmtree(partial, ignore_errors=True)
            if train_tokenizer:
                head = take_chars(pretraining_documents(args.dataset)[0], SENTENCEPIECE_SAMPLE_CHARS)
                texts = head + list(example_texts(post_training_sources(args, curriculum)))
                t1 = time.time()
                tok = tk.train_sentencepiece(texts, args.vocab_size)
                print(f"trained a sentencepiece BPE tokenizer, {tok.vocab_size} tokens, in {time.time() - t1:.1f}s")
            tok.save(partial, settings=pre_settings)  # a resumed run encodes with this very tokenizer
        counts, source = write_pretraining(tok, args, pre_settings, pre_dir, partial, progress)
        tok.save(pre_dir, source=source, token_counts=counts, seed=args.seed, settings=pre_settings)
        shutil.rmtree(partial)
        print(f"wrote {pre_dir}: {counts['train']:,} train and {counts['val']:,} val tokens ({source})")
    if post_todo:
        # an unfinished run left partial/: its progress and the sets so far (made with an earlier tokenizer if this
        # run trained one: then they start over)
        partial = os.path.join(post_dir, "partial")
        progress = None if args.force or (pre_todo and train_tokenizer) else saved_progress(partial, post_settings)
        if progress:
            print(f"{post_dir}: resuming after " + ", ".join(f"{stage} {sum(done['examples'].values()):,} examples"
                                                            for stage, done in progress["stages"].items()))
        else:
            shutil.rmtree(partial, ignore_errors=True)
        example_counts, token_counts = write_post_training(tok, args, post_settings, post_dir, partial, progress,
                                                           curriculum)
        tok.save(post_dir, source={"sft": args.sft, "dpo": args.dpo, "grpo": args.grpo}, token_counts=token_counts,
                 example_counts=example_counts, seed=args.seed, settings=post_settings)
        shutil.rmtree(partial)
        print(f"wrote {post_dir}: " + ", ".join(f"{k} {v}" for k, v in example_counts.items()))
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    settings.run(main)
