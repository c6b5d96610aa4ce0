"""
Reinforcement learning with verifiable rewards: GRPO (DeepSeekMath, arXiv 2402.03300), in the conventions of
TRL 1.16's GRPOTrainer (its defaults and metric names). Each step samples G completions per prompt from the
current policy, scores them with plain reward functions, and pushes up the log-probability of the completions
that beat their group's mean.

    python train_grpo.py config/grpo_tiny.py                       # offline: arithmetic prompts after SFT
    python train_grpo.py config/grpo_doge_20m.py
    torchrun --nproc_per_node=8 train_grpo.py config/grpo_doge_20m.py
    # NuminaMath-TIR: python prepare_data.py --dataset=none --tokenizer=<data dir of the model> --sft=none \
    #                     --dpo=none --grpo=numinamath
    #                 python train_grpo.py config/grpo_doge_20m.py --data_dir=data/numinamath

The prompts are data_dir/grpo_train.jsonl ({"messages": [system, user], "answer"} per line). The held-out number,
on data_dir/test.jsonl, is sampled accuracy: the share of completions sampled at the rollout temperature whose
answer is right. RL with a verifiable reward mostly sharpens a policy (Yue et al. 2025, arXiv 2504.13837): sampled
accuracy climbs toward greedy accuracy, which moves little, and pass@k at large k stays flat; all three are logged.
"""
import os
import re
import math
import copy
import json
import time
import contextlib

import numpy as np
import torch
import torch.distributed as dist

from nanodoge import arithmetic, checkpoint as ckpt, devices, files, settings, training
from nanodoge.engine import generate_completions
from nanodoge.post_training import (step_indices, token_logprobs, evaluate_accuracy, completion_texts, pad_examples,
                                    load_policy, chat_prompts)
from nanodoge.tokenizer import extract_answer, normalize_answer

try:  # LaTeX answers (NuminaMath) are compared symbolically when math_verify is installed
    import math_verify
except ImportError:
    math_verify = None

DEFAULTS = dict(
    # I/O
    out_dir="out/grpo",
    init_from="out/sft",  # a nanodoge checkpoint (out dir or ckpt file), a Hugging Face Doge, or resume
    data_dir="data/arithmetic",
    data={},  # what `python prepare_data.py <config>` prepares into data_dir: prepare_data.py settings (its defaults if unset)
    eval_interval=50, eval_prompts=200, eval_generations=4, log_interval=1, ckpt_interval=50, keep_last=2,
    # rollouts: prompts_per_step prompts (over all processes) x num_generations completions each
    prompts_per_step=8, num_generations=8, temperature=1.0, max_completion_length=96,
    # rewards: r_i = sum_k weight_k * reward_k(o_i), functions from REWARD_FUNCTIONS
    reward_weights={"accuracy": 1.0, "format": 1.0},
    # the GRPO objective (TRL 1.16's defaults)
    loss_type="dapo",  # dapo (TRL 1.16's default) | grpo | bnpo | dr_grpo
    epsilon=0.2, epsilon_high=None,  # the clip range [1 - epsilon, 1 + epsilon_high]; None: epsilon (DAPO's clip-higher)
    beta=0.0, use_bias_correction_kl=True,  # the KL term times the ratio pi/pi_old (TRL 1.16's default)
    num_iterations=1, scale_rewards="group",  # group | batch | none: the std advantages are divided by
    advantage="group",  # group: GRPO's | process: a per-line reward (arithmetic data) | rejection: the RFT control
    mask_truncated_completions=False,  # True: a completion cut at max_completion_length (no stop token) adds no loss
    batch_size=16,  # completions per forward/backward pass (gradient accumulation over the step's completions)
    # optimizer and schedule
    max_steps=200, learning_rate=1e-6, schedule="wsd", warmup_ratio=0.0, decay_ratio=0.0, min_lr_rate=0.0,
    decay_shape="linear", weight_decay=0.0, beta1=0.9, beta2=0.99, adam_eps=1e-8, grad_clip=1.0,
    # system
    seed=1337, device="auto", dtype="auto",
    deterministic="auto",  # auto | True | False: auto is on for compiled training on a CPU (training.resolve_deterministic)
)

