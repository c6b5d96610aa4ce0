"""GRPO: the loss against a hand computation for every aggregation, advantages, the completion mask, the
rewards on hand-written completions, a short run on the arithmetic task that raises the held-out reward, exact
resume, and the whole offline chain (run_chain.sh) at toy sizes."""
import itertools
import contextlib
import json
import math
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch

from nanodoge import checkpoint as ckpt
import report
import train_grpo
import train_sft
from model import Doge, DogeConfig
from nanodoge.tokenizer import load_tokenizer
from train_grpo import grpo_loss, group_advantages, completion_mask, accuracy_reward, format_reward
from conftest import log_records

# two completions of three tokens; the first has only two (its third position is after EOS)
LOGPS = [[-1.0, -0.5, -2.0], [-0.2, -1.5, -0.7]]
OLD_LOGPS = [[-1.5, -0.5, -1.0], [-0.1, -1.0, -1.2]]  # ratios e^0.5, 1, e^-1 | e^-0.1, e^-0.5, e^0.5
REF_LOGPS = [[-0.8, -0.9, -3.0], [-0.4, -1.2, -0.3]]
ADVANTAGES = [1.0, -2.0]
MASK = [[1, 1, 0], [1, 1, 1]]
ONE_PROCESS = SimpleNamespace(world_size=1, device=torch.device("cpu"), dtype="float32")  # policy_backward's run


