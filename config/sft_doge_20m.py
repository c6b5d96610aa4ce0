# Instruction tuning of Doge-20M (SmallDoge guide: smoltalk, 2 epochs, lr 8e-4, context 2048, 0.25M-token batches).
# data: python prepare_data.py config/sft_doge_20m.py (online; the tokenizer of the pre-training data)
# Usage: torchrun --nproc_per_node=1 train_sft.py config/sft_doge_20m.py

init_from = "out/doge_20m"  # the pre-trained model (or a Hugging Face Doge: SmallDoge/Doge-20M)
out_dir = "out/sft_doge_20m"
data = dict(dataset="none", tokenizer="data/smollm-mix", sft="smoltalk", dpo="none", grpo="none")
data_dir = "data/smoltalk"

seq_len = 2048
batch_examples = 128  # conversations per optimizer step: up to 128 x 2048 = 0.25M tokens
batch_size = 8        # per process and micro-step: 16 accumulation steps on 1 GPU
epochs = 2.0
learning_rate = 8e-4
# and, as the script's defaults: WSD with warmup 0.1 and decay 0.1, weight decay 0.01, bf16
eval_interval = 500
ckpt_interval = 500