# -----------------------------------------------------------------------------
# rewards: plain functions (completions, answers) -> list[float]; add one here and name it in reward_weights

def answer_text(completion):
    """The raw content of the first <answer>...</answer> (extract_answer's, before normalisation)."""
    match = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    return match.group(1).strip() if match else None

def answers_match(completion, reference):
    """Equal after numeric normalisation ("1,000.0" == "1000"), or mathematically equal per math_verify."""
    predicted = extract_answer(completion)
    if predicted is None:
        return False
    if predicted == normalize_answer(str(reference)):
        return True
    if math_verify is None:
        return False
    gold = math_verify.parse(f"${reference}$")
    return bool(gold) and math_verify.verify(gold, math_verify.parse(f"${answer_text(completion)}$"))

def accuracy_reward(completions, answers):
    return [float(answers_match(c, a)) for c, a in zip(completions, answers)]

# a <think> block then an <answer> block, each with something in it, whitespace around them allowed, no tag
# nested, nothing else
NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
FILLED = r"(?=\s*[^\s<])"  # not empty, nor only whitespace
FORMAT = re.compile(rf"\s*<think>{FILLED}{NO_TAG}</think>\s*<answer>{FILLED}{NO_TAG}</answer>\s*", re.DOTALL)

def format_reward(completions, answers):
    return [float(FORMAT.fullmatch(c) is not None) for c in completions]

def digits_reward(completions, answers):
    """Partial credit for numeric answers: the fraction of digits that the <answer> gets right at the right
    place value (units with units, tens with tens), over the longer of answer and reference. A dense signal
    for a small model whose whole answers are still rarely right: most groups then have something to compare."""
    rewards = []
    for completion, answer in zip(completions, answers):
        predicted, reference = extract_answer(completion) or "", normalize_answer(str(answer))
        matches = sum(p == r for p, r in zip(reversed(predicted), reversed(reference)))
        rewards.append(matches / max(len(predicted), len(reference), 1))
    return rewards

REWARD_FUNCTIONS = {"accuracy": accuracy_reward, "format": format_reward, "digits": digits_reward}

def score(completions, answers, reward_weights):
    """({name: rewards [N]}, total [N]) with total r_i = sum_k w_k * reward_k(o_i)."""
    rewards = {name: torch.tensor(REWARD_FUNCTIONS[name](completions, answers), dtype=torch.float32)
               for name in reward_weights}
    total = sum(reward_weights[name] * r for name, r in rewards.items())
    return rewards, total

# -----------------------------------------------------------------------------
# the GRPO objective

def group_advantages(rewards, num_generations, scale_rewards="group"):
    """A_i = (r_i - mean(r)) / (std + 1e-4), the mean over each group of num_generations consecutive completions;
    std (Bessel-corrected, as TRL 1.16) that of the group (scale_rewards="group"), of every reward given
    (rewards is the whole step's: "batch"), or no division ("none"). Equal rewards in a group: zero advantage."""
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    return advantages.flatten()

def rejection_advantages(rewards):
    """Rejection-sampling fine-tuning as advantages (the control): A_i = r_i / mean(r) for rewards of 1 (right) or
    0, so the step's loss is the cross-entropy of its right completions, per token of the step (their share of the
    step's completions divided out), and nothing on the wrong ones: no baseline, no comparison within a group."""
    return rewards / rewards.mean().clamp(min=1e-4)

def process_advantages(steps, num_generations):
    """Process supervision's advantages (DeepSeekMath section 4.1.3): each step's reward normalised by the mean and
    std of every step reward in its group of num_generations completions, r~ = (r - mean) / (std + 1e-4), and a
    token's advantage the sum of r~ over its own step and the steps after it. steps: per completion
    [(end, reward)] (arithmetic.line_rewards). Returns per completion [(end, advantage)]: the advantage of its tokens up to end."""
    advantages = []
    for first in range(0, len(steps), num_generations):
        group = steps[first:first + num_generations]
        rewards = np.array([r for completion in group for _, r in completion])
        mean, std = rewards.mean(), (rewards.std(ddof=1) if len(rewards) > 1 else 0.0)  # Bessel, as group_advantages
        for completion in group:
            normalised = (np.array([r for _, r in completion]) - mean) / (std + 1e-4)
            to_go = np.cumsum(normalised[::-1])[::-1]  # the sum over this step and the ones after it
            advantages.append([(end, float(a)) for (end, _), a in zip(completion, to_go)])
    return advantages

