# GRPO for the offline quickstart: the tiny model after SFT and DPO, on the built-in arithmetic prompts (4,000, a
# fresh one each time), a few minutes on a laptop CPU (README: times per CPU kind). The advantages are per token,
# from the process reward: each line of the worked solution is checked, and each token learns from its line and the
# ones after it. The held-out number, logged at step 0 and at the end: sampled accuracy, the share of 4 completions
# of each of the 500 held-out problems, sampled at the rollout temperature, whose answer is right; beside it greedy
# accuracy, pass@k and the mean reward. The settings tried for it: LOG.md.
# Usage: python train_grpo.py config/grpo_tiny.py

init_from = "out/dpo"
out_dir = "out/grpo"
data = dict(dataset="shakespeare", tokenizer="sentencepiece", vocab_size=4096)  # as config/doge_tiny.py
data_dir = "data/arithmetic"

prompts_per_step = 32  # 256 completions a step: fewer make a step's gradient mostly noise at this size
num_generations = 8
temperature = 1.5  # where RL has room: a sample is right 15+ points less often than one of 8 is (LOG.md, 2026-12-08)
max_completion_length = 96
reward_weights = {"accuracy": 1.0, "format": 1.0, "digits": 1.0}  # logged; the advantages come from the lines
advantage = "process"  # every think line checked (DeepSeekMath 4.1.3): +2.6 points where outcome rewards gave +2.1
max_steps = 30
learning_rate = 1e-4  # 3e-4 moved it as far (+2.6 points); 1e-3 lost 6 points and 13 of greedy (LOG.md, 2026-12-08)
batch_size = 64

eval_interval = 1000  # held-out numbers at the start and the end only
eval_prompts = 500  # the whole held-out set, as SFT scores
eval_generations = 4
log_interval = 5
ckpt_interval = 1000

