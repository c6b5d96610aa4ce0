"""eval.py: log-likelihoods equal to a direct forward pass and free of padding effects, acc/acc_norm/exact match
as defined, each task's prompts and few-shot draws, every task end to end on local files in the hub schema, one-line
errors, and (where lm-eval is installed) per-example equality with lm-evaluation-harness's Hugging Face backend."""
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import eval as ev
from conftest import write_bpe_tokenizer_json
from nanodoge import tokenizer as tk
from nanodoge.checkpoint import load_model
from model import Doge, DogeConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECTS = ["college_physics", "high_school_european_history"]

# -----------------------------------------------------------------------------
# fixtures: a tiny Hugging Face-format Doge and a few rows of every task in its hub schema

def sample_rows():
    """{task: {split: rows}} in each hub dataset's schema, with the quirks the prompts must handle (HellaSwag's
    WikiHow brackets, ARC's digit labels, OpenBookQA's answer key with a space, Winogrande's blank)."""
    arc = lambda i, digits: dict(id=f"q{i}", question=f"Which of these melts first at {i} degrees?",
                                 choices=dict(text=["ice", "a stone wall", "iron", "glass beads"][:3 + i % 2],
                                              label=(list("1234") if digits else list("ABCD"))[:3 + i % 2]),
                                 answerKey=("1234" if digits else "ABCD")[i % 3])
    rows = dict(
        mmlu={split: [dict(question=f" What is {i} times {s}? ", subject=subject, answer=(i + s) % 4,
                           choices=[str(i * s), str(i + s), str(i * s + 1), "none of these"])
                      for s, subject in enumerate(SUBJECTS) for i in range(n)]
              for split, n in (("test", 3), ("dev", 5))},
        triviaqa={split: [dict(question=f"Which river flows through city number {i + offset}",
                               question_id=f"t{i}", answer=dict(value="The Thames", aliases=["The Thames", "Thames"],
                                                                normalized_aliases=["the thames", "thames"]))
                          for i in range(n)] for split, n, offset in (("validation", 4, 0), ("train", 8, 100))},
        arc_easy=dict(test=[arc(i, i == 1) for i in range(4)], train=[arc(10 + i, False) for i in range(8)]),
        arc_challenge=dict(test=[arc(20 + i, False) for i in range(3)], train=[arc(30 + i, True) for i in range(8)]),
        piqa={split: [dict(goal=f"To open jar {i},", sol1="twist the lid.", sol2="hit it with a hammer hard.",
                           label=i % 2) for i in range(n)] for split, n in (("validation", 4), ("train", 8))},
        hellaswag={split: [dict(ind=i, activity_label="Making a cake", ctx_a=f"A person mixes {i} eggs [header].",
                                ctx_b="they pour", split_type="indomain", source_id=f"wikihow~{i}",
                                ctx=f"A person mixes {i} eggs. they pour",
                                endings=["the batter [title] into a pan.", "  the car away.", "it out.", "sand."],
                                label=str(i % 4)) for i in range(n)] for split, n in (("validation", 4), ("train", 8))},
        openbookqa={split: [dict(id=f"o{i}", question_stem=f"The sun is a source of {i}",
                                 choices=dict(text=["light", "water", "soil", "wind"], label=list("ABCD")),
                                 answerKey=" " + "ABCD"[i % 4] if i == 1 else "ABCD"[i % 4])
                            for i in range(n)] for split, n in (("test", 4), ("train", 8))},
        winogrande={split: [dict(sentence=f"Sarah lent Maria {i} books because _ had finished reading them.",
                                 option1="Sarah", option2="Maria", answer=str(1 + i % 2))
                            for i in range(n)] for split, n in (("validation", 4), ("train", 8))},
    )
    return rows


def write_rows(data_dir, rows):
    for task, splits in rows.items():
        os.makedirs(os.path.join(data_dir, task), exist_ok=True)
        for split, split_rows in splits.items():
            with open(os.path.join(data_dir, task, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in split_rows)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("eval_data")
    write_rows(str(data_dir), sample_rows())
    return str(data_dir)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_text):
    """A save_pretrained directory with a byte-level BPE tokenizer.json, as SmallDoge publishes them (and a
    tokenizer_config.json naming the end-of-text token, which lm-eval's backend needs)."""
    path = tmp_path_factory.mktemp("hf")
    write_bpe_tokenizer_json(path, tiny_text[:60_000], 600)
    tok = tk.load_tokenizer(str(path))
    tok.save(str(path))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": tk.EOS,
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}))
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024))
    with torch.no_grad():  # A, norms and residuals off their init, so that a mix-up would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if name.endswith(".A") else 1.0))
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def loaded(hf_dir):
    model, tok, _ = load_model(hf_dir)
    return model.eval(), tok


