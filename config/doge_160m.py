# Doge-160M: the SmallDoge model shape (152M parameters with tied embeddings), for train_pt.py.
# Usage: torchrun --nproc_per_node=1 train_pt.py config/doge_160m.py [--key=value ...]

# --- model shape (DogeConfig field names; sizes from the SmallDoge guide) ---
hidden_size = 768
intermediate_size = 1536
num_hidden_layers = 24
num_attention_heads = 6
num_key_value_heads = 3
vocab_size = 32768
tie_word_embeddings = True
max_position_embeddings = 2048
keep_window_size = 2048

# --- training recipe (SmallDoge guide: 32B tokens = 24,000 steps of 1.5M tokens, WSD) ---
# data: `python prepare_data.py config/doge_160m.py` streams what `data` says into data_dir (online)
data = dict(dataset="smollm-mix", tokenizer="SmallDoge/Doge-tokenizer", max_tokens=32_000_000_000,
            sft="none", dpo="none", grpo="none")
data_dir = "data/smollm-mix"
out_dir = "out/doge_160m"
seq_len = 2048
batch_tokens = 1572864  # 1.5M tokens per optimizer step
batch_size = 16  # sequences per process and micro-step: 48 accumulation steps on 1 GPU, 6 on 8
max_steps = 24000
learning_rate = 4e-3
# and, as train_pt.py's defaults: WSD with warmup 0.1 and decay 0.1 to min lr rate 0, weight decay 0.01, bf16
eval_interval = 1000
ckpt_interval = 1000