def token_advantages(tok, completions, step_advantages, stop_ids):
    """[n] advantage per completion token (rows of ids [n]): that of the step in which the token's text ends
    (each prefix decoded: a token's text may span a line end); the stop token and anything after it take the last
    step's, as the answer's reward is the stop's too."""
    rows = []
    for row, steps in zip(completions.tolist(), step_advantages):
        length = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
        ends, k, values = [e for e, _ in steps], 0, []
        for position in range(len(row)):
            text_end = len(tok.decode(row[:position + 1])) if position < length else ends[-1]
            while k < len(ends) - 1 and ends[k] < text_end:
                k += 1
            values.append(steps[k][1])
        rows.append(values)
    return rows

def completion_mask(completions, stop_ids):
    """1 on each completion's tokens up to and including its first stop token, 0 after it ([N, n] ints)."""
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    stops_before = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()  # stop tokens strictly before t
    return (stops_before == 0).int()

def grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon=0.2, beta=0.0, loss_type="dapo",
              max_completion_length=None, num_sequences=None, num_tokens=None, epsilon_high=None,
              use_bias_correction_kl=True):
    """The clipped surrogate of DeepSeekMath eq. 3 with the k3 KL estimator. logps, old_logps, ref_logps and
    mask are per completion token [N, T], advantages [N] (one a completion) or [N, T] (one a token: advantage=
    "process"). Per token: rho = pi/pi_old,
    l = -min(rho*A, clip(rho, 1-eps, 1+eps_high)*A) + beta*kl, kl = pi_ref/pi - log(pi_ref/pi) - 1, times rho
    with use_bias_correction_kl (TRL 1.16's default: the estimate under pi_old's samples); eps_high = eps unless
    set (DAPO's clip-higher). old_logps None is the on-policy case (num_iterations = 1): pi_old is pi itself, so
    rho = 1 in value and the clip never binds; l = -rho*A with rho = exp(logps - logps.detach()) is then the same
    loss and gradient, -A grad log pi (the policy gradient with the group's mean as baseline), without them.
    ref_logps is only read when beta != 0.
    Aggregated by loss_type over the step's whole generation batch: grpo = mean over each sequence's tokens, then
    over the step's sequences; dapo (TRL 1.16's default) and bnpo = sum over the step's tokens / their number;
    dr_grpo = sum / (sequences x max_completion_length) (Dr. GRPO, arXiv 2503.20783). TRL's bnpo divides by a
    micro-batch's tokens, so its step depends on the split; here bnpo is the batch mean its name says, which makes
    it dapo's formula. num_sequences and num_tokens are the step's totals over all micro-batches and processes
    (these rows' when None): the losses of any split into micro-batches then add up to the step's loss."""
    ratio = torch.exp(logps - (logps.detach() if old_logps is None else old_logps))
    advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    if old_logps is None:
        per_token = -ratio * advantages
    else:
        epsilon_high = epsilon if epsilon_high is None else epsilon_high
        per_token = -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon_high) * advantages)
    if beta != 0.0:
        log_ref_ratio = ref_logps - logps
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
    mask = mask.to(per_token.dtype)
    num_sequences = mask.shape[0] if num_sequences is None else num_sequences
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    if loss_type == "grpo":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / num_sequences
    if loss_type in ("dapo", "bnpo"):
        return (per_token * mask).sum() / torch.as_tensor(num_tokens).clamp(min=1)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type=dr_grpo divides by max_completion_length: pass it")
        return (per_token * mask).sum() / (num_sequences * max_completion_length)
    raise ValueError(f"loss_type must be dapo, grpo, bnpo or dr_grpo, got {loss_type!r}")