def settings(**overrides):
    return SimpleNamespace(**{**ev.DEFAULTS, **overrides})

# -----------------------------------------------------------------------------
# scoring

@torch.no_grad()
def loglikelihood_by_hand(model, context, continuation):
    """Doge.forward on context + continuation, the log-softmax of each position, summed over the continuation."""
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(ids)[0][0].float(), dim=-1)
    return sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(continuation))


def test_loglikelihood_equals_a_direct_forward_pass(loaded):
    model, tok = loaded
    pairs = [("Question: what is 2 + 2?\nAnswer:", " 4"), ("The cat sat on the", " mat and slept all day"),
             ("\n".join(f"Line {i}: the {i}th line of a longer context." for i in range(30)), " The end.")]
    requests = ev.encode_pairs(tok, pairs)
    for (context, continuation), score in zip(requests, ev.loglikelihoods(model, requests, batch_size=3)):
        assert abs(score - loglikelihood_by_hand(model, context, continuation)) < 1e-4


def test_batched_scores_equal_one_by_one(loaded):
    """Right-padded batches of very different lengths (pads after a row never reach it through causal attention),
    and requests sharing one input (four one-token answers after one context), score as each does alone."""
    model, tok = loaded
    rng = random.Random(0)
    pairs = [(" ".join(rng.choice(["one", "two", "three", "four"]) for _ in range(rng.randint(1, 60))), " " + choice)
             for _ in range(12) for choice in ("A", "B", "C")]
    requests = ev.encode_pairs(tok, pairs)
    batched = ev.loglikelihoods(model, requests, batch_size=16)
    alone = [ev.loglikelihoods(model, [request], batch_size=1)[0] for request in requests]
    assert max(abs(a - b) for a, b in zip(batched, alone)) < 1e-5


def test_encode_pairs_as_lm_eval():
    """The context's trailing spaces go to the continuation; the continuation's tokens are those of the whole
    text after as many tokens as the context alone has; an empty context is the end-of-text token."""
    tok = SimpleNamespace(eos_id=0, encode_batch=lambda texts: [[ord(c) for c in text.replace("ab", "X")]
                                                                for text in texts])
    assert ev.encode_pairs(tok, [("ca ", "b")]) == [([ord("c"), ord("a")], [ord(" "), ord("b")])]
    # "a" + "b" encode together as one token: the context's token count decides where the continuation starts
    assert ev.encode_pairs(tok, [("ca", "b")]) == [([ord("c"), ord("a")], [])]
    assert ev.encode_pairs(tok, [("", "b")]) == [([0], [ord("b")])]


def test_acc_and_acc_norm_are_lm_evals():
    """acc: the largest log-likelihood; acc_norm: the largest per character of the choice (the " " before it not
    counted); ties to the first."""
    example = ev.Example([("Q:", " ab"), ("Q:", " abcdef")], gold=1)
    assert ev.choice_metrics(example, [-4.0, -6.0]) == dict(acc=0.0, acc_norm=1.0)  # -2/char < -1/char
    assert ev.choice_metrics(example, [-4.0, -4.0]) == dict(acc=0.0, acc_norm=1.0)
    assert ev.choice_metrics(ev.Example(example.pairs, gold=0), [-3.0, -9.0]) == dict(acc=1.0, acc_norm=1.0)


def test_a_choice_known_by_construction(loaded):
    """A choice that extends another by more tokens has a lower log-likelihood (every token's log-probability is
    below 0): acc picks the shorter one, whatever the weights."""
    model, tok = loaded
    examples = [ev.Example([("Answer:", " the river"), ("Answer:", " the river flows into the sea")], gold=0),
                ev.Example([("Name it:", " sun and moon and stars"), ("Name it:", " sun")], gold=1)]
    metrics, details = ev.score_examples("arc_easy", model, tok, examples, settings(batch_size=4))
    assert metrics["acc"] == 1.0 and all(lls[ex.gold] > lls[1 - ex.gold] for ex, lls in zip(examples, details))


