"""SFT and DPO: the DPO loss equals the paper's formula, response log-probs equal a hand computation, the SFT
loss sees assistant tokens only, batches are a pure function of (seed, step), and on the arithmetic curriculum
SFT raises answer accuracy and DPO raises held-out preference accuracy."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanodoge import checkpoint as ckpt, post_training
import train_dpo
import train_grpo
import train_pt
import train_sft
from model import Doge, DogeConfig
from nanodoge.tokenizer import train_sentencepiece
from train_dpo import dpo_loss, sequence_logprobs
from conftest import log_records

# -----------------------------------------------------------------------------
# the DPO loss (Rafailov et al. 2023, eq. 7) on fixed vectors

POLICY_CHOSEN = [-1.0, -2.0, -3.0, -10.0]
POLICY_REJECTED = [-2.0, -1.0, -3.5, -4.0]
REF_CHOSEN = [-1.5, -1.5, -3.0, -9.0]
REF_REJECTED = [-1.5, -1.5, -3.0, -6.0]
H = [1.0, -1.0, 0.5, -3.0]  # (pc - pr) - (rc - rr), by hand


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def loss_of(**kwargs):
    tensors = [torch.tensor(v, requires_grad=True) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]
    return dpo_loss(*tensors, **kwargs), tensors


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_loss_is_the_papers_formula(beta):
    (losses, chosen_rewards, rejected_rewards), _ = loss_of(beta=beta)
    assert losses.tolist() == pytest.approx([-log_sigmoid(beta * h) for h in H], rel=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([beta * (p - r) for p, r in zip(POLICY_CHOSEN, REF_CHOSEN)])
    assert rejected_rewards.tolist() == pytest.approx([beta * (p - r) for p, r in zip(POLICY_REJECTED, REF_REJECTED)])
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad  # metrics, not loss terms


def test_label_smoothing_is_conservative_dpo():
    (losses, _, _), _ = loss_of(beta=0.1, label_smoothing=0.2)
    expected = [-0.8 * log_sigmoid(0.1 * h) - 0.2 * log_sigmoid(-0.1 * h) for h in H]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_ipo_loss():
    (losses, _, _), _ = loss_of(beta=0.1, loss_type="ipo")
    assert losses.tolist() == pytest.approx([(h - 5.0) ** 2 for h in H], rel=1e-6)  # 1 / (2 beta) = 5


def test_policy_equal_to_reference_gives_log_2():
    logps = torch.tensor([-3.0, -7.5, -0.25])
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps - 1, logps, logps - 1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert chosen_rewards.tolist() == rejected_rewards.tolist() == [0.0] * 3


@pytest.mark.parametrize("kwargs", [dict(), dict(label_smoothing=0.1), dict(loss_type="ipo")])
def test_gradient_moves_chosen_up_and_rejected_down(kwargs):
    (losses, _, _), (policy_chosen, policy_rejected, ref_chosen, ref_rejected) = loss_of(**kwargs)
    losses.sum().backward()
    # gradient descent raises log pi(chosen) and lowers log pi(rejected) (IPO: while h < 1/(2 beta), true here)
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="loss_type"):
        loss_of(loss_type="hinge")

# -----------------------------------------------------------------------------
# response log-probs: a 3-token example by hand

def test_sequence_logprobs_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5],    # position 0 predicts token 1
                            [0.0, 1.0, 3.0, -2.0],    # position 1 predicts token 2
                            [9.0, -9.0, 9.0, -9.0]]])  # position 2 predicts nothing in the sequence
    labels = torch.tensor([[1, 3, 2]])

    def log_softmax(row, i):
        return row[i] - math.log(sum(math.exp(v) for v in row))
    rows = logits[0].tolist()
    lp_token1 = log_softmax(rows[0], 3)  # log p(x1 = 3 | x0)
    lp_token2 = log_softmax(rows[1], 2)  # log p(x2 = 2 | x0, x1)
    # prompt = token 0, response = tokens 1 and 2
    assert sequence_logprobs(logits, labels, torch.tensor([[0, 1, 1]])).item() == pytest.approx(lp_token1 + lp_token2)
    # prompt = tokens 0 and 1, response = token 2: the off-by-one would read row 2 (or row 1 for token 1)
    assert sequence_logprobs(logits, labels, torch.tensor([[0, 0, 1]])).item() == pytest.approx(lp_token2)
    # a padded position (mask 0) adds nothing; bf16 logits give a float32 sum
    out = sequence_logprobs(logits.bfloat16(), labels, torch.tensor([[0, 1, 0]]))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(lp_token1, abs=0.05)
    # IPO's per-token average: the sum over the response's tokens divided by their number
    average = sequence_logprobs(logits, labels, torch.tensor([[0, 1, 1]]), average=True).item()
    assert average == pytest.approx((lp_token1 + lp_token2) / 2)


def test_ipo_loss_on_per_token_averages_by_hand():
    """IPO (Azar et al. eq. 17, as TRL 1.16): h from per-token average log-ratios, loss (h - 1/(2 beta))^2."""
    policy_c, policy_r, ref_c, ref_r = (torch.tensor([v]) for v in (-12.0, -30.0, -14.0, -27.0))
    len_c, len_r = 4, 6
    h = (policy_c / len_c - policy_r / len_r) - (ref_c / len_c - ref_r / len_r)  # (-3 + 5) - (-3.5 + 4.5) = 1
    losses, _, _ = dpo_loss(policy_c / len_c, policy_r / len_r, ref_c / len_c, ref_r / len_r, beta=0.1,
                            loss_type="ipo")
    assert h.item() == pytest.approx(1.0) and losses.item() == pytest.approx((1.0 - 5.0) ** 2)

# -----------------------------------------------------------------------------
# batches

def ragged(examples):
    tokens = np.concatenate([np.asarray(ids, np.uint16) for ids, _ in examples])
    mask = np.concatenate([np.asarray(m, np.uint8) for _, m in examples])
    offsets = np.cumsum([0] + [len(ids) for ids, _ in examples]).astype(np.int64)
    return tokens, mask, offsets


def test_sft_batch_right_pads_and_targets_only_masked_tokens():
    data = ragged([([5, 6, 7, 8, 9], [0, 0, 1, 1, 0]), ([10, 11, 12], [0, 1, 1])])
    x, y, scored = train_sft.sft_batch(data, [1, 0], max_len=4, pad_id=1, device="cpu")
    assert x.tolist() == [[10, 11, 12], [5, 6, 7]]  # truncated to 4, right-padded, shifted
    assert y.tolist() == [[11, 12, -1], [-1, 7, 8]]  # y[t] = x[t+1] where the mask is 1
    assert scored.tolist() == [0, 1, 4, 5, 2, 2]  # the scored positions, padded with an ignored one to 6 (B x T)
    assert post_training.target_counts(data, [0, 1], 4).tolist() == [2, 2]
    assert post_training.target_counts(data, [1], 2).tolist() == [1]


def test_data_order_is_a_pure_function_of_seed_and_step_and_epochs_reshuffle():
    n, per_step = 10, 4
    order = np.concatenate([post_training.step_indices(7, step, per_step, n) for step in range(5)])  # 2 epochs
    assert sorted(order[:n]) == sorted(order[n:2 * n]) == list(range(n))  # every example once per epoch
    assert order[:n].tolist() != order[n:2 * n].tolist()  # and a new order each epoch
    assert post_training.step_indices(7, 3, per_step, n).tolist() == order[12:16].tolist()
    # the micro-batches of any number of processes together make the same global batch
    indices = post_training.step_indices(7, 1, per_step, n)
    for world_size, batch_size in [(1, 4), (2, 2), (2, 1), (4, 1)]:
        accum = per_step // (world_size * batch_size)
        parts = [post_training.micro_batch(indices, m, r, world_size, batch_size) for m in range(accum) for r in range(world_size)]
        assert np.concatenate(parts).tolist() == indices.tolist()

# -----------------------------------------------------------------------------
# gradients: SFT sees assistant tokens only; the DPO reference gets none

def tiny_model(vocab_size=64, seed=0):
    torch.manual_seed(seed)
    return Doge(DogeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                           keep_window_size=64, tie_word_embeddings=True))


def test_sft_scores_only_the_assistant_tokens():
    model = tiny_model()
    data = ragged([([2, 20, 21, 22, 3, 2, 30, 31, 3], [0, 0, 0, 0, 0, 0, 1, 1, 1]),
                   ([2, 23, 24, 3, 2, 32, 3, 9], [0, 0, 0, 0, 0, 1, 1, 0])])
    x, y, scored = train_sft.sft_batch(data, [0, 1], 64, pad_id=1, device="cpu")
    _, mask = post_training.pad_examples(post_training.get_examples(data, [0, 1], 64), pad_id=1)
    learned = mask[:, 1:] == 1  # position t predicts token t+1
    assert (y[~learned] == -1).all() and (y[learned] == x.new_tensor([30, 31, 3, 32, 3])).all()
    with torch.no_grad():  # the head runs only where a target is scored: the assistant's 5 positions, and pads
        logits, loss = model(x, y, scored=scored)
        every_logit = model(x)[0]
    assert logits.shape == (min(16, post_training.SCORED_BUCKET), every_logit.size(-1))  # B x T = 16 at most
    assert (logits[:5] - every_logit[learned]).abs().max() <= 1e-6
    assert loss.item() == pytest.approx(F.cross_entropy(every_logit[learned], y[learned]).item(), abs=1e-6)


def test_dpo_reference_gets_no_gradient():
    policy = tiny_model()
    reference = copy.deepcopy(policy)
    chosen = ragged([([2, 20, 21, 3, 2, 30, 31, 3], [0, 0, 0, 0, 0, 1, 1, 1]), ([2, 22, 3, 2, 33, 3], [0, 0, 0, 0, 1, 1])])
    rejected = ragged([([2, 20, 21, 3, 2, 40, 3], [0, 0, 0, 0, 0, 1, 1]), ([2, 22, 3, 2, 41, 42, 3], [0, 0, 0, 0, 1, 1, 1])])
    ids, mask = train_dpo.pair_batch(chosen, rejected, [0, 1], 64, pad_id=1, device="cpu")
    assert ids.shape == (4, 8) and mask.sum().item() == 3 + 2 + 2 + 3
    ref_chosen, ref_rejected = train_dpo.reference_logprobs(reference, ids, mask)
    loss, metrics = train_dpo.pair_loss(policy, ids, mask, ref_chosen, ref_rejected, 0.1, 0.0, "sigmoid")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert metrics["rewards/accuracies"].item() == 0.0 and metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)

def test_rpo_adds_the_chosen_replies_nll_per_token():
    """rpo_alpha > 0: the DPO loss plus alpha x the chosen replies' mean token NLL (Pang et al. 2024, eq. 1),
    computed here by hand from the policy's per-token log-probs; both loss types (ipo's are per-token means)."""
    torch.manual_seed(0)
    policy = tiny_model()
    chosen = ragged([([2, 20, 21, 3, 2, 30, 31, 3], [0, 0, 0, 0, 0, 1, 1, 1]), ([2, 22, 3, 2, 33, 3], [0, 0, 0, 0, 1, 1])])
    rejected = ragged([([2, 20, 21, 3, 2, 40, 3], [0, 0, 0, 0, 0, 1, 1]), ([2, 22, 3, 2, 41, 42, 3], [0, 0, 0, 0, 1, 1, 1])])
    ids, mask = train_dpo.pair_batch(chosen, rejected, [0, 1], 64, pad_id=1, device="cpu")
    ref = torch.tensor([-9.0, -7.0]), torch.tensor([-8.0, -9.5])
    with torch.no_grad():
        token_logps = post_training.token_logprobs(policy(ids)[0][:, :-1], ids[:, 1:]) * mask[:, 1:]
    nll = -token_logps[:2].sum() / mask[:2, 1:].sum()  # the chosen replies: 3 + 2 tokens
    for loss_type in ("sigmoid", "ipo"):
        with torch.no_grad():
            dpo, _ = train_dpo.pair_loss(policy, ids, mask, *ref, 0.1, 0.0, loss_type)
            rpo, _ = train_dpo.pair_loss(policy, ids, mask, *ref, 0.1, 0.0, loss_type, rpo_alpha=0.5)
        assert nll.item() > 0 and rpo.item() == pytest.approx(dpo.item() + 0.5 * nll.item(), abs=1e-5)

# -----------------------------------------------------------------------------
# end to end on the arithmetic curriculum: tiny pre-training, SFT, DPO

MODEL = ["--hidden_size=64", "--intermediate_size=128", "--num_hidden_layers=2", "--num_attention_heads=2",
         "--num_key_value_heads=1", "--max_position_embeddings=256", "--keep_window_size=256"]
SYSTEM = ["--device=cpu", "--dtype=float32", "--compile=False", "--log_interval=20"]  # the same on any CPU kind


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_data):
    """data -> a few pre-training steps -> SFT -> DPO, each stage's log.jsonl kept."""
    root = tmp_path_factory.mktemp("pipeline")
    data_dir = tiny_data["arithmetic"]
    train_pt.main([f"--data_dir={tiny_data['prose']}", f"--out_dir={root / 'pt'}", "--max_steps=20",
                   "--batch_size=8", "--seq_len=128", "--batch_tokens=1024", "--learning_rate=3e-3",
                   "--eval_interval=20", "--eval_batches=2", *MODEL, *SYSTEM])
    train_sft.main([f"--data_dir={data_dir}", f"--init_from={root / 'pt'}", f"--out_dir={root / 'sft'}",
                    "--max_steps=250", "--batch_size=16", "--batch_examples=16", "--seq_len=256",
                    "--learning_rate=3e-3", "--eval_interval=1000", "--ckpt_interval=1000", "--eval_examples=100",
                    *SYSTEM])
    train_dpo.main([f"--data_dir={data_dir}", f"--init_from={root / 'sft'}", f"--out_dir={root / 'dpo'}",
                    "--max_steps=40", "--batch_size=16", "--batch_examples=16", "--seq_len=256",
                    "--learning_rate=1e-3", "--eval_interval=1000", "--ckpt_interval=1000", *SYSTEM])
    return root, data_dir


