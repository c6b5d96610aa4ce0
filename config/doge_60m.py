# Doge-60M: the SmallDoge model shape (54M parameters with tied embeddings), for train_pt.py.
# Usage: torchrun --nproc_per_node=1 train_pt.py config/doge_60m.py [--key=value ...]

# --- model shape (DogeConfig field names; sizes from the SmallDoge guide) ---
hidden_size = 512
intermediate_size = 1024
num_hidden_layers = 16
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 32768
tie_word_embeddings = True
max_position_embeddings = 2048
keep_window_size = 2048

# --- training recipe (lr, steps, batch, schedule, ...) ---