def hand_per_token(epsilon, beta, epsilon_high=None, bias_correction=True):
    """l = -min(rho A, clip(rho, 1-eps, 1+eps_high) A) + beta kl (times rho with the bias correction),
    kl = e^(ref-logp) - (ref-logp) - 1, one token at a time."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    losses = []
    for logps, olds, refs, a in zip(LOGPS, OLD_LOGPS, REF_LOGPS, ADVANTAGES):
        row = []
        for logp, old, ref in zip(logps, olds, refs):
            rho = math.exp(logp - old)
            clipped = min(max(rho, 1 - epsilon), 1 + epsilon_high)
            kl = math.exp(ref - logp) - (ref - logp) - 1
            row.append(-min(rho * a, clipped * a) + beta * kl * (rho if bias_correction else 1.0))
        losses.append(row)
    return losses


def loss_of(**kwargs):
    t = lambda x: torch.tensor(x, dtype=torch.float32)
    return grpo_loss(t(LOGPS), t(OLD_LOGPS), t(REF_LOGPS), t(ADVANTAGES), torch.tensor(MASK), **kwargs).item()


@pytest.mark.parametrize("beta, epsilon_high, bias_correction", [(0.0, None, True), (0.04, None, True),
                                                                (0.04, None, False), (0.0, 0.28, True)])
def test_grpo_loss_matches_hand_computation(beta, epsilon_high, bias_correction):
    epsilon = 0.2
    per_token = hand_per_token(epsilon, beta, epsilon_high, bias_correction)
    # the clip is active: token 0 of row 0 (rho = e^0.5 > 1 + eps_high, A > 0) and token 2 of row 1 (rho = e^0.5,
    # A < 0 takes the min with the unclipped rho) and token 1 of row 1 (rho = e^-0.5 < 0.8, A < 0 -> clipped)
    kl_weight = math.exp(0.5) if bias_correction else 1.0
    assert per_token[0][0] == pytest.approx(-(1 + (epsilon_high or epsilon)) * 1.0 +
                                            beta * (math.exp(0.2) - 0.2 - 1) * kl_weight)
    assert per_token[1][1] == pytest.approx(0.8 * 2.0 + beta * (math.exp(0.3) - 0.3 - 1) * math.exp(-0.5) ** bias_correction)
    masked = [[l * m for l, m in zip(row, mask)] for row, mask in zip(per_token, MASK)]
    sequence_means = [sum(row) / sum(mask) for row, mask in zip(masked, MASK)]
    expected = {"grpo": sum(sequence_means) / 2,
                "dapo": sum(map(sum, masked)) / 5,
                "bnpo": sum(map(sum, masked)) / 5,
                "dr_grpo": sum(map(sum, masked)) / (2 * 8)}
    for loss_type, value in expected.items():
        assert loss_of(epsilon=epsilon, beta=beta, loss_type=loss_type, max_completion_length=8,
                       epsilon_high=epsilon_high, use_bias_correction_kl=bias_correction) == \
            pytest.approx(value, rel=1e-6), loss_type


def test_gradient_is_advantage_times_score_when_policy_sampled():
    """num_iterations = 1: pi_old = pi detached, so rho = 1 and dloss/dlogp_t = -A_i / |o_i| / N (grpo)."""
    logps = torch.tensor(LOGPS, requires_grad=True)
    loss = grpo_loss(logps, logps.detach(), None, torch.tensor(ADVANTAGES), torch.tensor(MASK), loss_type="grpo")
    loss.backward()
    expected = [[-1.0 / 2 / 2, -1.0 / 2 / 2, 0.0], [2.0 / 3 / 2] * 3]
    assert torch.allclose(logps.grad, torch.tensor(expected))
    assert loss.item() == pytest.approx(-(1.0 + -2.0) / 2)  # -mean(A) when rho = 1


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta, num_iterations", [(0.0, 1), (0.04, 2)])
def test_step_does_not_depend_on_the_micro_batch_size(loss_type, beta, num_iterations):
    """8 completions of unequal length in micro-batches of 3, 5 or 8: the same step loss and gradient."""
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(40, (8, 12))
    mask = (torch.arange(11)[None] < torch.tensor([3, 11, 5, 7, 2, 9, 11, 4])[:, None]).int()
    advantages = torch.randn(8)
    with torch.no_grad():
        old = train_grpo.completion_logps(model, ids, 0.7) + 0.1 * torch.randn(8, 11) if num_iterations > 1 else None
        ref = train_grpo.completion_logps(model, ids, 0.7) - 0.2 if beta else None
    results = []
    for batch_size in (3, 5, 8):
        cfg = SimpleNamespace(batch_size=batch_size, temperature=0.7, epsilon=0.2, beta=beta, loss_type=loss_type,
                              max_completion_length=11, epsilon_high=0.28, use_bias_correction_kl=True)
        model.zero_grad()
        loss, _ = train_grpo.policy_backward(model, ids, mask, advantages, old, ref, cfg, ONE_PROCESS,
                                             torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext())
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5, abs=1e-7)
        assert torch.allclose(grad, results[0][1], rtol=1e-4, atol=1e-7)


def test_unknown_loss_type_and_missing_length_are_errors():
    with pytest.raises(ValueError, match="loss_type"):
        loss_of(loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_of(loss_type="dr_grpo")


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = group_advantages(rewards, num_generations=4)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel: sum of squared deviations / (G - 1)
    assert torch.allclose(advantages[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(advantages[4:], torch.zeros(4))  # equal rewards: no signal
    unscaled = group_advantages(rewards, num_generations=4, scale_rewards="none")
    assert torch.allclose(unscaled, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch_std = rewards.std().item()  # every reward of the step: mean 1.25, Bessel-corrected
    assert batch_std == pytest.approx(math.sqrt((2 * 1.25 ** 2 + 2 * 0.25 ** 2 + 4 * 0.75 ** 2) / 7))
    batch = group_advantages(rewards, num_generations=4, scale_rewards="batch")
    assert torch.allclose(batch, unscaled / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, num_generations=4, scale_rewards=True)


def test_rejection_sampling_is_cross_entropy_on_the_right_completions():
    """The control (advantage=rejection): the gradient of its dapo loss is that of the mean NLL of the right
    completions' tokens (when the completions are equally long); the wrong ones get none."""
    right = torch.tensor([1.0, 0.0, 0.0, 1.0])
    advantages = train_grpo.rejection_advantages(right)
    assert advantages.tolist() == [2.0, 0.0, 0.0, 2.0]
    logps = torch.tensor([[-1.0, -0.5], [-2.0, -0.1], [-0.3, -0.3], [-0.2, -1.2]], requires_grad=True)
    grpo_loss(logps, None, None, advantages, torch.ones(4, 2, dtype=torch.int)).backward()
    nll_of_right = -(logps[0].sum() + logps[3].sum()) / 4
    assert torch.allclose(logps.grad, torch.autograd.grad(nll_of_right, logps)[0])
    assert logps.grad[1:3].abs().sum() == 0
    with pytest.raises(ValueError, match="reward_weights"):
        train_grpo.check_config(SimpleNamespace(**{**train_grpo.DEFAULTS, "advantage": "rejection"}), 1)


