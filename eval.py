"""
The seed's benchmark table for any checkpoint: the eight tasks the SmallDoge guide evaluates its pre-trained
models on (MMLU, TriviaQA, ARC-Easy, ARC-Challenge, PIQA, HellaSwag, OpenBookQA, Winogrande), five-shot, with the
guide's published Doge-20M and Doge-60M rows beside the result. eval.json and eval.md go beside the checkpoint.

    python eval.py --init_from=out/doge_20m                          # all eight, 5-shot
    python eval.py --init_from=SmallDoge/Doge-20M --tasks=arc_easy,piqa --limit=100
    python eval.py --init_from=out/sft --tasks=arithmetic            # offline: the held-out arithmetic problems

Every definition is lm-evaluation-harness 0.4.13's (its task files under lm_eval/tasks/, named at each function;
tests/test_eval.py holds the per-example log-likelihoods and the metrics equal to its Hugging Face backend):
- Multiple choice: the log-likelihood of a choice is the sum of log p(token | all before it) over the choice's
  tokens after the context (the few-shot examples, then the question). acc: the choice with the largest
  log-likelihood is the right one. acc_norm: the largest log-likelihood per character of the choice's text.
- Winogrande: partial scoring, one context per option (the sentence up to the blank, filled with the option) and the
  rest of the sentence as the shared continuation; acc.
- TriviaQA: greedy generation until "\\n", "." or ","; exact match with any alias, both lower-cased and without
  punctuation.
- Few-shot examples, joined by "\\n\\n", each its question, " " and its right answer: for MMLU the first k of the
  subject's dev split (after the description "The following are multiple choice questions (with answers) about
  <subject>."); for every other task k drawn from the train split by random.Random(1234), one draw per evaluated
  example in order (k + 1 drawn, the evaluated example dropped if among them, the first k kept, for the tasks
  without a test split: lm-eval's sampler).
- --limit=N scores the first N examples of each task (of each MMLU subject, as lm-eval's --limit does).

The seed's rows were measured with lighteval (SmallDoge's evaluation/ scripts), whose multiple-choice metric is
also the log-likelihood per character (acc_norm; their MMLU is the cloze form, the answer texts scored rather than
the letters) and whose TriviaQA match is quasi-exact (articles and whitespace normalised too), on other prompts
and other few-shot draws: the table compares the same abilities on the same data, not digit for digit. Its
column for a task is acc_norm where lm-eval reports it (ARC, PIQA, HellaSwag, OBQA), else acc (MMLU, Winogrande)
or exact_match (TriviaQA).

Data: <data_dir>/<task>/<split>.jsonl (or .parquet) in the hub dataset's schema where that file exists, else the
hub dataset by name (online, through `datasets`). --tasks=arithmetic needs neither: it scores the held-out
problems `python prepare_data.py` writes (data/arithmetic/test.jsonl), greedy chat answers by exact match of
<answer> (post_training.evaluate_accuracy), no few-shot examples.
"""
import json
import os
import random
import re
import string
import sys
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from nanodoge import checkpoint as ckpt, dataset_rows, devices, files, settings
from nanodoge.engine import generate_completions
from nanodoge.post_training import evaluate_accuracy

DEFAULTS = dict(
    init_from="",  # out dir (its newest checkpoint) | ckpt file | Hugging Face dir | hub id; "" = what out/ got last
    tokenizer="",  # a Hugging Face dir's tokenizer, if it has none beside it: tokenizer.json | its dir | hub id
    tasks="mmlu,triviaqa,arc_easy,arc_challenge,piqa,hellaswag,openbookqa,winogrande",  # and/or arithmetic
    num_fewshot=5,        # the seed's five-shot
    limit=0,              # score only the first `limit` examples of each task (each MMLU subject); 0 = all
    data_dir="data/eval",  # local files <data_dir>/<task>/<split>.jsonl|.parquet in the hub schema; else the hub
    arithmetic_dir="data/arithmetic",  # where prepare_data.py wrote test.jsonl (--tasks=arithmetic)
    out_dir="",           # where eval.json and eval.md go; "" = beside the checkpoint
    batch_size=16,        # sequences per forward pass
    max_new_tokens=256,   # generation (TriviaQA, arithmetic): lm-eval's max_gen_toks
    fewshot_seed=1234,    # lm-eval's fewshot_random_seed
    device="auto",        # auto = cuda, else mps, else cpu
    dtype="auto",         # auto | float32 | bfloat16 | float16; auto = bf16 where the device computes it natively
)