def policy_backward(model, ids, mask, advantages, old_logps, ref_logps, cfg, run, scaler, autocast):
    """Accumulate the gradient of the step's GRPO loss over this process's completions ids [N, L] in
    micro-batches of cfg.batch_size rows; model is in DDP across several processes, which all-reduces the
    gradients in the last micro-batch's backward only. A micro-batch's loss is its part of the step's loss
    (grpo_loss with the step's totals over all processes) times the number of processes, as DDP averages the
    processes' gradients: neither batch_size nor the number of processes changes the step. Returns (the sum of
    those losses: this process's loss, whose mean over the processes is the step's; log-probs [N, L-1]), both on
    the device: nothing is read back to the host here. old_logps: None when pi_old = pi (on-policy)."""
    num_tokens = mask.sum().float()
    if run.world_size > 1:
        dist.all_reduce(num_tokens)
    micro_batches = [slice(i, i + cfg.batch_size) for i in range(0, ids.size(0), cfg.batch_size)]
    loss_sum, all_logps = torch.zeros((), device=ids.device), []
    for k, rows in enumerate(micro_batches):
        skip_all_reduce = run.world_size > 1 and k < len(micro_batches) - 1
        with model.no_sync() if skip_all_reduce else contextlib.nullcontext():
            with autocast:
                logps = completion_logps(model, ids[rows], cfg.temperature)
            loss = grpo_loss(logps, None if old_logps is None else old_logps[rows],
                             None if ref_logps is None else ref_logps[rows], advantages[rows], mask[rows],
                             cfg.epsilon, cfg.beta, cfg.loss_type, cfg.max_completion_length,
                             num_sequences=ids.size(0) * run.world_size, num_tokens=num_tokens,
                             epsilon_high=cfg.epsilon_high, use_bias_correction_kl=cfg.use_bias_correction_kl)
            loss = loss * run.world_size
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
        all_logps.append(logps.detach())
    return loss_sum, torch.cat(all_logps)

@torch.no_grad()
def grpo_stats(logps, old_logps, ref_logps, advantages, mask, epsilon=0.2, epsilon_high=None):
    """Token fractions where the clip removed the gradient (ratio beyond 1-eps or 1+eps_high in the advantage's
    direction; 0 on-policy, old_logps None: the ratio is 1), and the mean k3 KL to the reference (0 without
    one): tensors on the device."""
    mask = mask.float()
    tokens = mask.sum().clamp(min=1)
    clipped = torch.zeros((), device=mask.device)
    if old_logps is not None:
        epsilon_high = epsilon if epsilon_high is None else epsilon_high
        ratio = torch.exp(logps - old_logps)
        advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
        clipped = ((((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0)))
                   .float() * mask).sum() / tokens
    kl = torch.zeros((), device=mask.device)
    if ref_logps is not None:
        log_ref_ratio = ref_logps - logps
        kl = ((torch.exp(log_ref_ratio) - log_ref_ratio - 1) * mask).sum() / tokens
    return clipped, kl

# -----------------------------------------------------------------------------
# rollouts

@torch.no_grad()
def rollout(model, prompts, num_generations, max_completion_length, temperature, stop_ids, vocab_size):
    """num_generations sampled completions of each prompt (token lists), all in one batch through the KV-cached
    generator. Returns a list, per prompt, of [G, n] completion tensors."""
    repeated = [p for p in prompts for _ in range(num_generations)]
    pad_id = stop_ids[0]  # any id of the vocabulary: pads are masked
    return list(generate_completions(model, repeated, max_completion_length, temperature, stop_ids, vocab_size,
                                     pad_id).split(num_generations))

def pad_sequences(prompts, completions, masks, pad_id, device):
    """Prompt + completion rows right-padded to one length ([N, L] ids), and the loss mask of each row's
    label positions ([N, L-1]: 1 where the label is a completion token before or at the first stop; per-token
    values in place of masks come out in the same layout)."""
    ids, mask = pad_examples([(p + c, [0] * len(p) + m) for p, c, m in zip(prompts, completions, masks)], pad_id)
    return ids.to(device), mask[:, 1:].to(device)

