# Doge-320M: the SmallDoge model shape (335M parameters with tied embeddings), for train_pt.py.
# Usage: torchrun --nproc_per_node=1 train_pt.py config/doge_320m.py [--key=value ...]

# --- model shape (DogeConfig field names; sizes from the SmallDoge guide) ---
hidden_size = 1024
intermediate_size = 2048
num_hidden_layers = 32
num_attention_heads = 8
num_key_value_heads = 4
vocab_size = 32768
tie_word_embeddings = True
max_position_embeddings = 2048
keep_window_size = 2048

# --- training recipe (SmallDoge guide: 64B tokens = 32,000 steps of 2M tokens, WSD) ---
# data: `python prepare_data.py config/doge_320m.py` streams what `data` says into data_dir (online)
data = dict(dataset="smollm-mix", tokenizer="SmallDoge/Doge-tokenizer", max_tokens=64_000_000_000,
            sft="none", dpo="none", grpo="none")
data_dir = "data/smollm-mix"
out_dir = "out/doge_320m"
seq_len = 2048
batch_tokens = 2097152  # 2M tokens per optimizer step
batch_size = 8  # sequences per process and micro-step: 128 accumulation steps on 1 GPU, 16 on 8
max_steps = 32000
learning_rate = 2e-3
# and, as train_pt.py's defaults: WSD with warmup 0.1 and decay 0.1 to min lr rate 0, weight decay 0.01, bf16
eval_interval = 1000
ckpt_interval = 1000
