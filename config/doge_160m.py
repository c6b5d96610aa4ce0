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

# --- training recipe (lr, steps, batch, schedule, ...) ---