def test_process_reward_scores_each_line_of_hand_made_solutions():
    """line_rewards: a right solution is right on every line; a dropped carry is wrong from its column on; a
    problem restated wrongly is wrong on that line and on the answer, while its columns, right for what it
    restated, stay right; a column slip is wrong there and after; outside the format, one wrong step."""
    from nanodoge import arithmetic
    right = arithmetic.format_solution(*arithmetic.worked_solution(("+", 27, 58)))
    assert [r for _, r in arithmetic.line_rewards(right, "85")] == [1, 1, 1, 1, 1]
    ends = [e for e, _ in arithmetic.line_rewards(right, "85")]
    assert [right[:e] for e in ends[:2]] == ["<think>27+58\n", "<think>27+58\n7+8=15, write 5, carry 1\n"]
    assert ends[-1] == len(right)
    dropped = arithmetic.format_solution(*arithmetic.worked_solution(("+", 27, 58), ("drop", 0)))
    assert [r for _, r in arithmetic.line_rewards(dropped, "85")] == [1, 0, 0, 0, 0]  # column 1 drops its carry
    restated = arithmetic.format_solution(*arithmetic.worked_solution(("+", 27, 59)))
    assert [r for _, r in arithmetic.line_rewards(restated, "85")] == [0, 1, 1, 1, 0]
    slip = arithmetic.format_solution(*arithmetic.worked_solution(("-", 52, 17), ("slip", 1, 1)))
    assert [r for _, r in arithmetic.line_rewards(slip, "35")] == [1, 1, 0, 0, 0]
    assert arithmetic.line_rewards("<answer>85</answer>", "85") == [(19, 0.0)]
    assert arithmetic.line_rewards("<think>27+58</think><answer>85</answer>", "85") == [(12, 1.0), (39, 1.0)]


def test_process_advantages_follow_deepseekmath():
    """r~ = (r - mean) / std over every step reward of the group; a token's advantage sums r~ over its step and
    the later ones; each token takes the step in which its text ends, the stop token the last step's."""
    steps = [[(3, 1.0), (6, 1.0)], [(3, 1.0), (5, 0.0)]]
    mean, std = 0.75, torch.tensor([1.0, 1.0, 1.0, 0.0]).std().item()
    high, low = (1 - mean) / (std + 1e-4), (0 - mean) / (std + 1e-4)
    advantages = train_grpo.process_advantages(steps, num_generations=2)
    assert [e for e, _ in advantages[1]] == [3, 5]
    assert [a for _, a in advantages[0]] == pytest.approx([2 * high, high])
    assert [a for _, a in advantages[1]] == pytest.approx([high + low, low])
    assert train_grpo.process_advantages([[(3, 1.0)], [(3, 1.0)]], 2) == [[(3, 0.0)], [(3, 0.0)]]  # no spread
    tok = SimpleNamespace(decode=lambda ids: "".join("ab\ncd\n"[i] for i in ids))  # token i: character i
    per_token = train_grpo.token_advantages(tok, torch.tensor([[0, 1, 2, 3, 4, 9, 9]]), [[(3, 0.5), (5, -1.0)]],
                                            stop_ids=[9])
    assert per_token == [[0.5, 0.5, 0.5, -1.0, -1.0, -1.0, -1.0]]
    # per-token advantages in the loss: the gradient of each token is -A_t grad log pi_t / tokens
    logps = torch.zeros(2, 3, requires_grad=True)
    a = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    grpo_loss(logps, None, None, a, torch.ones(2, 3, dtype=torch.int)).backward()
    assert torch.allclose(logps.grad, -a / 6)