# The SmallDoge guide's pre-training evaluation (lighteval, five-shot), as published.
SEED_ROWS = {
    "Doge-20M": dict(mmlu=25.43, triviaqa=0.03, arc_easy=36.83, arc_challenge=22.78, piqa=58.38, hellaswag=27.25,
                     openbookqa=25.60, winogrande=50.20),
    "Doge-60M": dict(mmlu=26.41, triviaqa=0.18, arc_easy=50.46, arc_challenge=25.34, piqa=61.43, hellaswag=31.45,
                     openbookqa=28.00, winogrande=50.75),
}

TARGET_DELIMITER, FEWSHOT_DELIMITER = " ", "\n\n"  # lm-eval's defaults; none of these tasks changes them
TRIVIAQA_STOPS = ["\n", ".", ","]  # lm-eval tasks/triviaqa/default.yaml, generation_kwargs.until

# -----------------------------------------------------------------------------
# the tasks: one function per task turns a dataset row into the texts lm-eval scores

@dataclass
class Example:
    """One question as lm-eval renders it: (context, continuation) pairs to score, each continuation starting
    with the target delimiter " ", and the index of the right pair; for generation, the accepted answers."""
    pairs: list
    gold: int
    answers: list = None

    def solved(self):
        """The example as a few-shot example: its right pair, whole."""
        context, continuation = self.pairs[self.gold]
        return context + continuation


def choices_after(question, choices, gold):
    return Example([(question, TARGET_DELIMITER + choice) for choice in choices], gold)


def mmlu(row):
    """tasks/mmlu/default/_default_template_yaml: the question, the lettered choices; the letter is scored."""
    lettered = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"]))
    return choices_after(f"{row['question'].strip()}{lettered}\nAnswer:", list("ABCD"), int(row["answer"]))


def mmlu_description(row):
    """tasks/mmlu/default/mmlu_<subject>.yaml: the text before the few-shot examples."""
    return f"The following are multiple choice questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"


def triviaqa(row):
    """tasks/triviaqa/default.yaml: a few-shot example answers with the first alias."""
    aliases = row["answer"]["aliases"]
    return Example([(f"Question: {row['question']}?\nAnswer:", TARGET_DELIMITER + aliases[0])], 0, aliases)


def arc(row):
    """tasks/arc/arc_easy.yaml (arc_challenge.yaml includes it)."""
    choices = row["choices"]
    return choices_after(f"Question: {row['question']}\nAnswer:", choices["text"],
                         choices["label"].index(row["answerKey"]))


def piqa(row):
    """tasks/piqa/piqa.yaml."""
    return choices_after(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def hellaswag_text(text):
    """tasks/hellaswag/utils.py preprocess: WikiHow's bracketed artifacts out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row):
    """tasks/hellaswag/utils.py process_docs: the activity, then the context; the endings cleaned the same way."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return choices_after(hellaswag_text(row["activity_label"] + ": " + context),
                         [hellaswag_text(ending) for ending in row["endings"]], int(row["label"]))


def openbookqa(row):
    """tasks/openbookqa/openbookqa.yaml: the bare question stem."""
    choices = row["choices"]
    return choices_after(row["question_stem"], choices["text"], choices["label"].index(row["answerKey"].lstrip()))


def winogrande(row):
    """tasks/winogrande/preprocess_winogrande.py: partial scoring. The blank is filled with each option; the
    rest of the sentence, the same for both, is what is scored."""
    blank = row["sentence"].index("_")
    rest = row["sentence"][blank + 1:].strip()
    contexts = [row["sentence"][:blank] + option for option in (row["option1"], row["option2"])]
    return Example([(context, TARGET_DELIMITER + rest) for context in contexts], {"1": 0, "2": 1}[row["answer"]])


@dataclass
class Task:
    hub: tuple            # (dataset path, config name) on the hub
    eval_split: str       # what lm-eval scores: the test split, else the validation split
    fewshot_split: str
    example: callable     # row -> Example
    column: str           # the seed table's column
    metrics: tuple        # those lm-eval's task file lists; the seed table's column shows the first
    description: callable = None  # row -> the text before the few-shot examples
    by_subject: bool = False      # few-shot examples: the subject's first k, not a draw; --limit per subject
    generate: bool = False