def completion_logps(model, ids, temperature):
    """log pi(x_t | x_<t) for every label position t >= 1 of ids [N, L] -> [N, L-1], float32, under the
    distribution the rollouts sampled from: softmax(logits / temperature) (as TRL takes policy, old and
    reference log-probs)."""
    logits, _ = model(ids[:, :-1])
    return token_logprobs(logits.float() / temperature, ids[:, 1:])

# -----------------------------------------------------------------------------

def load_prompts(data_dir, name):
    """The prompts of a .jsonl set, read by index (files.JsonlRows: a million open as fast as ten)."""
    path = os.path.join(data_dir, name)
    rows = files.JsonlRows(path)
    if len(rows) == 0:
        raise ValueError(f"{path} holds no prompts: re-run prepare_data.py")
    first = rows[0]
    if not (isinstance(first, dict) and isinstance(first.get("messages"), list) and "answer" in first):
        raise ValueError(f"{path}:1 is not a {{\"messages\": [...], \"answer\": ...}} line: re-run prepare_data.py")
    return rows

def check_config(cfg, world_size):
    unknown = set(cfg.reward_weights) - set(REWARD_FUNCTIONS)
    if unknown or not cfg.reward_weights:
        raise ValueError(f"reward_weights names {sorted(unknown) or 'nothing'}: choose from {sorted(REWARD_FUNCTIONS)}")
    if cfg.loss_type not in ("dapo", "grpo", "bnpo", "dr_grpo"):
        raise ValueError(f"loss_type must be dapo, grpo, bnpo or dr_grpo, got {cfg.loss_type!r}")
    if cfg.num_generations < 2:
        raise ValueError("num_generations must be >= 2: advantages compare completions within a group")
    if cfg.prompts_per_step % world_size:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not a multiple of the {world_size} processes")
    if cfg.scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {cfg.scale_rewards!r}")
    if cfg.advantage not in ("group", "rejection", "process"):
        raise ValueError(f"advantage must be group, rejection or process, got {cfg.advantage!r}")
    if cfg.advantage == "rejection" and set(cfg.reward_weights) != {"accuracy"}:
        raise ValueError("advantage=rejection keeps the right completions: set reward_weights={'accuracy': 1.0}")
    if cfg.num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {cfg.num_iterations}")

def pass_at_k(right, n, k):
    """The unbiased pass@k of each problem from n samples of which right[i] are right (Chen et al. 2021, eq. 1):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples, drawn without replacement, hold a right one."""
    return [1.0 - math.comb(n - c, k) / math.comb(n, k) for c in right]

@torch.no_grad()
def evaluate(model, tok, examples, prompts, stop_ids, cfg, run):
    """Held-out numbers and, per problem, what they count: (metrics, {"greedy": [0 | 1], "sampled": [right of the
    eval_generations], ...}). GRPO's number is sampled accuracy: the share of eval_generations completions per prompt,
    sampled at the rollout temperature, whose answer is right (correctness only, whatever the reward weights).
    Also pass@k, greedy accuracy (what SFT and DPO report) and the mean reward (what GRPO maximises). The samples
    come from a fixed seed (the same draws at every evaluation), without disturbing the training RNG."""
    model.eval()
    with devices.autocast(run.device, run.dtype):
        _, greedy_texts = evaluate_accuracy(model, tok, examples, cfg.max_completion_length)
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            groups = rollout(model, prompts, cfg.eval_generations, cfg.max_completion_length, cfg.temperature,
                             stop_ids, tok.vocab_size)
    model.train()
    texts = [t for group in groups for t in completion_texts(tok, group, stop_ids)]
    answers = [ex["answer"] for ex in examples for _ in range(cfg.eval_generations)]
    rewards, total = score(texts, answers, cfg.reward_weights)
    greedy = accuracy_reward(greedy_texts, [ex["answer"] for ex in examples])
    sampled = torch.tensor(accuracy_reward(texts, answers)).view(-1, cfg.eval_generations).sum(dim=1).int().tolist()
    n, ks = cfg.eval_generations, [k for k in (2, 4, 8, 16, 32, 64) if k <= cfg.eval_generations]
    metrics = dict(accuracy=float(np.mean(greedy)), sampled_accuracy=sum(sampled) / (n * len(sampled)),
                   **{f"pass@{k}": float(np.mean(pass_at_k(sampled, n, k))) for k in ks},
                   reward=total.mean().item(), **{f"rewards/{name}": r.mean().item() for name, r in rewards.items()})
    return metrics, dict(band=band(cfg, len(examples)), generations=n, temperature=cfg.temperature,
                         greedy=[int(g) for g in greedy], sampled=sampled)

