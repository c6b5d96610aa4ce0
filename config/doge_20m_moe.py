# Doge-20M-MoE: SmallDoge's recipe (recipes/doge/Doge-20M-MoE) -- its Doge-20M checkpoint grown into a CDMoE of
# 1,024 one-neuron experts, 16 per token, and pre-trained on: every dense tensor kept (the MLP is the shared
# expert), router_gate, down_embed and up_embed new, a fresh optimizer and WSD schedule.
# Usage: torchrun --nproc_per_node=1 train_pt.py config/doge_20m_moe.py [--init_from=<a dense Doge-20M>]

init_from = "SmallDoge/Doge-20M"  # or a nanodoge out dir of config/doge_20m.py
is_moe = True
num_experts = 1024
num_experts_per_tok = 16

# --- the rest of the recipe is Doge-20M's: 8,000 steps of 0.5M tokens, lr 8e-3, warmup and decay 800 steps ---
data = dict(dataset="smollm-mix", tokenizer="SmallDoge/Doge-tokenizer", max_tokens=4_200_000_000,
            sft="none", dpo="none", grpo="none")
data_dir = "data/smollm-mix"
out_dir = "out/doge_20m_moe"
seq_len = 2048
batch_tokens = 524288  # 0.5M tokens per optimizer step
batch_size = 16
max_steps = 8000
learning_rate = 8e-3
eval_interval = 1000
ckpt_interval = 1000