def test_sft_raises_answer_accuracy(pipeline):
    """Whole answers stay rare for a model this small after 250 steps (the 2.9M-parameter quickstart model needs
    ~5 minutes for a few percent, ~15 for 30%): the exact-match accuracy must not fall, and the share of answer
    digits right at their place value (GRPO's digits reward) must rise from the pre-trained model's nothing --
    here mostly because SFT taught the format and the answers' lengths (it measured 0.16 with 3-digit operands,
    0.095 with the default 2)."""
    root, data_dir = pipeline
    test_examples = [json.loads(line) for line in open(os.path.join(data_dir, "test.jsonl"))][:100]
    answers = [ex["answer"] for ex in test_examples]
    numbers = {}
    for stage in ("pt", "sft"):
        model, tok, _ = ckpt.load_model(str(root / stage))
        accuracy, completions = post_training.evaluate_accuracy(model, tok, test_examples, 128)
        numbers[stage] = accuracy, float(np.mean(train_grpo.digits_reward(completions, answers)))
    print(f"arithmetic answers (exact, digits right): pre-trained {numbers['pt']} -> after SFT {numbers['sft']}")
    assert numbers["sft"][0] >= numbers["pt"][0] and numbers["sft"][1] > numbers["pt"][1] + 0.05
    losses = [r["loss"] for r in log_records(root / "sft") if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]


