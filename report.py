"""
The offline chain's report, made from its run directories (no training): what each stage ran, how long it took,
its number before -> after, and a greedy answer to one held-out problem after each post-training stage. GRPO's
number is sampled accuracy with a paired-bootstrap 95% interval of its change, beside greedy accuracy and pass@k:
sampled accuracy closing on greedy while pass@k stays put is RL sharpening the policy.

    python report.py                    # out/{pt,sft,dpo,grpo} -> out/report.md, report.json, report.png
    python report.py --out_dir=/tmp/chain/out

run_chain.sh writes the stage times to <out_dir>/seconds.json and calls this at its end. Numbers are read from each
stage's log.jsonl: its first evaluation (logged before training) and its last; DPO's answer accuracy is GRPO's
starting one (the same model); GRPO's per-problem counts are its eval_<step>.json files. report.json holds them for
tools, report.png the loss curves and GRPO's pass@k (with matplotlib).
"""
import os
import sys
import glob
import json

import numpy as np
import torch

from nanodoge import checkpoint as ckpt, files, settings
from nanodoge.engine import Engine
from nanodoge.tokenizer import render_chat

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

def paired_bootstrap(before, after, generations, resamples=10_000, seed=0):
    """95% interval of the change in sampled accuracy, problems resampled with replacement (the paired
    bootstrap: each draw keeps a problem's before and after together, so problem difficulty cancels). before and
    after: right samples of `generations` per problem, the same problems in the same order."""
    change = (np.asarray(after) - np.asarray(before)) / generations
    draws = np.random.default_rng(seed).integers(0, len(change), size=(resamples, len(change)))
    low, high = np.percentile(change[draws].mean(axis=1), [2.5, 97.5])
    return [float(low), float(high)]

def noise_floor(sampled, generations, resamples=10_000, seed=0):
    """95% interval of the change in sampled accuracy that resampling alone gives: two samplings of the same,
    unchanged model, each problem's right samples drawn twice from Binomial(generations, its share at step 0).
    A change of the trained model inside it is not told apart from a second sampling seed."""
    share = np.asarray(sampled) / generations
    draws = np.random.default_rng(seed).binomial(generations, share, size=(2, resamples, len(share)))
    low, high = np.percentile((draws[1] - draws[0]).mean(axis=1) / generations, [2.5, 97.5])
    return [float(low), float(high)]

def grpo_evaluations(out_dir):
    """The per-problem counts of GRPO's first and last evaluations (train_grpo.py's eval_<step>.json files)."""
    paths = sorted(glob.glob(os.path.join(out_dir, RUN_DIRS["grpo"], "eval_*.json")))
    if not paths:
        raise FileNotFoundError(f"{os.path.join(out_dir, RUN_DIRS['grpo'])} holds no eval_*.json: was GRPO run by "
                                "this version of nanodoge?")
    first, last = (json.load(open(path)) for path in (paths[0], paths[-1]))
    if len(first["sampled"]) != len(last["sampled"]) or first["generations"] != last["generations"]:
        raise ValueError(f"{paths[0]} and {paths[-1]} evaluated different problems or numbers of samples")
    return first, last