def prepared_settings(data_dir):
    """The prepare_data.py settings the data dir's meta.json records ({} without one)."""
    meta_path = os.path.join(data_dir, "meta.json")
    return json.load(open(meta_path)).get("settings", {}) if os.path.exists(meta_path) else {}

def band(cfg, problems):
    """The problems GRPO is judged on, in words (report.json's grpo.band): what the data dir's meta.json says it
    holds, how many held-out problems, at which temperature."""
    prepared = prepared_settings(cfg.data_dir)
    source = prepared.get("grpo", os.path.basename(os.path.normpath(cfg.data_dir)))
    if source == "arithmetic":
        source = f"{prepared['arithmetic_digits']}-digit {' '.join(prepared['arithmetic_ops'])} arithmetic"
    return f"{source}: {problems} held-out problems (test.jsonl) sampled at temperature {cfg.temperature}"

def log_evaluation(run, cfg, log_path, step, metrics, per_problem):
    """The evaluation's record in the log, and its per-problem counts in out_dir/eval_<step>.json (report.py's
    paired bootstrap compares two of them problem by problem)."""
    training.log_eval(run, log_path, step, metrics, f"eval step {step} | held-out")
    if run.master:
        files.write_file(os.path.join(cfg.out_dir, f"eval_{step:07d}.json"), json.dumps(per_problem))