TASKS = {
    "mmlu": Task(("cais/mmlu", "all"), "test", "dev", mmlu, "MMLU", ("acc",), mmlu_description, by_subject=True),
    "triviaqa": Task(("mandarjoshi/trivia_qa", "rc.nocontext"), "validation", "train", triviaqa, "TriviaQA",
                     ("exact_match",), generate=True),
    "arc_easy": Task(("allenai/ai2_arc", "ARC-Easy"), "test", "train", arc, "ARC-E", ("acc_norm", "acc")),
    "arc_challenge": Task(("allenai/ai2_arc", "ARC-Challenge"), "test", "train", arc, "ARC-C", ("acc_norm", "acc")),
    "piqa": Task(("baber/piqa", None), "validation", "train", piqa, "PIQA", ("acc_norm", "acc")),
    "hellaswag": Task(("Rowan/hellaswag", None), "validation", "train", hellaswag, "HellaSwag", ("acc_norm", "acc")),
    "openbookqa": Task(("allenai/openbookqa", "main"), "test", "train", openbookqa, "OBQA", ("acc_norm", "acc")),
    "winogrande": Task(("allenai/winogrande", "winogrande_xl"), "validation", "train", winogrande, "Winogrande",
                       ("acc",)),
}

# -----------------------------------------------------------------------------
# data: local files in the hub schema, else the hub

def split_rows(name, split, data_dir):
    """(rows of one split, where they came from): <data_dir>/<name>/<split>.jsonl or .parquet if there, else the
    hub dataset, downloaded once into datasets' cache."""
    for extension in (".jsonl", ".parquet"):
        path = os.path.join(data_dir, name, split + extension)
        if os.path.isfile(path):
            return list(dataset_rows.local_rows(path)), path
    task = TASKS[name]
    hub_path, config_name = task.hub
    hint = (f"cannot reach the Hugging Face Hub for {name} ({hub_path}): offline, put its {task.eval_split} and "
            f"{task.fewshot_split} splits in the hub's schema at --data_dir={data_dir} as {name}/<split>.jsonl "
            f"(or .parquet); --tasks=arithmetic runs offline")
    rows = list(dataset_rows.hub_rows(hub_path, config_name, split, hint, streaming=False))
    return rows, f"{hub_path}" + (f" ({config_name})" if config_name else "")


def first_rows(rows, limit, by_subject):
    """The first `limit` rows (0 = all), or the first `limit` of each subject."""
    if not limit or not by_subject:
        return rows[:limit or None]
    kept, seen = [], {}
    for row in rows:
        seen[row["subject"]] = seen.get(row["subject"], 0) + 1
        if seen[row["subject"]] <= limit:
            kept.append(row)
    return kept


def with_fewshot(task, rows, fewshot_rows, k, seed):
    """Each row's Example with the few-shot examples before every context, as lm-eval 0.4.13's fewshot_context
    builds it (api/task.py, api/samplers.py). The random draws come from one random.Random(seed) per task, one
    draw per row in order, so a row's examples depend on its position: --limit keeps the first rows' draws."""
    rng = random.Random(seed)
    examples = []
    for row in rows:
        if k == 0:
            shots = []
        elif task.by_subject:  # the first_n sampler over the subject's dev questions
            shots = [r for r in fewshot_rows if r["subject"] == row["subject"]][:k]
        elif task.eval_split == "test":
            shots = rng.sample(fewshot_rows, k)
        else:  # lm-eval sees the few-shot split (none named) equal the test split (none): it avoids the row itself
            shots = [r for r in rng.sample(fewshot_rows, k + 1) if r != row][:k]
        prefix = (task.description(row) if task.description else "") + \
            "".join(task.example(shot).solved() + FEWSHOT_DELIMITER for shot in shots)
        example = task.example(row)
        examples.append(replace(example, pairs=[(prefix + context, continuation)
                                                for context, continuation in example.pairs]))
    return examples

# -----------------------------------------------------------------------------
# scoring: log-likelihoods through the model's forward, greedy generation through the engine

