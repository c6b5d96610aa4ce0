# GRPO for Doge-20M after SFT: reasoning RL with verifiable rewards (answer accuracy + <think>/<answer> format).
# Usage: torchrun --nproc_per_node=1 train_grpo.py config/grpo_doge_20m.py
# Offline it runs on the arithmetic prompts; for NuminaMath-TIR prepare them with the model's tokenizer,
#   python prepare_data.py --dataset=none --tokenizer=<the model's data dir> --sft=none --dpo=none --grpo=numinamath
# and add --data_dir=data/numinamath --max_completion_length=1024.

init_from = "out/sft_doge_20m"
out_dir = "out/grpo_doge_20m"
data = dict(dataset="none", tokenizer="data/smollm-mix")  # the arithmetic prompts in the model's tokenizer
data_dir = "data/arithmetic"

# rollouts: 16 prompts x 8 completions = 128 completions per step (TRL's G = 8, temperature 1.0)
prompts_per_step = 16
num_generations = 8
temperature = 1.0
max_completion_length = 256
# the objective: TRL 1.16's defaults (epsilon 0.2, beta 0, one pass per batch), except the per-sequence mean
# (loss_type grpo, TRL's default when SmallDoge's recipe was written; TRL 1.16's is dapo)
loss_type = "grpo"
epsilon = 0.2
beta = 0.0
num_iterations = 1
batch_size = 32

max_steps = 500
learning_rate = 1e-5
warmup_ratio = 0.05
eval_interval = 50
eval_prompts = 200