def main(argv=None):
    cfg = settings.load_config(DEFAULTS, argv)
    settings.require_prepared(cfg.data_dir, argv, offline_dir="data/arithmetic")
    run = training.setup(cfg)
    check_config(cfg, run.world_size)
    if cfg.advantage == "process" and prepared_settings(cfg.data_dir).get("grpo") != "arithmetic":
        raise ValueError(f"advantage=process checks the lines of arithmetic worked solutions: {cfg.data_dir} does not "
                         "hold the arithmetic curriculum (prepare_data.py --grpo=arithmetic)")
    train_examples = load_prompts(cfg.data_dir, "grpo_train.jsonl")
    test_examples = load_prompts(cfg.data_dir, "test.jsonl")[:cfg.eval_prompts]
    resuming = cfg.init_from == "resume"
    model, tok, checkpoint = load_policy(cfg, run.device)
    if resuming and checkpoint.get("stage") != "grpo":
        raise ValueError(f"{cfg.out_dir} holds a {checkpoint.get('stage')} checkpoint, not a GRPO one: "
                         "pass it as init_from to start GRPO from it")
    # the frozen reference of the KL term (beta > 0 only) is the starting policy, also after any number of resumes
    start_from = checkpoint["start_from"] if resuming else cfg.init_from
    reference = None
    if cfg.beta != 0.0:
        reference = ckpt.load_model(start_from, run.device)[0] if resuming else copy.deepcopy(model)
        reference.requires_grad_(False).eval()
    stop_ids = [tok.end_of_turn_id, tok.eos_id]
    test_prompts = chat_prompts(tok, test_examples)
    prompts_per_rank = cfg.prompts_per_step // run.world_size
    if run.master:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {cfg.prompts_per_step} prompts "
              f"x {cfg.num_generations} completions per step | {len(train_examples)} prompts, "
              f"{len(test_examples)} held out | {'on-policy' if cfg.num_iterations == 1 else f'{cfg.num_iterations} updates a step, clipped'}"
              f"{f' | KL to the reference, beta {cfg.beta}' if reference is not None else ''} | {run.device} {run.dtype}")

    optimizer, start_step = training.make_optimizer(cfg, run, model, checkpoint)
    model_to_call, scaler = training.ddp_model(run, model)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    # train records carry the step's index, evaluations the number of steps done before them
    training.truncate_log(run, log_path, lambda r: r["step"] < start_step or ("loss" not in r and r["step"] == start_step))
    if start_step == 0:  # the starting point every later number is compared with
        log_evaluation(run, cfg, log_path, 0, *evaluate(model, tok, test_examples, test_prompts, stop_ids, cfg, run))
    autocast = devices.autocast(run.device, run.dtype)  # as nanoGPT's ctx: matmuls in dtype, weights in float32
    with training.stop_requests() as stop_signal:
        for step in range(start_step, cfg.max_steps):
            step_start = time.perf_counter()
            lr = training.lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 1. rollouts: this process's share of the step's prompts, G completions each, from the current policy
            indices = step_indices(cfg.seed, step, cfg.prompts_per_step, len(train_examples))
            examples = [train_examples[i] for i in indices[run.rank * prompts_per_rank:(run.rank + 1) * prompts_per_rank]]
            prompts = chat_prompts(tok, examples)
            model.eval()
            with autocast:
                groups = rollout(model, prompts, cfg.num_generations, cfg.max_completion_length, cfg.temperature,
                                 stop_ids, tok.vocab_size)
            model.train()
            rollout_seconds = time.perf_counter() - step_start
            masks = [completion_mask(group, stop_ids) for group in groups]

            # 2. rewards (on the host: they read the decoded text) and group-relative advantages
            texts = [t for group in groups for t in completion_texts(tok, group, stop_ids)]
            answers = [ex["answer"] for ex in examples for _ in range(cfg.num_generations)]
            rewards, total_reward = score(texts, answers, cfg.reward_weights)
            all_rewards = total_reward.to(run.device)  # the step's, from every process (for the batch std and the log)
            if run.world_size > 1:
                gathered = [torch.zeros_like(all_rewards) for _ in range(run.world_size)]
                dist.all_gather(gathered, all_rewards)
                all_rewards = torch.cat(gathered)
            mine = slice(run.rank * len(texts), (run.rank + 1) * len(texts))
            if cfg.advantage == "process":  # per token: the sum of the normalised rewards of its line and the later ones
                steps = [arithmetic.line_rewards(text, answer) for text, answer in zip(texts, answers)]
                line_accuracy = np.mean([r for completion in steps for _, r in completion[:-1]] or [0.0])
                step_advantages, g = process_advantages(steps, cfg.num_generations), cfg.num_generations
                per_token = [row for p, group in enumerate(groups)
                             for row in token_advantages(tok, group, step_advantages[p * g:(p + 1) * g], stop_ids)]
            else:
                advantages = (group_advantages(all_rewards, cfg.num_generations, cfg.scale_rewards)
                              if cfg.advantage == "group" else rejection_advantages(all_rewards))[mine]
            completion_tokens = sum(m.sum() for m in masks)
            if cfg.mask_truncated_completions:  # a completion that never stopped was cut short: no loss on it
                stops = torch.tensor(stop_ids, device=run.device)
                masks = [m * torch.isin(group, stops).any(dim=1, keepdim=True) for group, m in zip(groups, masks)]
            repeated = [p for p in prompts for _ in range(cfg.num_generations)]
            completions = [row for group in groups for row in group.tolist()]
            ids, mask = pad_sequences(repeated, completions, [row for m in masks for row in m.tolist()], tok.eos_id,
                                      run.device)
            if cfg.advantage == "process":  # [N, L-1], laid out as the mask is
                advantages = pad_sequences(repeated, completions, per_token, tok.eos_id, run.device)[1].float()

            # 3. the update. On-policy (num_iterations = 1, the default): one gradient step on the completions the
            # policy just sampled, pi_old = pi, so no old log-probs, ratio or clip (grpo_loss with old_logps None).
            # num_iterations > 1 reuses them: the later updates' ratios to the sampling policy are clipped (eq. 3).
            # The reference's log-probs only with a KL term (beta > 0).
            def logps_of(policy):  # log-probs of every completion, in micro-batches, no gradient
                with torch.no_grad(), autocast:
                    return torch.cat([completion_logps(policy, ids[i:i + cfg.batch_size], cfg.temperature)
                                      for i in range(0, ids.size(0), cfg.batch_size)])
            old_logps = logps_of(model) if cfg.num_iterations > 1 else None
            ref_logps = logps_of(reference) if reference is not None else None
            sums = dict(loss=0.0, clip_fraction=0.0, kl=0.0)  # on the device, read at log steps
            for iteration in range(cfg.num_iterations):
                # autocast forward, loss and backward in micro-batches (DDP all-reduces in the last one's backward)
                loss, logps = policy_backward(model_to_call, ids, mask, advantages, old_logps, ref_logps, cfg, run,
                                              scaler, autocast)
                clipped, kl = grpo_stats(logps, old_logps, ref_logps, advantages, mask, cfg.epsilon,
                                         cfg.epsilon_high)
                scaler.unscale_(optimizer)  # the true gradients (float16: they were scaled up), for the clip
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # a tensor: no read
                scaler.step(optimizer)  # float16: skipped if a gradient overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                # the logged loss, clip fraction and KL: the means over the iterations (and later the processes)
                for key, value in dict(loss=loss, clip_fraction=clipped, kl=kl).items():
                    sums[key] = sums[key] + value / cfg.num_iterations

            last_step, stopping = step == cfg.max_steps - 1, bool(stop_signal)  # a signal arriving later: next step
            save = training.save_due(cfg, step, stopping)
            logging = step % cfg.log_interval == 0 or last_step
            if logging or save:  # the host reads the step's numbers
                means, grad_norm = training.mean_over_processes(run, sums), float(grad_norm)
                training.check_finite(means["loss"], grad_norm, step, cfg, run)
            if logging:
                seconds = time.perf_counter() - step_start
                group_std = all_rewards.view(-1, cfg.num_generations).std(dim=1)
                record = dict(step=step, loss=means["loss"], lr=lr, grad_norm=grad_norm, reward=all_rewards.mean().item(),
                              reward_std=all_rewards.std().item(),  # TRL's: over every reward of the step
                              frac_reward_zero_std=(group_std < 1e-6).float().mean().item(),
                              completion_length=float(completion_tokens) / len(texts),
                              clip_fraction=means["clip_fraction"], kl=means["kl"],
                              rollout_tokens_per_s=float(completion_tokens) / rollout_seconds, step_seconds=seconds)
                for name, r in rewards.items():
                    record[f"rewards/{name}/mean"], record[f"rewards/{name}/std"] = r.mean().item(), r.std().item()
                if cfg.advantage == "process":
                    record["line_accuracy"] = float(line_accuracy)  # the share of right think lines
                per_function = "".join(f" | {name} {r.mean().item():.3f}" for name, r in rewards.items())
                training.log(run, log_path, record, f"step {step} | loss {means['loss']:.4f} | reward "
                             f"{record['reward']:.3f} ± {record['reward_std']:.3f}{per_function} | length "
                             f"{record['completion_length']:.1f} | clip {means['clip_fraction']:.3f} | kl "
                             f"{means['kl']:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                             f"{record['rollout_tokens_per_s']:,.0f} rollout tok/s | {seconds:.2f} s/step")
            if step % cfg.eval_interval == cfg.eval_interval - 1 or last_step:
                log_evaluation(run, cfg, log_path, step + 1,
                               *evaluate(model, tok, test_examples, test_prompts, stop_ids, cfg, run))
            if save:
                training.save(cfg, run, training.training_state(cfg, run, model, tok, step + 1, "grpo",
                                                                start_from=start_from), optimizer, engine=None)
            if stopping:
                print(f"stopped by signal {stop_signal[0]} after step {step}; resume with --init_from=resume")
                break
    if run.master and not stop_signal and cfg.max_steps > 0:  # --max_steps=0 evaluates the starting model only
        training.export(cfg)
    if run.world_size > 1:
        dist.destroy_process_group()
    return model

if __name__ == "__main__":
    settings.run(main)