def test_adam_eps_reaches_the_optimizer():
    """--adam_eps (a large one makes AdamW's step follow the gradient's size, a GRPO lever in LOG.md)."""
    from nanodoge import training
    cfg = SimpleNamespace(**{**train_grpo.DEFAULTS, "adam_eps": 1e-3})
    optimizer, _ = training.make_optimizer(cfg, ONE_PROCESS, Doge(DogeConfig(vocab_size=32, hidden_size=16,
        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)))
    assert optimizer.defaults["eps"] == 1e-3


def test_tokens_after_eos_carry_no_loss():
    stop = [2, 3]
    completions = torch.tensor([[5, 6, 2, 2, 2], [7, 3, 9, 2, 4], [5, 5, 5, 5, 5]])
    mask = completion_mask(completions, stop)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]  # the stop token is learned
    logps = torch.randn(3, 5, requires_grad=True)
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        loss = grpo_loss(logps, logps.detach() + 0.1, logps.detach() - 0.3, torch.tensor([1.0, -1.0, 0.5]),
                         mask, beta=0.1, loss_type=loss_type, max_completion_length=5)
        grad, = torch.autograd.grad(loss, logps)
        assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1] != 0), loss_type


def test_rewards_on_hand_written_completions():
    completions = [
        "<think>4+5=9, write 9\n4+5=9</think><answer>9</answer>",  # well-formed, right
        "<think>\n1*7=7</think>\n<answer> 1,000.0 </answer>\n",  # well-formed, right after normalisation
        "<think>4+5=8</think><answer>8</answer>",  # well-formed, wrong
        "<answer>9</answer>",  # no thinking
        "<think>4+5=9</think><answer>9</answer> and more",  # text after the answer
        "<think>4+5=9<answer>9</answer></think><answer>9</answer>",  # nested tag
        "<think>4+5=9</think><answer>9",  # unfinished
        "",
        "<think>1+11=12</think><answer>1,2</answer>",  # a comma that is no thousands separator: not 12
        "<think></think><answer></answer>",  # empty blocks: no format reward
        "<think> </think>\n<answer>9</answer>",  # an empty thought
    ]
    answers = ["9", "1000", "9", "9", "9", "9", "9", "9", "12", "9", "9"]
    assert accuracy_reward(completions, answers) == [1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1]
    assert format_reward(completions, answers) == [1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    # partial credit: digits right at their place value, over the longer of the two numbers
    partial = ["<answer>5722</answer>", "<answer>5,782</answer>", "<answer>82</answer>", "<answer>15782</answer>", "5782"]
    assert train_grpo.digits_reward(partial, ["5782"] * 5) == [0.75, 1.0, 0.5, 0.8, 0.0]
    rewards, total = train_grpo.score(completions[:3], answers[:3], {"accuracy": 1.0, "format": 0.5})
    assert total.tolist() == [1.5, 1.5, 0.5] and rewards["format"].tolist() == [1, 1, 1]


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_right_sample():
    for n in (4, 5):
        for right in range(n + 1):
            samples = [1] * right + [0] * (n - right)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert train_grpo.pass_at_k([right], n, k)[0] == pytest.approx(sum(map(any, subsets)) / len(subsets))


def test_paired_bootstrap_interval():
    """A change every problem shares has no spread: the interval is that change. Changes that vary and average
    zero: an interval around 0 about 2 x 1.96 standard errors wide (the normal approximation)."""
    assert report.paired_bootstrap([1, 2, 0, 3], [2, 3, 1, 4], generations=4) == pytest.approx([0.25, 0.25])
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(0, 5, (500,), generator=generator)
    after = (before + torch.tensor([-1, 1] * 250)).clamp(0, 4)
    change = (after - before).float() / 4
    low, high = report.paired_bootstrap(before.tolist(), after.tolist(), generations=4)
    assert low < change.mean().item() < high
    half_width = 1.96 * change.std().item() / math.sqrt(len(change))
    assert high - low == pytest.approx(2 * half_width, rel=0.1)


def test_noise_floor_is_the_spread_of_two_samplings():
    """Problems always or never solved give no noise; half-solved ones a floor around 0 as wide as two samplings'
    difference (the normal approximation: each problem's change has variance 2 p (1 - p) / n)."""
    assert report.noise_floor([0, 4, 4, 0], generations=4) == [0.0, 0.0]
    low, high = report.noise_floor([2] * 500, generations=4)
    half_width = 1.96 * math.sqrt(2 * 0.25 / 4 / 500)
    assert low == pytest.approx(-half_width, rel=0.1) and high == pytest.approx(half_width, rel=0.1)


def test_log_probs_are_those_of_the_sampling_temperature():
    """Rollouts sample from softmax(z / T): policy, old and reference log-probs are taken from the same."""
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits far from uniform, so the temperature matters
        ids = torch.randint(50, (2, 7))
        logits = model(ids[:, :-1])[0]
        for temperature in (1.0, 0.7):
            by_hand = torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            assert torch.allclose(train_grpo.completion_logps(model, ids, temperature), by_hand, atol=1e-5)
        assert (train_grpo.completion_logps(model, ids, 0.7) - train_grpo.completion_logps(model, ids, 1.0)).abs().max() > 0.1


def test_latex_answers_with_math_verify():
    pytest.importorskip("math_verify", reason="math_verify is optional (pip install math-verify)")
    completions = ["<think>half</think><answer>\\frac{1}{2}</answer>", "<think>x</think><answer>0.5</answer>",
                   "<think>x</think><answer>\\frac{1}{3}</answer>"]
    assert accuracy_reward(completions, ["\\frac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}"]) == [1, 1, 0]


# -----------------------------------------------------------------------------
# a short run on the arithmetic task

SYSTEM = ["--device=cpu", "--dtype=float32"]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, tiny_data):
    """A tiny Doge taught the answer format of the arithmetic curriculum by a brief SFT."""
    root = tmp_path_factory.mktemp("grpo")
    data_dir = tiny_data["arithmetic"]
    tok = load_tokenizer(data_dir)
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    ckpt.save_checkpoint(str(root / "init"), 0, dict(model=model.state_dict(), model_config=vars(model.config),
                                                       tokenizer=tok.state(), stage="pt"))
    train_sft.main([f"--data_dir={data_dir}", f"--init_from={root / 'init'}", f"--out_dir={root / 'sft'}",
                    "--max_steps=100", "--batch_size=16", "--batch_examples=16", "--seq_len=256",
                    "--learning_rate=3e-3", "--eval_interval=1000", "--ckpt_interval=1000", "--eval_examples=8",
                    "--log_interval=50", "--compile=False", *SYSTEM])
    return root, data_dir


