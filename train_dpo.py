"""
Direct Preference Optimization (Rafailov et al. 2023), written out by hand.

    python train_dpo.py config/dpo_tiny.py                       # offline quickstart: the arithmetic curriculum
    python train_dpo.py config/dpo_doge_20m.py                   # ultrafeedback pairs, from the SFT model
    python train_dpo.py config/dpo_tiny.py --loss_type=ipo       # IPO; --label_smoothing=0.1: conservative DPO

The policy starts as the SFT model; a frozen copy of it is the reference. For each pair (prompt, chosen,
rejected) the loss pushes the policy's log-prob of the chosen reply up and the rejected one down, relative to
the reference (eq. 7). A reply's log-prob is the sum of its tokens' log-probs, prompt and padding excluded.
The batching is post_training's (as SFT's): a batch holds chosen rows then rejected rows, padded. main() is the
whole run in execution order, its loop and step written out as train_pt.py's; nanodoge/training.py holds the
tools it calls.
"""
import os
import copy
import time
import contextlib

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from tqdm import tqdm

from nanodoge import checkpoint as ckpt, devices, files, settings, training
from nanodoge.post_training import (step_indices, micro_batch, get_examples, pad_examples, usable_examples, example_lengths,
                           length_sample, check_data, steps_per_run, examples_per_micro_step, load_policy,
                           token_logprobs)

DEFAULTS = dict(
    # I/O
    out_dir="out/dpo",
    init_from="out/sft",  # resume | <nanodoge out dir or ckpt file> | <Hugging Face dir or hub id>
    ref_from="",  # the frozen reference; empty = the weights the policy starts from (recorded for resume)
    data_dir="data/arithmetic",  # dpo_{train,val}.{chosen,rejected}.*
    data={},  # what `python prepare_data.py <config>` prepares into data_dir: prepare_data.py settings (its defaults if unset)
    eval_interval=100, log_interval=10, ckpt_interval=100, keep_last=2,
    eval_examples=200,  # held-out pairs for val loss and preference accuracy
    # DPO: beta scales the implicit reward; label_smoothing > 0 is conservative DPO (the labels may be wrong)
    beta=0.1, label_smoothing=0.0, loss_type="sigmoid",  # sigmoid | ipo
    rpo_alpha=0.0,  # > 0: RPO, plus rpo_alpha x the chosen replies' per-token NLL (0 = plain DPO)
    precompute_ref_logps=False,  # reference log-probs of every pair once up front, then free the reference
    # batch: batch_examples pairs per optimizer step = batch_size x processes x gradient accumulation
    batch_size=8, batch_examples=64, seq_len=1024,
    # optimizer and schedule; max_steps=-1 means `epochs` passes over the pairs
    epochs=2.0, max_steps=-1, learning_rate=8e-5, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.1,
    min_lr_rate=0.0, decay_shape="linear", weight_decay=0.01, beta1=0.9, beta2=0.95, adam_eps=1e-8, grad_clip=1.0,
    # system
    seed=1337, device="auto", dtype="auto", backend="ddp", zero_stage=2,
    compile="auto",  # auto | True | False: auto compiles where it is faster (training.resolve_compile)
    deterministic="auto",  # auto | True | False: auto is on for compiled training on a CPU (training.resolve_deterministic)
)

# -----------------------------------------------------------------------------
# the math

def sequence_logprobs(logits, labels, mask, average=False):
    """Per sequence, the sum over positions t with mask[t] = 1 of log p(labels[t] | labels[:t]), in float32
    (average: divided by the number of those positions, the per-token mean IPO uses). logits [B, T, V] come from
    the model fed labels [B, T]; logits[t-1] predicts labels[t], so mask and labels are shifted by one against
    the logits, and position 0 is never scored."""
    token_logps = token_logprobs(logits[:, :-1], labels[:, 1:])
    total = (token_logps * mask[:, 1:]).sum(-1)
    return total / mask[:, 1:].sum(-1).clamp(min=1) if average else total

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             label_smoothing=0.0, loss_type="sigmoid"):
    """Per-pair losses and implicit rewards (DPO eq. 7; IPO, Azar et al. 2023, eq. 17).
    h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)): how much more the policy prefers the chosen reply
    than the reference does. sigmoid: -(1-eps) log s(beta h) - eps log s(-beta h), where eps is the probability
    that a label is flipped (eps = 0: plain DPO; eps > 0 is the conservative DPO of TRL 0.27 and earlier, which
    TRL 1.16's sigmoid loss ignores). ipo: (h - 1/(2 beta))^2, a margin target instead of an unbounded push; for
    it the caller passes per-token average log-probs (sequence_logprobs(average=True)), as the IPO authors and
    TRL 1.16 do. The reward of a reply is beta (log pi - log ref), detached: a metric, not a loss term."""
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards

# -----------------------------------------------------------------------------
# batches of pairs

def pair_batch(chosen_set, rejected_set, indices, max_len, pad_id, device):
    """ids and response mask [2B, T]: the chosen replies of the pairs, then their rejected replies."""
    examples = get_examples(chosen_set, indices, max_len) + get_examples(rejected_set, indices, max_len)
    ids, mask = pad_examples(examples, pad_id)
    return training.to_device(ids, device), training.to_device(mask, device)

def pair_logprobs(model, ids, mask, average=False):
    """(chosen, rejected) response log-probs of a pair_batch (summed, or per-token averages): one forward pass
    over both halves."""
    logits, _ = model(ids)
    return sequence_logprobs(logits, ids, mask, average).chunk(2)

@torch.no_grad()
def reference_logprobs(reference, ids, mask, average=False):
    return pair_logprobs(reference, ids, mask, average)

def pair_loss(policy, ids, mask, ref_chosen, ref_rejected, beta, label_smoothing, loss_type, rpo_alpha=0.0):
    """Mean DPO loss of a pair_batch and the per-log-line metrics (TRL's names; tensors on the device). rpo_alpha > 0 adds the chosen
    replies' negative log-likelihood per token, times rpo_alpha (RPO: Pang et al. 2024, eq. 1; TRL's rpo_alpha):
    plain DPO may lower the chosen replies too, as long as the rejected fall faster; the NLL term holds them up."""
    chosen, rejected = pair_logprobs(policy, ids, mask, average=loss_type == "ipo")
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta,
                                                        label_smoothing, loss_type)
    loss = losses.mean()
    if rpo_alpha:
        chosen_tokens = mask[:len(chosen), 1:].sum(-1)
        chosen_sums = chosen * chosen_tokens if loss_type == "ipo" else chosen  # ipo's are per-token means
        loss = loss - rpo_alpha * chosen_sums.sum() / chosen_tokens.sum()
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
               "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
    return loss, metrics

def all_reference_logprobs(reference, chosen_set, rejected_set, indices, cfg, pad_id, run, desc):
    """Reference log-probs of the pairs at indices, as a float32 array [len(indices), 2]."""
    out = np.zeros((len(indices), 2), dtype=np.float32)
    for first in tqdm(range(0, len(indices), cfg.batch_size), desc=desc, disable=len(indices) < 50 * cfg.batch_size):
        ids, mask = pair_batch(chosen_set, rejected_set, indices[first:first + cfg.batch_size], cfg.seq_len,
                               pad_id, run.device)
        with devices.autocast(run.device, run.dtype):
            chosen, rejected = reference_logprobs(reference, ids, mask, average=cfg.loss_type == "ipo")
        out[first:first + len(chosen)] = torch.stack([chosen, rejected], 1).cpu().numpy()
    return out

# -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, val_chosen, val_rejected, val_usable, val_ref, pad_id, cfg, run):
    """Held-out pairs: DPO loss, implicit-reward accuracy (reward of chosen > rejected; exactly 0 before DPO, when
    every reward is 0) and margin, and how often the policy alone gives the chosen reply the higher log-prob
    (before DPO: the SFT model's own preference)."""
    model.eval()
    policy = np.zeros((len(val_usable), 2), dtype=np.float32)
    for first in range(0, len(val_usable), cfg.batch_size):
        ids, mask = pair_batch(val_chosen, val_rejected, val_usable[first:first + cfg.batch_size], cfg.seq_len,
                               pad_id, run.device)
        with devices.autocast(run.device, run.dtype):
            chosen, rejected = pair_logprobs(model, ids, mask, average=cfg.loss_type == "ipo")
        policy[first:first + len(chosen)] = torch.stack([chosen, rejected], 1).cpu().numpy()
    model.train()
    policy, ref = torch.from_numpy(policy), torch.from_numpy(val_ref)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                                        cfg.beta, cfg.label_smoothing, cfg.loss_type)
    return {"val_loss": losses.mean().item(),
            "val_rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "val_rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "val_logps/accuracies": (policy[:, 0] > policy[:, 1]).float().mean().item()}

# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = settings.load_config(DEFAULTS, argv)
    if cfg.loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {cfg.loss_type!r}")
    if not 0 <= cfg.label_smoothing < 0.5 or cfg.beta <= 0:
        raise ValueError(f"need beta > 0 and 0 <= label_smoothing < 0.5, got beta={cfg.beta}, "
                         f"label_smoothing={cfg.label_smoothing}")
    settings.require_prepared(cfg.data_dir, argv, offline_dir="data/arithmetic")
    run = training.setup(cfg)
    sets = {f"dpo_{split}.{side}": files.read_ragged(os.path.join(cfg.data_dir, f"dpo_{split}.{side}"))
            for split in ("train", "val") for side in ("chosen", "rejected")}
    train_chosen, train_rejected = sets["dpo_train.chosen"], sets["dpo_train.rejected"]
    val_chosen, val_rejected = sets["dpo_val.chosen"], sets["dpo_val.rejected"]
    for split in ("train", "val"):
        if len(sets[f"dpo_{split}.chosen"][2]) != len(sets[f"dpo_{split}.rejected"][2]):
            raise ValueError(f"{cfg.data_dir}/dpo_{split}.chosen and .rejected hold different numbers of "
                             "replies: re-run prepare_data.py --force")
    model, tok, checkpoint = load_policy(cfg, run.device)
    check_data(tok, model, cfg.data_dir, list(sets), cfg.seq_len)

    # the reference: the policy's starting weights, frozen; a resumed run reloads them from where they came
    if checkpoint is not None and not cfg.ref_from:
        cfg.ref_from = checkpoint["config"]["ref_from"]
    if cfg.ref_from and cfg.ref_from != cfg.init_from:
        reference = ckpt.load_model(cfg.ref_from, run.device)[0]
    else:
        cfg.ref_from, reference = cfg.init_from, copy.deepcopy(model)
    reference.eval().requires_grad_(False)

    # a pair whose reply is cut away entirely by seq_len has log-prob 0 on both sides: no signal, leave it out
    sides = lambda split: [os.path.join(cfg.data_dir, f"dpo_{split}.{side}") for side in ("chosen", "rejected")]
    usable = usable_examples(sides("train"), cfg.seq_len)
    val_usable = usable_examples(sides("val"), cfg.seq_len)[:cfg.eval_examples]
    if len(usable) == 0 or len(val_usable) == 0:
        raise ValueError(f"no pair in {cfg.data_dir} has a reply within seq_len={cfg.seq_len}")
    examples_per_step, grad_accum = examples_per_micro_step(cfg, run.world_size)
    cfg.max_steps = steps_per_run(cfg, len(usable), examples_per_step)
    sample = usable[length_sample(len(usable))]  # the pairs' mean length, measured on a sample of them
    lengths = example_lengths(train_chosen, sample, cfg.seq_len) + example_lengths(train_rejected, sample, cfg.seq_len)
    tokens_per_step = int(lengths.mean() * examples_per_step)
    flops_per_step = model.flops_per_token(lengths.mean() / 2) * tokens_per_step  # the policy's passes
    pad_id = tok.eos_id
    if run.master:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(usable):,} pairs | "
              f"{cfg.max_steps} steps of {examples_per_step} pairs = {cfg.batch_size} x {run.world_size} processes "
              f"x {grad_accum} accumulation | {cfg.loss_type} loss, beta {cfg.beta}, label smoothing "
              f"{cfg.label_smoothing} | reference {cfg.ref_from} | {run.device} {run.dtype}")

    val_ref = all_reference_logprobs(reference, val_chosen, val_rejected, val_usable, cfg, pad_id, run,
                                     "reference log-probs (val)")
    train_ref = None  # row i: the reference log-probs of pair i
    if cfg.precompute_ref_logps:
        train_ref = np.zeros((len(train_chosen[2]) - 1, 2), dtype=np.float32)
        train_ref[usable] = all_reference_logprobs(reference, train_chosen, train_rejected, usable, cfg, pad_id,
                                                   run, "reference log-probs (train)")
        del reference

    def train_batch(step, micro_step):
        """This process's pairs of the step (a pure function of (seed, step)), padded, and their reference
        log-probs (precomputed, or from the frozen reference now: no gradient)."""
        indices = usable[step_indices(cfg.seed, step, examples_per_step, len(usable))]
        mine = micro_batch(indices, micro_step, run.rank, run.world_size, cfg.batch_size)
        ids, mask = pair_batch(train_chosen, train_rejected, mine, cfg.seq_len, pad_id, run.device)
        if train_ref is not None:
            ref_chosen, ref_rejected = training.to_device(torch.from_numpy(train_ref[mine]), run.device).unbind(1)
        else:
            with devices.autocast(run.device, run.dtype):
                ref_chosen, ref_rejected = reference_logprobs(reference, ids, mask, average=cfg.loss_type == "ipo")
        return ids, mask, ref_chosen, ref_rejected

    def evaluate_now(model):
        with training.whole_weights(engine):
            return evaluate(model, val_chosen, val_rejected, val_usable, val_ref, pad_id, cfg, run)

    optimizer, start_step = training.make_optimizer(cfg, run, model, checkpoint)
    model_to_call, scaler, engine = training.model_to_train(cfg, run, model, optimizer, grad_accum, checkpoint)
    ddp = engine is None and run.world_size > 1
    peak = devices.MatmulPeak(run.device, run.dtype)  # MFU's denominator
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    training.truncate_log(run, log_path, lambda record: record["step"] < start_step)
    if start_step == 0:  # the numbers every later evaluation is compared with
        training.log_eval(run, log_path, 0, evaluate_now(model), "before training")
    if start_step >= cfg.max_steps:
        print(f"already trained to max_steps={cfg.max_steps}")
    timer, timed_from = time.perf_counter(), start_step
    ids, mask, ref_chosen, ref_rejected = train_batch(start_step, 0)
    autocast = devices.autocast(run.device, run.dtype)  # as nanoGPT's ctx: matmuls in dtype, weights in float32
    with training.stop_requests() as stop_signal:
        for step in range(start_step, cfg.max_steps):
            lr = training.lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the micro-steps queue work on the device and read nothing back: loss and metrics stay there
            sums = {}
            for micro_step in range(grad_accum):
                # DDP all-reduces the gradients in the last micro-step's backward only
                skip_all_reduce = ddp and micro_step < grad_accum - 1
                with model_to_call.no_sync() if skip_all_reduce else contextlib.nullcontext():
                    with autocast:  # DPO eq. 7 (plus RPO's NLL term)
                        loss, metrics = pair_loss(model_to_call, ids, mask, ref_chosen, ref_rejected, cfg.beta,
                                                  cfg.label_smoothing, cfg.loss_type, cfg.rpo_alpha)
                    # loss and metrics are means over this micro-batch's pairs; the micro-batches are equal in size,
                    # so each one's share of the step's means is 1/grad_accum of its own
                    loss, metrics = loss / grad_accum, {key: value / grad_accum for key, value in metrics.items()}
                    # the next micro-batch, cut and copied (and its reference log-probs queued) while the device runs
                    ids, mask, ref_chosen, ref_rejected = train_batch(*divmod(step * grad_accum + micro_step + 1,
                                                                              grad_accum))
                    for key, share in dict(loss=loss.detach(), **metrics).items():
                        sums[key] = sums.get(key, 0.0) + share
                    if engine is None:
                        scaler.scale(loss).backward()
                    else:  # loss is already its share: the engine must not divide by the accumulation steps again
                        engine.backward(loss, scale_wrt_gas=False)
                        engine.step()  # at its accumulation boundary (the last micro-step): clip, step, zero_grad
            if engine is None:
                scaler.unscale_(optimizer)  # the true gradients (float16: they were scaled up), for the clip
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # a tensor: no read
                scaler.step(optimizer)  # float16: skipped if a gradient overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            else:
                grad_norm = float(engine.get_global_grad_norm() or 0.0)  # before its clip (a tensor or None)

            last_step, stopping = step == cfg.max_steps - 1, bool(stop_signal)  # a signal arriving later: next step
            save = training.save_due(cfg, step, stopping)
            logging = step % cfg.log_interval == 0 or last_step
            if logging or save:  # the host reads the step's numbers: here, and only here, it waits for the device
                means, grad_norm = training.mean_over_processes(run, sums), float(grad_norm)
                training.check_finite(means["loss"], grad_norm, step, cfg, run)
            if logging:
                seconds = (time.perf_counter() - timer) / (step - timed_from + 1)
                record = dict(step=step, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_step / seconds,
                              mfu=peak.mfu(flops_per_step / seconds / run.world_size), **means)
                metrics_line = "".join(f" | {k} {v:.4f}" for k, v in means.items() if k != "loss")
                training.log(run, log_path, record, f"step {step} | loss {means['loss']:.4f} | lr {lr:.2e} | grad "
                             f"norm {grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s{metrics_line}")
                timer, timed_from = time.perf_counter(), step + 1
            if step % cfg.eval_interval == cfg.eval_interval - 1 or last_step:
                training.log_eval(run, log_path, step, evaluate_now(model), f"eval step {step}")
                timer, timed_from = time.perf_counter(), step + 1
            if save:
                state = training.training_state(cfg, run, model, tok, step + 1, "dpo")
                training.save(cfg, run, state, optimizer, engine)
            if stopping:
                print(f"stopped by signal {stop_signal[0]} after step {step}; resume with --init_from=resume")
                break
    if run.master and not stop_signal:
        training.export(cfg)
        training.plot_losses(log_path, os.path.join(cfg.out_dir, "loss.png"))
    if run.world_size > 1:
        dist.destroy_process_group()
    return model

if __name__ == "__main__":
    settings.run(main)
