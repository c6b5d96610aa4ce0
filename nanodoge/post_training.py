"""
What the post-training stages share. Chat batches (SFT and DPO): the examples of a step as a pure function of
(seed, step), right-padded micro-batches of ragged token arrays, the data checks and the step count. Token
log-probs (DPO and GRPO), the policy a run starts from, and the held-out answer accuracy (SFT and GRPO).
"""
import os
import functools

import numpy as np
import torch

from nanodoge import checkpoint as ckpt, files, training
from nanodoge.engine import generate_completions
from nanodoge.tokenizer import load_tokenizer, render_chat, extract_answer, normalize_answer

# -----------------------------------------------------------------------------
# chat batches: ragged examples -> padded micro-batches

@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)

def step_indices(seed, step, examples_per_step, n):
    """The examples of one optimizer step, across all processes and micro-steps: a pure function of
    (seed, step), so a resumed run (on any number of processes) sees what the uninterrupted one would.
    Epochs are reshuffles: example position p is epoch p // n, slot p % n of that epoch's permutation."""
    positions = step * examples_per_step + np.arange(examples_per_step)
    epochs, slots = np.divmod(positions, n)
    return np.array([epoch_order(seed, int(e), n)[s] for e, s in zip(epochs, slots)], dtype=np.int64)

def micro_batch(indices, micro_step, rank, world_size, batch_size):
    """This process's share of a step's examples for one micro-step."""
    first = (micro_step * world_size + rank) * batch_size
    return indices[first:first + batch_size]

def get_examples(ragged, indices, max_len):
    """(ids, mask) numpy pairs of the examples, each truncated to its first max_len tokens."""
    tokens, mask, offsets = ragged
    return [(tokens[offsets[i]:offsets[i + 1]][:max_len], mask[offsets[i]:offsets[i + 1]][:max_len])
            for i in indices]

def pad_examples(examples, pad_id):
    """ids and mask tensors [B, T] of (ids, mask) pairs (arrays or lists), right-padded to the longest
    example; the mask is 0 on pads, int64 (float64 if a mask holds floats: GRPO's per-token advantages)."""
    length = max(len(ids) for ids, _ in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), length), dtype=np.result_type(np.int64, *(np.asarray(m).dtype for _, m in examples)))
    for row, (example_ids, example_mask) in enumerate(examples):
        ids[row, :len(example_ids)] = example_ids
        mask[row, :len(example_mask)] = example_mask
    return torch.from_numpy(ids), torch.from_numpy(mask)

def target_counts(ragged, indices, max_len):
    """How many loss tokens each of these examples has after truncation to max_len (position 0 is never a
    target): counted for the examples a batch holds, never for the whole set."""
    _, mask, offsets = ragged
    return np.array([int(mask[offsets[i] + 1:min(offsets[i + 1], offsets[i] + max_len)].sum()) for i in indices],
                    dtype=np.int64)

def usable_examples(prefixes, max_len):
    """Indices of the examples with a loss token within their first max_len tokens (on every side of a DPO pair):
    the others teach nothing. From the first targets prepare_data.py recorded, not a pass over the masks."""
    usable = np.logical_and.reduce([np.asarray(files.first_targets(prefix)) < max_len for prefix in prefixes])
    return np.flatnonzero(usable)

def example_lengths(ragged, indices, max_len):
    """The lengths of these examples after truncation to max_len."""
    offsets = ragged[2]
    return np.minimum(offsets[indices + 1] - offsets[indices], max_len)

def length_sample(n, size=10_000):
    """At most `size` indices spread evenly over range(n): what the start-up statistics (mean length, the
    scored share of FLOPs) are measured on, so a million examples cost as much as ten thousand."""
    return np.unique(np.linspace(0, n - 1, min(n, size)).astype(np.int64))

# the scored rows are padded to a multiple of this: the head's input has one of few shapes, whatever the batch
SCORED_BUCKET = 64