def encode_pairs(tok, pairs):
    """(context ids, continuation ids) of each (context, continuation), as lm-eval's _encode_pair makes them
    (api/model.py): spaces that end the context move to the continuation, context + continuation is encoded
    whole, and the continuation's tokens are those after as many tokens as the context alone has; an empty
    context is the end-of-text token. Each distinct text is encoded once (a question's choices share its context)."""
    moved = []
    for context, continuation in pairs:
        kept = context.rstrip()
        moved.append((kept, context[len(kept):] + continuation))
    texts = sorted({text for context, continuation in moved for text in (context, context + continuation)})
    ids = dict(zip(texts, tok.encode_batch(texts)))
    return [([tok.eos_id], ids[continuation]) if not context else
            (ids[context], ids[context + continuation][len(ids[context]):]) for context, continuation in moved]


@torch.no_grad()
def loglikelihoods(model, requests, batch_size, desc="scoring"):
    """The log-likelihood of each (context ids, continuation ids): the sum over the continuation's tokens of
    log p(token | every token before it), in float32. The model reads (context + continuation)[:-1], its last
    max_position_embeddings tokens if longer (lm-eval's truncation). Inputs go through the model in batches,
    longest first, right-padded: attention is causal, so no position sees the pads after it and a row scores as it
    would alone (tested; beyond keep_window_size keys Doge's dynamic mask keeps the top ones only, which a Doge
    whose keep_window_size is its max_position_embeddings, as SmallDoge's, never reaches). Requests with the same
    input (MMLU's four one-letter answers after one context) share one row. The head runs only at the positions
    scored: Doge.forward's logits are lm_head(hidden_states(idx)) at every position."""
    max_len = model.config.max_position_embeddings
    inputs = [tuple((context + continuation)[-(max_len + 1):][:-1]) for context, continuation in requests]
    requests_of = {}  # input -> the requests that read it
    for i, ids in enumerate(inputs):
        requests_of.setdefault(ids, []).append(i)
    unique = sorted(requests_of, key=len, reverse=True)
    device = model.lm_head.weight.device
    scores = [0.0] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="request", file=sys.stderr) as progress:
        for start in range(0, len(unique), batch_size):
            batch = unique[start:start + batch_size]
            idx = torch.zeros(len(batch), len(batch[0]), dtype=torch.long, device=device)
            for row, ids in enumerate(batch):
                idx[row, :len(ids)] = torch.tensor(ids)
            hidden, _ = model.hidden_states(idx)  # [B, T, C]
            for row, ids in enumerate(batch):
                # a request's continuation is predicted at the input's last len(continuation) positions: the
                # head runs once, over the longest such tail of the requests that share this input
                longest = max(len(requests[i][1]) for i in requests_of[ids])
                logprobs = torch.log_softmax(model.lm_head(hidden[row, len(ids) - longest:len(ids)]).float(), dim=-1)
                for i in requests_of[ids]:
                    continuation = requests[i][1]
                    target = torch.tensor(continuation, device=device)[:, None]
                    scores[i] = logprobs[longest - len(continuation):].gather(-1, target).sum().item()
                progress.update(len(requests_of[ids]))
    return scores


def choice_metrics(example, scores):
    """acc and acc_norm of one question from its choices' log-likelihoods, as lm-eval's process_results
    (api/task.py): acc_norm divides by the length in characters of the choice, the delimiter not counted. A tie
    goes to the first choice (numpy's argmax)."""
    lengths = [len(continuation) - len(TARGET_DELIMITER) for _, continuation in example.pairs]
    best = max(range(len(scores)), key=lambda i: scores[i])
    best_per_char = max(range(len(scores)), key=lambda i: scores[i] / lengths[i])
    return dict(acc=float(best == example.gold), acc_norm=float(best_per_char == example.gold))


def stop_token_ids(tok, stops):
    """The tokens whose text holds a stop string, and the end-of-text token: a row's generation ends at the first
    of them, where lm-eval's stop sequences would end its text."""
    ids = [i for i in range(tok.vocab_size) if i not in tok.special_names and any(s in tok.decode([i]) for s in stops)]
    return ids + [tok.eos_id]