def test_dpo_raises_held_out_preference_accuracy(pipeline):
    root, _ = pipeline
    records = log_records(root / "dpo")
    first = next(r for r in records if "rewards/accuracies" in r)
    final = [r for r in records if "val_rewards/accuracies" in r][-1]
    print(f"held-out preference accuracy after DPO {final['val_rewards/accuracies']:.3f} (0 before: policy = "
          f"reference), policy's own preference {final['val_logps/accuracies']:.3f}")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # step 0: policy == reference
    assert final["val_rewards/accuracies"] > 0.5 and final["val_rewards/margins"] > 0


def test_sft_resume_is_exact(pipeline, tmp_path):
    root, data_dir = pipeline
    args = [f"--data_dir={data_dir}", "--batch_size=4", "--batch_examples=8", "--seq_len=256",
            "--learning_rate=1e-3", "--eval_interval=1000", "--eval_examples=8", *SYSTEM]
    train_sft.main(args + [f"--init_from={root / 'pt'}", f"--out_dir={tmp_path / 'a'}", "--max_steps=4"])
    train_sft.main(args + [f"--init_from={root / 'pt'}", f"--out_dir={tmp_path / 'b'}", "--max_steps=4",
                           "--ckpt_interval=2"])
    os.remove(ckpt.checkpoint_paths(str(tmp_path / "b"))[-1])  # as if stopped after step 2
    train_sft.main(args + ["--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_steps=4"])
    a = ckpt.load_checkpoint(str(tmp_path / "a"))["model"]
    b = ckpt.load_checkpoint(str(tmp_path / "b"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_line_errors(pipeline, tiny_text):
    root, data_dir = pipeline
    other = train_sentencepiece([tiny_text[:20_000]], 400)
    with pytest.raises(ValueError, match="another tokenizer"):
        post_training.check_data(other, None, data_dir, {}, 64)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        train_sft.main([f"--data_dir={data_dir}", f"--init_from={root / 'sft'}", "--seq_len=4096", *SYSTEM])
    with pytest.raises(ValueError, match="loss_type"):
        train_dpo.main([f"--data_dir={data_dir}", f"--init_from={root / 'sft'}", "--loss_type=hinge", *SYSTEM])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_dpo.main([f"--data_dir={data_dir}", "--init_from=resume", f"--out_dir={root / 'nothing'}", *SYSTEM])