def scored_positions(targets, bucket=SCORED_BUCKET):
    """The flat indices [N] (into targets' B x T positions; targets a host array or CPU tensor) of the positions
    whose target is not -1, found on the host with the batch (on a device it would be a read back, and a shape
    the data decides), padded with an ignored position up to a multiple of bucket, at most B x T: model.forward
    runs the output head on these rows only, and the padding rows add nothing to its loss."""
    flat = np.asarray(targets).reshape(-1)
    rows = np.flatnonzero(flat != -1)
    size = min(len(flat), -(-len(rows) // bucket) * bucket)
    if size > len(rows):  # then some position is ignored
        rows = np.concatenate((rows, np.full(size - len(rows), np.flatnonzero(flat == -1)[0])))
    return torch.from_numpy(rows)

def check_data(tok, model, data_dir, names, seq_len):
    """One-line errors for data that cannot train this model (another tokenizer, ids beyond its vocabulary: the
    largest id each token file records, so no pass over the data, and no check of every batch later)."""
    data_tok = load_tokenizer(data_dir)
    probe = "<think>12+9=21</think><answer>21</answer> Hello, world!"
    if (data_tok.vocab_size, data_tok.special_ids, data_tok.encode(probe)) != \
            (tok.vocab_size, tok.special_ids, tok.encode(probe)):
        raise ValueError(f"{data_dir} was tokenized with another tokenizer than the model's: re-run prepare_data.py "
                         f"with --tokenizer=<the pre-training data dir> and --out_dir=<somewhere new>")
    for name in names:
        largest = files.array_max_value(os.path.join(data_dir, f"{name}.tokens.bin"))
        if largest >= model.config.vocab_size:
            raise ValueError(f"{data_dir}/{name} holds token id {largest} but the model's vocabulary "
                             f"has {model.config.vocab_size}: the data does not belong to this model")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}: lower seq_len")

def steps_per_run(cfg, n_examples, examples_per_step):
    """max_steps, or enough steps for `epochs` passes over n_examples."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.epochs <= 0:
        raise ValueError(f"epochs={cfg.epochs}: set epochs > 0 or max_steps > 0")
    return max(1, round(cfg.epochs * n_examples / examples_per_step))

def examples_per_micro_step(cfg, world_size):
    """(examples per optimizer step, gradient accumulation steps), from the global batch in examples."""
    per_pass = cfg.batch_size * world_size
    if cfg.batch_examples % per_pass:
        raise ValueError(f"batch_examples={cfg.batch_examples} is not a multiple of batch_size x processes = "
                         f"{per_pass}: change one of them")
    return cfg.batch_examples, cfg.batch_examples // per_pass

def load_policy(cfg, device):
    """(model, tokenizer, checkpoint to resume or None): init_from=resume continues this run from out_dir;
    anything else starts a new run (step 0, fresh optimizer) from the weights it names."""
    model, tok, checkpoint = ckpt.load_model(training.resume_dir(cfg) or cfg.init_from, device)
    return model, tok, checkpoint if cfg.init_from == "resume" else None

# -----------------------------------------------------------------------------
# log-probs and answer accuracy

def chat_prompts(tok, examples):
    """The token ids of each example's messages rendered as a chat up to the assistant's reply."""
    return [render_chat(tok, example["messages"], add_generation_prompt=True)[0] for example in examples]

def token_logprobs(logits, labels):
    """log p(labels[t] | logits[t]) per position, in float32; labels of -1 give 0 (mask them out anyway)."""
    logits = logits.float()
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * (labels >= 0)

def completion_texts(tok, completions, stop_ids):
    """The text of each completion (rows of token ids) before its first stop token."""
    return [tok.decode(row[:next((k for k, t in enumerate(row) if t in stop_ids), len(row))])
            for row in completions.tolist()]

@torch.no_grad()
def evaluate_accuracy(model, tok, examples, max_new_tokens=96, batch_size=32):
    """Greedy answers to chat prompts, scored by exact match of the <answer> content with example["answer"].
    Prompts go in left-padded batches of similar length. Returns (accuracy, completions)."""
    was_training = model.training
    model.eval()
    stop_ids = [tok.end_of_turn_id, tok.eos_id]
    prompts = chat_prompts(tok, examples)
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions = [None] * len(examples)
    for start in range(0, len(by_length), batch_size):
        chunk = by_length[start:start + batch_size]
        rows = generate_completions(model, [prompts[i] for i in chunk], max_new_tokens, 0.0, stop_ids,
                                    tok.vocab_size, tok.eos_id)
        for i, text in zip(chunk, completion_texts(tok, rows, stop_ids)):
            completions[i] = text
    model.train(was_training)
    correct = sum(extract_answer(c) == normalize_answer(str(ex["answer"]))
                  for c, ex in zip(completions, examples))
    return correct / max(1, len(examples)), completions
