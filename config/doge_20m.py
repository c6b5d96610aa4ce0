# Doge-20M: the SmallDoge model shape (13M parameters with tied embeddings), for train_pt.py.
# Usage: torchrun --nproc_per_node=1 train_pt.py config/doge_20m.py [--key=value ...]

# --- model shape (DogeConfig field names; sizes from the SmallDoge guide) ---
hidden_size = 256
intermediate_size = 512
num_hidden_layers = 8
num_attention_heads = 2
num_key_value_heads = 1
vocab_size = 32768
tie_word_embeddings = True
max_position_embeddings = 2048
keep_window_size = 2048

# --- training recipe (SmallDoge guide: 4B tokens = 8,000 steps of 0.5M tokens, WSD) ---
# data: `python prepare_data.py config/doge_20m.py` streams what `data` says into data_dir (online)
data = dict(dataset="smollm-mix", tokenizer="SmallDoge/Doge-tokenizer", max_tokens=4_200_000_000,
            sft="none", dpo="none", grpo="none")
data_dir = "data/smollm-mix"
out_dir = "out/doge_20m"
seq_len = 2048
batch_tokens = 524288  # 0.5M tokens per optimizer step
batch_size = 16  # sequences per process and micro-step: 16 accumulation steps on 1 GPU, 2 on 8
max_steps = 8000
learning_rate = 8e-3
# and, as train_pt.py's defaults: WSD with warmup 0.1 and decay 0.1 to min lr rate 0, weight decay 0.01, bf16
eval_interval = 1000
ckpt_interval = 1000