def numbers(out_dir):
    """report.json's stage numbers."""
    pt, sft, dpo, grpo = (records(out_dir, stage) for stage in ("pretrain", "sft", "dpo", "grpo"))
    grpo_accuracy, grpo_reward = first_and_last(grpo, "accuracy"), first_and_last(grpo, "reward")
    sampled = first_and_last(grpo, "sampled_accuracy")
    evals = [r for r in grpo if "sampled_accuracy" in r]
    pass_at_k = [{"1": r["sampled_accuracy"], **{k[5:]: v for k, v in r.items() if k.startswith("pass@")}}
                 for r in (evals[0], evals[-1])]
    first, last = grpo_evaluations(out_dir)
    preference = first_and_last(dpo, "val_rewards/accuracies")
    return {"pretrain": {"val_loss": first_and_last(pt, "val_loss")[1],
                         "unigram_val_loss": first_and_last(pt, "unigram_val_loss")[1]},
            "sft": dict(zip(("accuracy_before", "accuracy_after"), first_and_last(sft, "accuracy"))),
            "dpo": {"preference_accuracy_before": preference[0], "preference_accuracy_after": preference[1],
                    "accuracy_after": grpo_accuracy[0]},
            "grpo": {"sampled_accuracy_before": sampled[0], "sampled_accuracy_after": sampled[1],
                     "sampled_accuracy_ci": paired_bootstrap(first["sampled"], last["sampled"], first["generations"]),
                     "sampled_accuracy_noise_floor": noise_floor(first["sampled"], first["generations"]),
                     "pass_at_k_before": pass_at_k[0], "pass_at_k_after": pass_at_k[1],
                     "accuracy_before": grpo_accuracy[0], "accuracy_after": grpo_accuracy[1],
                     "reward_before": grpo_reward[0], "reward_after": grpo_reward[1],
                     "temperature": first["temperature"], "band": last["band"],
                     # SFT's number (greedy answers to test.jsonl) on the GRPO model: the same held-out problems
                     "sft_accuracy_after": grpo_accuracy[1],
                     "problems": len(first["sampled"]), "generations": first["generations"]}}

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
    n, s, g = report, report["seconds"], report["grpo"]
    k = max(g["pass_at_k_after"], key=int)  # the largest k measured
    change, (low, high) = g["sampled_accuracy_after"] - g["sampled_accuracy_before"], g["sampled_accuracy_ci"]
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
        ("grpo", f"train_grpo.py, {steps['grpo']} steps", f"sampled accuracy (temperature {g['temperature']}, "
         f"{g['generations']} samples x {g['problems']} problems) {g['sampled_accuracy_before']:.1%} -> "
         f"{g['sampled_accuracy_after']:.1%} ({100 * change:+.1f} points, 95% interval {100 * low:+.1f} to "
         f"{100 * high:+.1f}); greedy accuracy {g['accuracy_before']:.1%} -> {g['accuracy_after']:.1%}; "
         f"pass@{k} {g['pass_at_k_before'][k]:.1%} -> {g['pass_at_k_after'][k]:.1%}; mean reward "
         f"{g['reward_before']:.3f} -> {g['reward_after']:.3f}", answers["grpo"]),
    ]
    lines = [f"# The offline chain ({s.get('total', 0):.0f} s in all)", "",
             f"Held-out problem for the sampled answers: {cell(answers['question'])}", "",
             "| stage | what ran | time | before -> after | sampled answer |", "|---|---|---|---|---|"]
    rows.append(("sample", "sample.py --chat, one question", "", ""))
    lines += [f"| {stage} | {what} | {time(stage)} | {number} | {cell(answer)} |" for stage, what, number, answer in rows]
    return "\n".join(lines + ["", what_rl_did(g)]) + "\n"

def what_rl_did(g):
    """GRPO's effect in words a learner can check against the numbers: the gap between greedy and sampled answers
    (sharpening closes it), and pass@k at the largest k (what the model can find at all). A change whose 95%
    interval holds 0 is said to be none."""
    k = max(g["pass_at_k_after"], key=int)
    gap = [g[f"accuracy_{when}"] - g[f"sampled_accuracy_{when}"] for when in ("before", "after")]
    reach = g["pass_at_k_after"][k] - g["pass_at_k_before"][k]
    moved = "stayed within a point" if abs(reach) < 0.01 else "rose" if reach > 0 else "fell"
    low, high = g["sampled_accuracy_ci"]
    floor_low, floor_high = g["sampled_accuracy_noise_floor"]
    verdict = ("GRPO made the answers the model could already find more likely: it sharpened the policy."
               if low > 0 and gap[1] < gap[0] else
               "The interval of the change holds 0: this GRPO run did not measurably sharpen the policy "
               "(LOG.md has the settings tried)." if low <= 0 <= high else
               "Sampled accuracy fell: this GRPO run made the policy worse.")
    return (f"What RL did: at temperature {g['temperature']}, the share of right samples went from "
            f"{g['sampled_accuracy_before']:.1%} to {g['sampled_accuracy_after']:.1%} (95% interval of the change "
            f"{100 * low:+.1f} to {100 * high:+.1f} points; a second sampling of the unchanged model moves it by "
            f"{100 * floor_low:+.1f} to {100 * floor_high:+.1f}), so the gap to greedy decoding went from "
            f"{100 * gap[0]:.1f} to {100 * gap[1]:.1f} points, while pass@{k} (a right answer among {k} samples) "
            f"{moved} ({g['pass_at_k_before'][k]:.1%} -> {g['pass_at_k_after'][k]:.1%}). {verdict} RL with a "
            "verifiable reward mostly sharpens: where it works, sampled accuracy climbs toward greedy accuracy "
            "while pass@k at large k stays flat.")