def test_exact_match_ignores_case_and_punctuation():
    assert ev.exact_match("the Thames!", ["The Thames", "Thames"]) == 1.0
    assert ev.exact_match("Thames river", ["The Thames", "Thames"]) == 0.0
    assert ev.exact_match("thames", ["The Thames"]) == 0.0  # articles stay (lm-eval's match, not SQuAD's)


def test_greedy_answers_stop_at_the_first_stop_string(loaded):
    """The engine's greedy tokens, decoded and cut at the first "\\n", "." or ",", equal a full forward pass per token
    continued to the same length and cut the same way."""
    model, tok = loaded
    contexts = ["Question: which river?\nAnswer:", "Once upon a time, in a land far", "The"]
    answers = ev.greedy_answers(model, tok, contexts, ev.TRIVIAQA_STOPS, max_new_tokens=12, batch_size=2)
    for context, answer in zip(contexts, answers):
        ids = tok.encode(context)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1, :tok.vocab_size].argmax()))
        text = tok.decode(ids[len(tok.encode(context)):])
        for stop in ev.TRIVIAQA_STOPS:
            text = text.split(stop)[0]
        assert answer == text.strip()

# -----------------------------------------------------------------------------
# prompts and few-shot examples

def test_prompts_of_each_task(samples):
    """lm-eval's text for one row of each task, written out."""
    rows = sample_rows()
    arc = ev.arc(rows["arc_easy"]["test"][1])  # digit labels
    assert arc.pairs[0] == ("Question: Which of these melts first at 1 degrees?\nAnswer:", " ice") and arc.gold == 1
    mmlu = ev.mmlu(rows["mmlu"]["test"][0])
    assert mmlu.pairs[2] == ("What is 0 times 0?\nA. 0\nB. 0\nC. 1\nD. none of these\nAnswer:", " C")
    assert ev.mmlu_description(rows["mmlu"]["test"][-1]) == \
        "The following are multiple choice questions (with answers) about high school european history.\n\n"
    hellaswag = ev.hellaswag(rows["hellaswag"]["validation"][2])
    assert hellaswag.pairs[0] == ("Making a cake: A person mixes 2 eggs . They pour", " the batter. into a pan.")
    assert [c for _, c in hellaswag.pairs[1:]] == [" the car away.", " it out.", " sand."] and hellaswag.gold == 2
    obqa = ev.openbookqa(rows["openbookqa"]["test"][1])  # answerKey " B"
    assert obqa.pairs[1] == ("The sun is a source of 1", " water") and obqa.gold == 1
    wino = ev.winogrande(rows["winogrande"]["validation"][1])
    assert wino.pairs == [("Sarah lent Maria 1 books because Sarah", " had finished reading them."),
                          ("Sarah lent Maria 1 books because Maria", " had finished reading them.")] and wino.gold == 1
    trivia = ev.triviaqa(rows["triviaqa"]["validation"][0])
    assert trivia.pairs == [("Question: Which river flows through city number 0?\nAnswer:", " The Thames")]
    piqa = ev.piqa(rows["piqa"]["validation"][1])
    assert piqa.pairs[1] == ("Question: To open jar 1,\nAnswer:", " hit it with a hammer hard.") and piqa.gold == 1


def test_fewshot_draws_follow_lm_evals_sampler(samples):
    """random.Random(1234), one draw per row in order: k for tasks with a test split; for those without, k + 1,
    the evaluated row dropped if drawn (PIQA's sample train split holds copies of its validation rows), the first k
    kept. MMLU: the subject's first k dev questions after its description."""
    rows = sample_rows()
    dropped = 0
    for name, k in (("arc_easy", 3), ("piqa", 3)):
        task = ev.TASKS[name]
        train, evaluated = rows[name]["train"], rows[name][task.eval_split]
        examples = ev.with_fewshot(task, evaluated, train, k, seed=1234)
        rng = random.Random(1234)
        for row, example in zip(evaluated, examples):
            if name == "arc_easy":
                shots = rng.sample(train, k)
            else:
                drawn = rng.sample(train, k + 1)
                shots = [shot for shot in drawn if shot != row][:k]
                dropped += row in drawn[:k]
            prefix = "".join(task.example(shot).solved() + "\n\n" for shot in shots)
            assert [c for c, _ in example.pairs] == [prefix + c for c, _ in task.example(row).pairs]
    assert dropped  # the rule was exercised
    task = ev.TASKS["mmlu"]
    test, dev = rows["mmlu"]["test"], rows["mmlu"]["dev"]
    example = ev.with_fewshot(task, test[-1:], dev, 2, seed=1234)[0]
    shots = [row for row in dev if row["subject"] == SUBJECTS[1]][:2]
    assert example.pairs[0][0] == ev.mmlu_description(test[-1]) + "".join(
        ev.mmlu(shot).solved() + "\n\n" for shot in shots) + ev.mmlu(test[-1]).pairs[0][0]
    assert ev.first_rows(test, 2, by_subject=True) == test[:2] + test[3:5]  # --limit per subject

