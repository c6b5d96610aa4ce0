# The offline quickstart: a 2.1M-parameter Doge pre-trained on Shakespeare (python prepare_data.py) in minutes
# on a laptop CPU (README: times and val loss, per CPU kind). dtype is auto: bf16 only where the CPU computes it.
# Usage: python train_pt.py config/doge_tiny.py      (then config/sft_tiny.py, dpo_tiny.py, grpo_tiny.py)

# --- model shape: the Doge-20M layout, narrower and shallower ---
hidden_size = 192
intermediate_size = 384
num_hidden_layers = 4
num_attention_heads = 2
num_key_value_heads = 1
tie_word_embeddings = True

# --- training: 128 steps of 4,096 tokens (0.52M tokens, a third of a pass over Shakespeare) ---
# data: `python prepare_data.py` (or with this config): Shakespeare, and the arithmetic curriculum for the
# later stages, one sentencepiece tokenizer for both
data = dict(dataset="shakespeare", tokenizer="sentencepiece", vocab_size=4096)
data_dir = "data/shakespeare"
out_dir = "out/pt"
seq_len = 256
batch_size = 16
batch_tokens = 4096
max_steps = 128  # the chain spends its minutes on SFT, where the arithmetic is learned
learning_rate = 4e-3
warmup_ratio = 0.05
decay_ratio = 0.3  # a short run gains from a longer decay
eval_interval = 32
eval_batches = 10
log_interval = 20
ckpt_interval = 32
