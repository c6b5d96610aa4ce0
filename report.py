"""
The offline chain's report, made from its run directories (no training): what each stage ran, how long it took,
its number before -> after, and a greedy answer to one held-out problem after each post-training stage.

    python report.py                    # out/{pt,sft,dpo,grpo} -> out/report.md, report.json, report.png
    python report.py --out_dir=/tmp/chain/out

run_chain.sh writes the stage times to <out_dir>/seconds.json and calls this at its end. Numbers are read from each
stage's log.jsonl: its first evaluation (logged before training) and its last; DPO's answer accuracy is GRPO's
starting one (the same model). report.json holds them for tools, report.png the loss curves (with matplotlib).
"""
import os
import sys
import json

import torch

import common
import checkpoint as ckpt
from engine import Engine
from tokenizer import render_chat

DEFAULTS = dict(out_dir="out")
STAGES = ["prepare", "pretrain", "sft", "dpo", "grpo", "sample"]
RUN_DIRS = dict(pretrain="pt", sft="sft", dpo="dpo", grpo="grpo")

def records(out_dir, stage):
    path = os.path.join(out_dir, RUN_DIRS[stage], "log.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run the chain first (bash run_chain.sh)")
    with open(path) as f:
        return [json.loads(line) for line in f]

def first_and_last(logs, key):
    """The value of key in the first and the last record holding it."""
    values = [r[key] for r in logs if key in r]
    if not values:
        raise ValueError(f"no record holds {key}: was the stage's log written by this version of nanodoge?")
    return values[0], values[-1]

def numbers(out_dir):
    """report.json's stage numbers."""
    pt, sft, dpo, grpo = (records(out_dir, stage) for stage in ("pretrain", "sft", "dpo", "grpo"))
    grpo_accuracy, grpo_reward = first_and_last(grpo, "accuracy"), first_and_last(grpo, "reward")
    preference = first_and_last(dpo, "val_rewards/accuracies")
    return {"pretrain": {"val_loss": first_and_last(pt, "val_loss")[1],
                         "unigram_val_loss": first_and_last(pt, "unigram_val_loss")[1]},
            "sft": dict(zip(("accuracy_before", "accuracy_after"), first_and_last(sft, "accuracy"))),
            "dpo": {"preference_accuracy_before": preference[0], "preference_accuracy_after": preference[1],
                    "accuracy_after": grpo_accuracy[0]},
            "grpo": {"accuracy_before": grpo_accuracy[0], "accuracy_after": grpo_accuracy[1],
                     "reward_before": grpo_reward[0], "reward_after": grpo_reward[1]}}

@torch.no_grad()
def sample_answer(run_dir):
    """The stage's greedy reply to the first held-out problem of the data it trained on: (question, reply)."""
    model, tok, checkpoint = ckpt.load_model(run_dir)
    with open(os.path.join(checkpoint["config"]["data_dir"], "test.jsonl")) as f:
        example = json.loads(f.readline())
    prompt, _ = render_chat(tok, example["messages"], add_generation_prompt=True)
    out = Engine(model.eval()).generate(torch.tensor([prompt]), 96, temperature=0.0,
                                        eos_token_id=[tok.end_of_turn_id, tok.eos_id], vocab_size=tok.vocab_size)
    reply = out[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(reply) if t in (tok.end_of_turn_id, tok.eos_id)), len(reply))
    return example["messages"][-1]["content"], tok.decode(reply[:stop])