def test_short_grpo_run_raises_held_out_reward(sft_model):
    """100 SFT steps leave the tiny model's format right in about a third of its samples: room to move. The
    held-out number is the mean reward of 4 sampled completions for each of 32 test prompts."""
    root, data_dir = sft_model
    out_dir = root / "grpo"
    train_grpo.main([f"--data_dir={data_dir}", f"--init_from={root / 'sft'}", f"--out_dir={out_dir}",
                     "--max_steps=24", "--prompts_per_step=8", "--num_generations=8", "--batch_size=64",
                     "--max_completion_length=80", "--eval_prompts=32", "--eval_interval=100",
                     "--reward_weights={'format': 1.0}", "--learning_rate=5e-4", "--log_interval=4", *SYSTEM])
    records = log_records(out_dir)
    evals = [r for r in records if "accuracy" in r]
    start, end = evals[0], evals[-1]
    print(f"held-out mean format reward: {start['reward']:.3f} at step 0 -> {end['reward']:.3f} at step 24")
    assert (start["step"], end["step"]) == (0, 24)
    assert end["reward"] > start["reward"]
    steps = [r for r in records if "loss" in r]
    assert all(0 <= r["clip_fraction"] <= 1 and r["completion_length"] > 0 for r in steps)
    # each evaluation's per-problem counts (report.py's bootstrap reads them) add up to its logged numbers
    for record in (start, end):
        counts = json.load(open(out_dir / f"eval_{record['step']:07d}.json"))
        assert (counts["generations"], len(counts["greedy"]), len(counts["sampled"])) == (4, 32, 32)
        assert record["sampled_accuracy"] == pytest.approx(sum(counts["sampled"]) / (4 * 32))
        assert record["accuracy"] == pytest.approx(sum(counts["greedy"]) / 32)
        assert record["pass@4"] == pytest.approx(sum(c > 0 for c in counts["sampled"]) / 32)
        assert record["sampled_accuracy"] <= record["pass@2"] <= record["pass@4"]


