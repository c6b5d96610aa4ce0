# The offline quickstart's instruction tuning: the tiny pre-trained model (config/doge_tiny.py) learns the
# arithmetic curriculum's worked solutions, <think>column by column</think><answer>n</answer>, in minutes on a
# laptop CPU (README: times per CPU kind). Loss only on what the assistant says; the number is greedy answer accuracy on test.jsonl.
# Usage: python train_sft.py config/sft_tiny.py

init_from = "out/pt"
out_dir = "out/sft"
data = dict(dataset="shakespeare", tokenizer="sentencepiece", vocab_size=4096)  # as config/doge_tiny.py
data_dir = "data/arithmetic"

seq_len = 512  # every arithmetic conversation fits
batch_size = 16
batch_examples = 16
max_steps = 2400  # 38,400 conversations, about eight epochs
learning_rate = 3e-3  # seed 1337: 58% at 2e-3, 82% at 3e-3; a linear decay from the start, 7% (LOG.md, 2026-12-04)
warmup_ratio = 0.02
decay_ratio = 0.4  # the digits are found and the answers sharpen mostly while the learning rate decays
eval_interval = 2400  # accuracy before and after only
eval_examples = 500  # the whole held-out set (test.jsonl), as GRPO scores
log_interval = 25
ckpt_interval = 2400