def markdown(report, steps, answers, val_loss_before):
    n, s = report, report["seconds"]
    time = lambda stage: f"{s[stage]:.0f} s" if stage in s else "-"
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")
    rows = [
        ("prepare", "python prepare_data.py", "-", ""),
        ("pretrain", f"train_pt.py, {steps['pretrain']} steps", f"val loss {val_loss_before:.3f} -> "
         f"{n['pretrain']['val_loss']:.3f} (unigram baseline {n['pretrain']['unigram_val_loss']:.3f})", ""),
        ("sft", f"train_sft.py, {steps['sft']} steps", f"answer accuracy {n['sft']['accuracy_before']:.1%} -> "
         f"{n['sft']['accuracy_after']:.1%}", answers["sft"]),
        ("dpo", f"train_dpo.py, {steps['dpo']} steps", f"preference accuracy "
         f"{n['dpo']['preference_accuracy_before']:.2f} -> {n['dpo']['preference_accuracy_after']:.2f}; answer "
         f"accuracy {n['dpo']['accuracy_after']:.1%}", answers["dpo"]),
        ("grpo", f"train_grpo.py, {steps['grpo']} steps", f"answer accuracy {n['grpo']['accuracy_before']:.1%} -> "
         f"{n['grpo']['accuracy_after']:.1%}; mean reward {n['grpo']['reward_before']:.3f} -> "
         f"{n['grpo']['reward_after']:.3f}", answers["grpo"]),
    ]
    lines = [f"# The offline chain ({s.get('total', 0):.0f} s in all)", "",
             f"Held-out problem for the sampled answers: {cell(answers['question'])}", "",
             "| stage | what ran | time | before -> after | sampled answer |", "|---|---|---|---|---|"]
    rows.append(("sample", "sample.py --chat, one question", "", ""))
    lines += [f"| {stage} | {what} | {time(stage)} | {number} | {cell(answer)} |" for stage, what, number, answer in rows]
    return "\n".join(lines) + "\n"

def plot(out_dir, report, png_path):
    """Each stage's training loss (GRPO: its mean reward) and the stage numbers, in one figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no report.png (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (stage, key, title) in zip(axes, [("pretrain", "loss", "pre-training loss"), ("sft", "loss", "SFT loss"),
                                              ("dpo", "loss", "DPO loss"), ("grpo", "reward", "GRPO reward")]):
        points = [(r["step"], r[key]) for r in records(out_dir, stage) if key in r and "before" not in r
                  and ("loss" in r or stage != "grpo")]
        ax.plot(*zip(*points))
        ax.set_title(title), ax.set_xlabel("step")
    n = report
    fig.suptitle(f"val loss {n['pretrain']['val_loss']:.2f} (unigram {n['pretrain']['unigram_val_loss']:.2f}) | "
                 f"SFT accuracy {n['sft']['accuracy_before']:.0%} -> {n['sft']['accuracy_after']:.0%} | DPO preference "
                 f"accuracy {n['dpo']['preference_accuracy_before']:.2f} -> {n['dpo']['preference_accuracy_after']:.2f}"
                 f" | GRPO reward {n['grpo']['reward_before']:.2f} -> {n['grpo']['reward_after']:.2f}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)

def main(argv=None):
    cfg = common.load_config(DEFAULTS, argv)
    seconds_path = os.path.join(cfg.out_dir, "seconds.json")
    seconds = json.load(open(seconds_path)) if os.path.exists(seconds_path) else {}
    report = {"seconds": seconds, **numbers(cfg.out_dir)}
    steps = {stage: 1 + max(r["step"] for r in records(cfg.out_dir, stage) if "loss" in r) for stage in RUN_DIRS}
    answers = {}
    for stage in ("sft", "dpo", "grpo"):
        answers["question"], answers[stage] = sample_answer(os.path.join(cfg.out_dir, RUN_DIRS[stage]))
    common.write_file(os.path.join(cfg.out_dir, "report.json"), json.dumps(report, indent=2))
    val_loss_before = first_and_last(records(cfg.out_dir, "pretrain"), "val_loss")[0]
    common.write_file(os.path.join(cfg.out_dir, "report.md"), markdown(report, steps, answers, val_loss_before))
    plot(cfg.out_dir, report, os.path.join(cfg.out_dir, "report.png"))
    print(open(os.path.join(cfg.out_dir, "report.md")).read(), end="")
    print(f"report: {os.path.join(cfg.out_dir, 'report.md')}, report.json, report.png", file=sys.stderr)

if __name__ == "__main__":
    common.run(main)