def test_truncated_completions_masked_and_the_temperature_ratio(sft_model, tmp_path):
    """At temperature 0.7 the first step's ratio is 1 (policy and old log-probs from the same softmax(z/T)): no
    token clipped. With 3-token completions every one is cut short: mask_truncated_completions leaves no loss and
    no gradient. The logged reward_std is over every reward, frac_reward_zero_std the groups without spread."""
    root, data_dir = sft_model
    common_args = [f"--data_dir={data_dir}", f"--init_from={root / 'sft'}", "--max_steps=1", "--prompts_per_step=4",
                   "--num_generations=4", "--eval_prompts=4", "--eval_generations=1", *SYSTEM]
    train_grpo.main(common_args + [f"--out_dir={tmp_path / 'a'}", "--temperature=0.7", "--max_completion_length=40"])
    step = log_records(tmp_path / "a")[1]
    assert step["clip_fraction"] == 0 and 0 <= step["frac_reward_zero_std"] <= 1 and step["reward_std"] >= 0
    train_grpo.main(common_args + [f"--out_dir={tmp_path / 'b'}", "--max_completion_length=3",
                                   "--mask_truncated_completions"])
    step = log_records(tmp_path / "b")[1]
    assert step["loss"] == 0 and step["grad_norm"] == 0


def test_a_process_reward_step_runs(sft_model, tmp_path):
    """advantage=process: one step with per-token advantages; the share of right think lines is logged."""
    root, data_dir = sft_model
    args = [f"--data_dir={data_dir}", f"--init_from={root / 'sft'}", "--prompts_per_step=4", "--num_generations=4",
            "--eval_prompts=4", "--eval_generations=1", "--max_completion_length=60", "--advantage=process", *SYSTEM]
    train_grpo.main(args + [f"--out_dir={tmp_path / 'a'}", "--max_steps=1"])
    step = log_records(tmp_path / "a")[1]
    assert 0 <= step["line_accuracy"] <= 1 and math.isfinite(step["loss"]) and step["grad_norm"] > 0
    # --max_steps=0 evaluates the starting model and ends there (no step, no checkpoint to export)
    train_grpo.main(args + [f"--out_dir={tmp_path / 'b'}", "--max_steps=0"])
    assert [r["step"] for r in log_records(tmp_path / "b")] == [0] and not os.path.exists(tmp_path / "b" / "hf")