# -----------------------------------------------------------------------------
# end to end

def test_every_task_end_to_end_on_local_files(samples, hf_dir, tmp_path, capsys):
    arithmetic_dir = tmp_path / "arithmetic"
    arithmetic_dir.mkdir()
    system = dict(role="system", content=tk.SYSTEM_PROMPT)
    problems = [dict(messages=[system, dict(role="user", content=f"What is {a} + 3?")], answer=str(a + 3))
                for a in range(3)]
    (arithmetic_dir / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    ev.main([f"--init_from={hf_dir}", f"--data_dir={samples}", f"--arithmetic_dir={arithmetic_dir}",
             "--num_fewshot=3", "--max_new_tokens=8", f"--out_dir={tmp_path}", "--dtype=float32",
             "--tasks=" + ",".join(list(ev.TASKS) + ["arithmetic"])])
    results = json.loads((tmp_path / "eval.json").read_text())["tasks"]
    rows = sample_rows()
    for name, task in ev.TASKS.items():
        assert results[name]["examples"] == len(rows[name][task.eval_split])
        assert all(0.0 <= results[name][metric] <= 1.0 for metric in task.metrics)
    assert {"acc", "acc_norm"} <= set(results["arc_easy"]) and "acc_norm" not in results["winogrande"]
    assert results["arithmetic"]["examples"] == 3 and results["arithmetic"]["accuracy"] == 0.0
    table = (tmp_path / "eval.md").read_text()
    assert "| Doge-20M (SmallDoge guide, lighteval) | 25.43 | 0.03 | 36.83 | 22.78 | 58.38 | 27.25 | 25.60 | 50.20 |" \
        in table
    assert "| Doge-60M (SmallDoge guide, lighteval) | 26.41 | 0.18 | 50.46 | 25.34 | 61.43 | 31.45 | 28.00 | 50.75 |" \
        in table
    assert table.split("\n", 2)[2] in capsys.readouterr().out
    # a later run of one task keeps the others' numbers; --limit takes the first rows (per MMLU subject)
    ev.main([f"--init_from={hf_dir}", f"--data_dir={samples}", "--tasks=mmlu", "--limit=1", f"--out_dir={tmp_path}"])
    results = json.loads((tmp_path / "eval.json").read_text())["tasks"]
    assert results["mmlu"]["examples"] == len(SUBJECTS) and "arithmetic" in results

# -----------------------------------------------------------------------------
# errors

def one_line_error(error_type, argv):
    with pytest.raises(error_type) as e:
        ev.main(argv)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_one_line(samples, hf_dir, tmp_path):
    assert "unknown task 'mmlu_pro'" in one_line_error(ValueError, [f"--init_from={hf_dir}", "--tasks=mmlu_pro"])
    assert "no checkpoint at" in one_line_error(FileNotFoundError, [f"--init_from={tmp_path}/nope", "--tasks=piqa"])
    # no local file and no hub (tests run with HF_HUB_OFFLINE=1): the line names --data_dir
    message = one_line_error(ValueError, [f"--init_from={hf_dir}", f"--data_dir={tmp_path}", "--tasks=piqa"])
    assert "--data_dir" in message and "piqa/<split>.jsonl" in message
    assert "prepare_data.py" in one_line_error(FileNotFoundError, [
        f"--init_from={hf_dir}", "--tasks=arithmetic", f"--arithmetic_dir={tmp_path}"])
    assert "num_fewshot=9" in one_line_error(ValueError, [
        f"--init_from={hf_dir}", f"--data_dir={samples}", "--tasks=piqa", "--num_fewshot=9", f"--out_dir={tmp_path}"])


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "eval.py", f"--init_from={tmp_path}/missing", "--tasks=piqa"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: no checkpoint")

# -----------------------------------------------------------------------------
# the reference harness: lm-evaluation-harness's Hugging Face backend on the same checkpoint and rows
# (pip install "lm-eval[hf]==0.4.13"; skipped where it is not installed)

HARNESS_TASK_FILES = {"mmlu": "mmlu/default/mmlu_{subject}.yaml", "triviaqa": "triviaqa/default.yaml",
                      "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                      "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                      "openbookqa": "openbookqa/openbookqa.yaml", "winogrande": "winogrande/default.yaml"}


def harness_tasks(data_dir, config_dir, max_gen_toks):
    """{our task: [lm-eval task config]}: lm-eval's own task files, their dataset swapped for our local files
    (MMLU: a task per subject, as lm-eval's mmlu group has)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml
    configs = {}
    for name, task in ev.TASKS.items():
        configs[name] = []
        for subject in SUBJECTS if task.by_subject else [None]:
            files = {}
            for split in (task.eval_split, task.fewshot_split):
                with open(os.path.join(data_dir, name, f"{split}.jsonl")) as f:
                    rows = [line for line in f if subject is None or json.loads(line)["subject"] == subject]
                files[split] = os.path.join(config_dir, f"{name}_{subject}_{split}.jsonl")
                with open(files[split], "w") as f:
                    f.writelines(rows)
            config = load_yaml(os.path.join(os.path.dirname(lm_eval.tasks.__file__),
                                            HARNESS_TASK_FILES[name].format(subject=subject)))
            config.pop("tag", None)
            config.update(task=f"local_{name}_{subject}", dataset_path="json", dataset_name=None,
                          dataset_kwargs=dict(data_files=files))
            for key in ("training_split", "validation_split", "test_split"):
                config[key] = config.get(key) if config.get(key) in files else None
            if task.generate:
                config["generation_kwargs"] = dict(config["generation_kwargs"], max_gen_toks=max_gen_toks)
            configs[name].append(config)
    return configs


def test_equal_to_lm_evaluation_harness(samples, hf_dir, loaded, tmp_path):
    """Every task's requests (context, continuation), per-example log-likelihoods (to 1e-4), generated answers and
    metrics equal lm-eval 0.4.13's for the same checkpoint (exported, read by transformers' DogeForCausalLM) and
    rows, few-shot examples drawn by its sampler."""
    lm_eval = pytest.importorskip("lm_eval")
    model, tok = loaded
    shots, new_tokens = 3, 10
    cfg = settings(data_dir=str(tmp_path / "data"), num_fewshot=shots, batch_size=4, max_new_tokens=new_tokens)
    # TriviaQA: some aliases are our own answers, upper-cased and with punctuation, so a match is exercised
    rows = sample_rows()
    answers = ev.score_examples("triviaqa", model, tok, ev.with_fewshot(
        ev.TASKS["triviaqa"], rows["triviaqa"]["validation"], rows["triviaqa"]["train"], shots, 1234), cfg)[1]
    for row, answer in list(zip(rows["triviaqa"]["validation"], answers))[::2]:
        row["answer"]["aliases"] = [answer.upper() + "!", "Thames"]
    write_rows(cfg.data_dir, rows)
    configs = harness_tasks(cfg.data_dir, str(tmp_path), new_tokens)
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
                                      tasks=[c for task_configs in configs.values() for c in task_configs],
                                      num_fewshot=shots, batch_size=4, log_samples=True)
    for name, task in ev.TASKS.items():
        samples_of = [sorted(results["samples"][c["task"]], key=lambda s: s["doc_id"]) for c in configs[name]]
        harness = [s for task_samples in samples_of for s in task_samples]  # MMLU: subject by subject, as ours
        examples, _ = ev.task_examples(name, cfg)
        metrics, details = ev.score_examples(name, model, tok, examples, cfg)
        assert len(harness) == len(examples) == len(details)
        for sample, example, ours in zip(harness, examples, details):
            if task.generate:
                assert sample["arguments"][0][0] == example.pairs[0][0]
                assert sample["filtered_resps"][0] == ours
                assert sample["exact_match"] == ev.exact_match(ours, example.answers)
            else:
                assert [tuple(a) for a in sample["arguments"]] == example.pairs
                assert max(abs(ll - mine) for (ll, _), mine in zip(sample["filtered_resps"], ours)) < 1e-4
                assert all(sample[metric] == ev.choice_metrics(example, ours)[metric] for metric in metrics)
        for metric, value in metrics.items():
            assert abs(value - sum(s[metric] for s in harness) / len(harness)) < 1e-9, (name, metric)
        assert set(metrics) == set(task.metrics)
        if task.generate:
            assert 0 < metrics["exact_match"] < 1