def plot(out_dir, report, png_path):
    """Each stage's training loss (GRPO: its mean reward) and the stage numbers, in one figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no report.png (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    for ax, (stage, key, title) in zip(axes, [("pretrain", "loss", "pre-training loss"), ("sft", "loss", "SFT loss"),
                                              ("dpo", "loss", "DPO loss"), ("grpo", "reward", "GRPO reward")]):
        points = [(r["step"], r[key]) for r in records(out_dir, stage) if key in r and "before" not in r
                  and ("loss" in r or stage != "grpo")]
        ax.plot(*zip(*points))
        ax.set_title(title), ax.set_xlabel("step")
    n, ax = report, axes[4]  # sharpening: sampled accuracy (pass@1) rises toward greedy, pass@k at large k does not
    for when, color in (("before", "tab:gray"), ("after", "tab:blue")):
        ks = sorted(n["grpo"][f"pass_at_k_{when}"], key=int)
        ax.plot([int(k) for k in ks], [n["grpo"][f"pass_at_k_{when}"][k] for k in ks], "o-", color=color,
                label=f"pass@k {when} GRPO")
        ax.axhline(n["grpo"][f"accuracy_{when}"], color=color, linestyle="--", label=f"greedy {when}")
    ax.set_xscale("log", base=2)
    ax.set_title(f"GRPO: pass@k at temperature {n['grpo']['temperature']}"), ax.set_xlabel("k samples")
    ax.legend(fontsize=7)
    fig.suptitle(f"val loss {n['pretrain']['val_loss']:.2f} (unigram {n['pretrain']['unigram_val_loss']:.2f}) | "
                 f"SFT accuracy {n['sft']['accuracy_before']:.0%} -> {n['sft']['accuracy_after']:.0%} | DPO preference "
                 f"accuracy {n['dpo']['preference_accuracy_before']:.2f} -> {n['dpo']['preference_accuracy_after']:.2f}"
                 f" | GRPO sampled accuracy {n['grpo']['sampled_accuracy_before']:.0%} -> "
                 f"{n['grpo']['sampled_accuracy_after']:.0%}, greedy {n['grpo']['accuracy_before']:.0%} -> "
                 f"{n['grpo']['accuracy_after']:.0%}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)

def main(argv=None):
    cfg = settings.load_config(DEFAULTS, argv)
    seconds_path = os.path.join(cfg.out_dir, "seconds.json")
    seconds = json.load(open(seconds_path)) if os.path.exists(seconds_path) else {}
    report = {"seconds": seconds, **numbers(cfg.out_dir)}
    steps = {stage: 1 + max(r["step"] for r in records(cfg.out_dir, stage) if "loss" in r) for stage in RUN_DIRS}
    answers = {}
    for stage in ("sft", "dpo", "grpo"):
        answers["question"], answers[stage] = sample_answer(os.path.join(cfg.out_dir, RUN_DIRS[stage]))
    files.write_file(os.path.join(cfg.out_dir, "report.json"), json.dumps(report, indent=2))
    val_loss_before = first_and_last(records(cfg.out_dir, "pretrain"), "val_loss")[0]
    files.write_file(os.path.join(cfg.out_dir, "report.md"), markdown(report, steps, answers, val_loss_before))
    plot(cfg.out_dir, report, os.path.join(cfg.out_dir, "report.png"))
    print(open(os.path.join(cfg.out_dir, "report.md")).read(), end="")
    print(f"report: {os.path.join(cfg.out_dir, 'report.md')}, report.json, report.png", file=sys.stderr)

if __name__ == "__main__":
    settings.run(main)