def test_resume_is_exact(sft_model, tmp_path):
    root, data_dir = sft_model
    args = [f"--data_dir={data_dir}", "--prompts_per_step=2", "--num_generations=4", "--max_completion_length=40",
            "--eval_prompts=4", "--eval_generations=2", "--learning_rate=5e-4", "--num_iterations=2", "--beta=0.04",
            "--batch_size=4", *SYSTEM]
    train_grpo.main(args + [f"--init_from={root / 'sft'}", f"--out_dir={tmp_path / 'a'}", "--max_steps=4"])
    train_grpo.main(args + [f"--init_from={root / 'sft'}", f"--out_dir={tmp_path / 'b'}", "--max_steps=4",
                            "--ckpt_interval=2"])
    os.remove(ckpt.checkpoint_paths(str(tmp_path / "b"))[-1])  # as if stopped after step 2
    train_grpo.main(args + ["--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_steps=4"])
    a = ckpt.load_checkpoint(str(tmp_path / "a"))["model"]
    b = ckpt.load_checkpoint(str(tmp_path / "b"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # with num_iterations = 2 the second pass sees ratios != 1; beta > 0 gives a KL to the reference
    steps = [r for r in log_records(tmp_path / "a") if "loss" in r]
    assert steps[-1]["kl"] > 0


def test_one_line_errors(sft_model, tmp_path):
    root, data_dir = sft_model
    base = [f"--data_dir={data_dir}", f"--init_from={root / 'sft'}", f"--out_dir={tmp_path}", *SYSTEM]
    with pytest.raises(ValueError, match="reward_weights names \\['length'\\]"):
        train_grpo.main(base + ["--reward_weights={'length': 1.0}"])
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        train_grpo.main(base + ["--num_generations=1"])
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        train_grpo.main(base + [f"--data_dir={tmp_path}"])
    with pytest.raises(ValueError, match="not a GRPO one"):
        train_grpo.main(base + ["--init_from=resume", f"--out_dir={root / 'sft'}"])


def test_offline_chain_runs_end_to_end(tmp_path):
    """run_chain.sh at toy sizes (2 steps a stage): every stage starts from the one before and prints its number."""
    toy_model = ("--hidden_size=32 --intermediate_size=64 --num_hidden_layers=1 --num_attention_heads=2 "
                 "--num_key_value_heads=1 --max_position_embeddings=512 --keep_window_size=512")
    env = dict(os.environ, OUT=str(tmp_path / "out"), DATA=str(tmp_path / "data"),
               PT_ARGS=f"{toy_model} --seq_len=32 --batch_size=2 --batch_tokens=64 --eval_batches=1 --compile=False",
               SFT_ARGS="--seq_len=256 --batch_size=2 --batch_examples=2 --eval_examples=2 --max_new_tokens=8 "
                        "--compile=False",
               DPO_ARGS="--seq_len=256 --batch_size=2 --batch_examples=2 --eval_examples=2 --compile=False",
               GRPO_ARGS="--prompts_per_step=2 --num_generations=2 --eval_prompts=2 --max_completion_length=8 "
                         "--batch_size=4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(["bash", "run_chain.sh", "--max_steps=2", "--device=cpu", "--dtype=float32"], cwd=root,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for line in ("== val loss (step 1): val_loss", "== after SFT (step 1): accuracy",
                 "== after DPO (step 1): val_rewards/accuracies", "== after DPO (step 0): sampled_accuracy",
                 "== after GRPO (step 2): sampled_accuracy", "== the chain in"):
        assert line in result.stdout, line
    assert ckpt.checkpoint_paths(str(tmp_path / "out" / "grpo"))
    # the report: a table row per stage with its time, numbers and a sampled answer; the JSON tools read
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert set(report["seconds"]) == {"prepare", "pretrain", "sft", "dpo", "grpo", "sample", "total"}
    keys = {"pretrain": {"val_loss", "unigram_val_loss"}, "sft": {"accuracy_before", "accuracy_after"},
            "dpo": {"preference_accuracy_before", "preference_accuracy_after", "accuracy_after"},
            "grpo": {"accuracy_before", "accuracy_after", "reward_before", "reward_after", "sampled_accuracy_before",
                     "sampled_accuracy_after", "sft_accuracy_after"}}
    for stage, names in keys.items():
        assert names <= set(report[stage]) and all(isinstance(report[stage][k], float) for k in names)
    grpo = report["grpo"]  # 4 samples of 2 problems: pass@1 (the sampled accuracy), pass@2 and pass@4
    assert (grpo["problems"], grpo["generations"]) == (2, 4) and set(grpo["pass_at_k_after"]) == {"1", "2", "4"}
    assert grpo["pass_at_k_before"]["1"] == grpo["sampled_accuracy_before"]
    assert grpo["band"] == f"2-digit + - arithmetic: 2 held-out problems (test.jsonl) sampled at temperature {grpo['temperature']}"
    assert grpo["sft_accuracy_after"] == grpo["accuracy_after"]  # SFT's test set is the one GRPO is judged on
    low, high = grpo["sampled_accuracy_ci"]
    assert -1 <= low <= high <= 1
    floor_low, floor_high = grpo["sampled_accuracy_noise_floor"]
    assert -1 <= floor_low <= 0 <= floor_high <= 1
    assert report["dpo"]["preference_accuracy_before"] == 0.0  # policy = reference before DPO: every reward 0
    table = open(tmp_path / "out" / "report.md").read().splitlines()
    rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"stage", "prepare", "pretrain", "sft", "dpo", "grpo", "sample"}
    assert " s |" in rows["sft"] and "->" in rows["sft"] and rows["grpo"].count("|") == 6
    assert any(line.startswith("What RL did: at temperature") for line in table)
    assert os.path.getsize(tmp_path / "out" / "report.png") > 1000


def _two_process_grpo_step(rank, store, path):
    """One of two gloo processes: its half of the 8 completions through DDP; rank 0 saves loss and gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model, ids, mask, advantages, cfg = _grpo_step_inputs(batch_size=3)
    ddp = DDP(model, broadcast_buffers=False)
    mine = slice(4 * rank, 4 * rank + 4)
    run = SimpleNamespace(world_size=2, device=torch.device("cpu"), dtype="float32")
    loss, _ = train_grpo.policy_backward(ddp, ids[mine], mask[mine], advantages[mine], None, None, cfg, run,
                                         torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext())
    mean = loss.clone()
    dist.all_reduce(mean)
    mean /= 2  # the mean of the processes' losses is the step's (training.mean_over_processes)
    if rank == 0:
        torch.save((mean.item(), [p.grad for p in model.parameters()]), path)
    dist.barrier()  # both done before either tears the group down
    dist.destroy_process_group()
    # out without the interpreter's teardown: there gloo's worker threads, still holding tensors, abort the
    # process now and then ("terminate called without an active exception", 1 run in 20-30 on a 2-core EPYC)
    os._exit(0)


def _grpo_step_inputs(batch_size):
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(40, (8, 12))
    mask = (torch.arange(11)[None] < torch.tensor([3, 11, 5, 7, 2, 9, 1, 4])[:, None]).int()  # 26 and 16 tokens
    advantages = torch.randn(8)
    cfg = SimpleNamespace(batch_size=batch_size, temperature=1.0, epsilon=0.2, epsilon_high=None, beta=0.0,
                          loss_type="dapo", max_completion_length=11, use_bias_correction_kl=True)
    return model, ids, mask, advantages, cfg


def test_two_processes_take_the_step_of_one(tmp_path):
    """The same 8 completions on 1 process, or split over 2 (gloo, DDP): the same step loss and gradient (dapo's
    token count is all-reduced; DDP's average is undone by world_size; the processes' losses average to the step's)."""
    import torch.multiprocessing as mp
    model, ids, mask, advantages, cfg = _grpo_step_inputs(batch_size=8)
    loss, _ = train_grpo.policy_backward(model, ids, mask, advantages, None, None, cfg, ONE_PROCESS,
                                         torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext())
    loss = loss.item()
    path = str(tmp_path / "rank0.pt")
    # a file store, not TCP: no fixed port to collide, and no store server in rank 0 that vanishes when rank 0
    # exits while rank 1 still tears down (the SIGABRT that failed this test once in CI)
    mp.spawn(_two_process_grpo_step, args=(str(tmp_path / "store"), path), nprocs=2)
    two_loss, two_grads = torch.load(path)
    assert two_loss == pytest.approx(loss, rel=1e-5)
    for p, g in zip(model.parameters(), two_grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)