@torch.no_grad()
def greedy_answers(model, tok, contexts, stops, max_new_tokens, batch_size):
    """Greedy continuations of the contexts, cut at the first stop string and stripped: lm-eval's generate_until
    (models/huggingface.py: the context keeps its last max_length - max_gen_toks tokens, the decoded text without
    special tokens is cut at each stop string) and the remove_whitespace filter. Batches of similar length
    through engine.generate_completions, which picks among the tokenizer's ids only (lm-eval's backend would also pick
    the rows of a model's vocabulary padded beyond its tokenizer's)."""
    room = model.config.max_position_embeddings - max_new_tokens
    prompts = [ids[-room:] for ids in tok.encode_batch(contexts)]
    stop_ids = stop_token_ids(tok, stops)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", file=sys.stderr):
        chunk = order[start:start + batch_size]
        rows = generate_completions(model, [prompts[i] for i in chunk], max_new_tokens, 0.0, stop_ids,
                                    tok.vocab_size, tok.eos_id)
        for i, row in zip(chunk, rows.tolist()):
            text = tok.decode([t for t in row if t not in tok.special_names])
            for stop in stops:
                text = text.split(stop)[0]
            answers[i] = text.strip()
    return answers


def exact_match(prediction, aliases):
    """lm-eval's exact_match with ignore_case and ignore_punctuation (api/metrics.py), true if any alias matches."""
    normal = lambda text: text.lower().translate(str.maketrans("", "", string.punctuation))
    return float(any(normal(prediction) == normal(alias) for alias in aliases))

# -----------------------------------------------------------------------------
# one task, end to end

def task_examples(name, cfg):
    """(Examples of the rows to score, with their few-shot examples; where the rows came from)."""
    task = TASKS[name]
    rows, source = split_rows(name, task.eval_split, cfg.data_dir)
    fewshot_rows = split_rows(name, task.fewshot_split, cfg.data_dir)[0] if cfg.num_fewshot else []
    needed = cfg.num_fewshot + (task.eval_split != "test")  # the tasks without a test split draw one more
    if cfg.num_fewshot and not task.by_subject and len(fewshot_rows) < needed:
        raise ValueError(f"{name}: num_fewshot={cfg.num_fewshot} needs {needed} rows in its {task.fewshot_split} "
                         f"split, which has {len(fewshot_rows)}")
    rows = first_rows(rows, cfg.limit, task.by_subject)
    return with_fewshot(task, rows, fewshot_rows, cfg.num_fewshot, cfg.fewshot_seed), source


def score_examples(name, model, tok, examples, cfg):
    """{metric: mean over the examples} of one lm-eval task, and the per-example numbers (log-likelihoods of
    the choices, or the generated answer)."""
    if TASKS[name].generate:
        answers = greedy_answers(model, tok, [ex.pairs[0][0] for ex in examples], TRIVIAQA_STOPS,
                                 cfg.max_new_tokens, cfg.batch_size)
        per_example = [dict(exact_match=exact_match(a, ex.answers)) for a, ex in zip(answers, examples)]
        details = answers
    else:
        pairs = [pair for ex in examples for pair in ex.pairs]
        scores = iter(loglikelihoods(model, encode_pairs(tok, pairs), cfg.batch_size, name))
        details = [[next(scores) for _ in ex.pairs] for ex in examples]
        per_example = [{metric: value for metric, value in choice_metrics(ex, lls).items()
                        if metric in TASKS[name].metrics} for ex, lls in zip(examples, details)]
    metrics = {key: sum(m[key] for m in per_example) / max(1, len(per_example)) for key in per_example[0]} \
        if per_example else {}
    return metrics, details


def arithmetic_accuracy(model, tok, cfg):
    """(metrics, number of problems, source) of the offline check: greedy chat answers to the held-out problems
    prepare_data.py writes, exact match of <answer> (what SFT and GRPO report)."""
    path = os.path.join(cfg.arithmetic_dir, "test.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run `python prepare_data.py` (offline, seconds) to write "
                                "the held-out arithmetic problems, or pass --arithmetic_dir=<its directory>")
    rows = first_rows(list(dataset_rows.local_rows(path)), cfg.limit, by_subject=False)
    accuracy, _ = evaluate_accuracy(model, tok, rows, cfg.max_new_tokens, cfg.batch_size)
    return dict(accuracy=accuracy), len(rows), path

# -----------------------------------------------------------------------------
# the model, the results files, the table

