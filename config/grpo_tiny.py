# GRPO for the offline quickstart: the tiny model after SFT and DPO, on the built-in arithmetic prompts, a few minutes
# on a laptop CPU (README: times per CPU kind). Rewards: answer accuracy, the <think>/<answer> format, and partial credit per
# digit (a dense signal while whole answers are still rare). The held-out number, logged at step 0 and at the end:
# sampled accuracy, the share of 4 completions of each of the 500 held-out problems, sampled at the rollout
# temperature, whose answer is right; beside it greedy accuracy, pass@k and the mean reward (what GRPO maximises).
# The settings tried for it, none of which moved it in the chain's minutes: LOG.md.
# Usage: python train_grpo.py config/grpo_tiny.py

init_from = "out/dpo"
out_dir = "out/grpo"
data = dict(dataset="shakespeare", tokenizer="sentencepiece", vocab_size=4096)  # as config/doge_tiny.py
data_dir = "data/arithmetic"

prompts_per_step = 32  # 256 completions a step: fewer make a step's gradient mostly noise at this size
num_generations = 8
temperature = 1.0  # where RL has room: at 1 a sample is right much less often than one of 8 is (LOG.md, 2026-12-04)
max_completion_length = 96
reward_weights = {"accuracy": 1.0, "format": 1.0, "digits": 1.0}
max_steps = 30
learning_rate = 1e-4  # at 3e-4 (Adam) held-out greedy and sampled accuracy fell; at 1e-4 they held (LOG.md)
batch_size = 64

eval_interval = 1000  # held-out numbers at the start and the end only
eval_prompts = 500  # the whole held-out set, as SFT scores
eval_generations = 4
log_interval = 5
ckpt_interval = 1000

