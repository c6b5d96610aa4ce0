# Preference alignment of Doge-20M (SmallDoge guide: ultrafeedback_binarized, 2 epochs, lr 8e-5, context 1024,
# 0.125M-token batches, beta 0.1 as TRL's default).
# data: python prepare_data.py config/dpo_doge_20m.py (online; the tokenizer of the pre-training data)
# Usage: torchrun --nproc_per_node=1 train_dpo.py config/dpo_doge_20m.py

init_from = "out/sft_doge_20m"  # the policy starts as the SFT model; a frozen copy is the reference
out_dir = "out/dpo_doge_20m"
data = dict(dataset="none", tokenizer="data/smollm-mix", sft="none", dpo="ultrafeedback", grpo="none")
data_dir = "data/ultrafeedback"

seq_len = 1024
batch_examples = 64  # pairs per optimizer step: up to 64 x 2 x 1024 = 0.125M tokens
batch_size = 4       # pairs per process and micro-step: 16 accumulation steps on 1 GPU
epochs = 2.0
learning_rate = 8e-5
beta = 0.1
loss_type = "sigmoid"
# and, as the script's defaults: WSD with warmup 0.1 and decay 0.1, weight decay 0.01, bf16
eval_interval = 200
ckpt_interval = 200