def load(cfg):
    """(model in the compute dtype, tokenizer, the init_from evaluated)."""
    init_from = cfg.init_from or ckpt.newest_model("out")
    if init_from is None:
        raise FileNotFoundError("nothing trained under out/ yet: pass --init_from=<out dir | ckpt file | Hugging "
                                "Face dir | hub id>")
    if not os.path.exists(init_from) and os.path.isdir(os.path.dirname(init_from) or "."):
        raise FileNotFoundError(f"no checkpoint at {init_from}: pass --init_from=<out dir | ckpt file | Hugging "
                                "Face dir | hub id>")
    device = devices.setup_distributed(cfg.device).device
    dtype, why = devices.resolve_dtype(cfg.dtype, device)
    print(f"evaluating {init_from} on {device} | {why}", file=sys.stderr)
    model, tok, _ = ckpt.load_model(init_from, device, cfg.tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{init_from}: its tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: the checkpoint's tokenizer is not the model's")
    return model.to(getattr(torch, dtype)).eval(), tok, init_from


def results_dir(cfg, init_from):
    """Beside the checkpoint: its run or Hugging Face directory; out/eval/<owner>--<name> for a hub id."""
    if cfg.out_dir:
        return cfg.out_dir
    if os.path.isfile(init_from):
        return os.path.dirname(init_from) or "."
    if os.path.isdir(init_from):
        return init_from
    return os.path.join("out", "eval", init_from.replace("/", "--"))


def markdown(init_from, results):
    """The seed's table with this model's row first (percent, the column's metric), then every number."""
    columns = list(TASKS) + [name for name in results if name not in TASKS]  # arithmetic last, if evaluated
    header = lambda name: TASKS[name].column if name in TASKS else name
    shown = lambda name: TASKS[name].metrics[0] if name in TASKS else "accuracy"
    cell = lambda value: "–" if value is None else f"{value:.2f}"
    lines = ["| model | " + " | ".join(map(header, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
    ours = [100 * results[name][shown(name)] if name in results else None for name in columns]
    lines.append(f"| {init_from} (lm-eval 0.4.13 definitions) | " + " | ".join(map(cell, ours)) + " |")
    for seed, row in SEED_ROWS.items():
        lines.append(f"| {seed} (SmallDoge guide, lighteval) | " + " | ".join(cell(row.get(n)) for n in columns) + " |")
    lines += ["", "| task | metric | value | examples | shots | seconds | data |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for metric in [m for m in ("acc", "acc_norm", "exact_match", "accuracy") if m in result]:
            lines.append(f"| {name} | {metric} | {result[metric]:.4f} | {result['examples']} | "
                         f"{result['num_fewshot']} | {result['seconds']} | {result['source']} |")
    return "\n".join(lines) + "\n"


def write_results(directory, init_from, results):
    """eval.json and eval.md in directory; tasks evaluated before and not now keep their numbers."""
    path = os.path.join(directory, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            results = {**json.load(f).get("tasks", {}), **results}
    files.write_file(path, json.dumps(dict(model=init_from, tasks=results), indent=2))
    table = markdown(init_from, results)
    files.write_file(os.path.join(directory, "eval.md"), f"# {init_from}\n\n" + table)
    return table

# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = settings.load_config(DEFAULTS, argv)
    names = [name.strip() for name in cfg.tasks.split(",") if name.strip()]
    known = list(TASKS) + ["arithmetic"]
    for name in names:
        if name not in known:
            raise ValueError(f"unknown task {name!r}: --tasks takes a comma-separated list of {', '.join(known)}")
    if not names or cfg.num_fewshot < 0 or cfg.limit < 0 or cfg.batch_size < 1:
        raise ValueError("--tasks must name a task, --num_fewshot and --limit be >= 0, --batch_size >= 1")
    model, tok, init_from = load(cfg)
    results = {}
    for name in names:
        start = time.time()
        if name == "arithmetic":
            metrics, count, source = arithmetic_accuracy(model, tok, cfg)
            shots = 0
        else:
            examples, source = task_examples(name, cfg)
            metrics, _ = score_examples(name, model, tok, examples, cfg)
            count, shots = len(examples), cfg.num_fewshot
        results[name] = dict(metrics, examples=count, num_fewshot=shots, limit=cfg.limit, source=source,
                             seconds=round(time.time() - start, 1))
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) +
              f" ({count} examples, {results[name]['seconds']} s)", file=sys.stderr)
    directory = results_dir(cfg, init_from)
    print(write_results(directory, init_from, results))
    print(f"wrote {directory}/eval.json and eval.md", file=sys.stderr)


if __name__ == "__main__":
    settings.run(main)
