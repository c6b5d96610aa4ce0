# Reasoning distillation SFT of Doge-20M: Bespoke-Stratos-17k traces rewritten to <think>...</think><answer>...</answer>
# with the system prompt GRPO and chat use; then GRPO (config/grpo_doge_20m.py --init_from=out/sft_reasoning_doge_20m).
# data: python prepare_data.py config/sft_reasoning_doge_20m.py (online; the tokenizer of the pre-training data)
# Usage: torchrun --nproc_per_node=1 train_sft.py config/sft_reasoning_doge_20m.py

init_from = "out/sft_doge_20m"
out_dir = "out/sft_reasoning_doge_20m"
data = dict(dataset="none", tokenizer="data/smollm-mix", sft="bespoke-stratos", dpo="none", grpo="numinamath")
data_dir = "data/bespoke-stratos+numinamath"

seq_len = 2048  # longer traces are cut to their first 2048 tokens (the model's context)
batch_examples = 64
batch_size = 4
epochs = 2.0
learning_rate = 8e-4
# and, as the script's defaults: WSD with warmup 0.1 and decay 0.1, weight decay 0.01, bf16
eval_interval = 200
ckpt_interval = 200
max_new_tokens = 1024  # greedy answers on test.jsonl (NuminaMath-TIR held-out problems)
