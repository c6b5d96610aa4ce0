"""
nanodoge's toolbox, which the scripts at the top (prepare_data.py, train_*.py, sample.py, eval.py, bench.py,
report.py) import and never the other way round: config (settings, the entry point), device (processes,
precision, the matmul peak), files (atomic writes, token and example files), dataset_rows (local files and the
hub), tokenizer, checkpoint, engine (fast generation), arithmetic (the offline curriculum), training (the tools
a training loop calls), post_training (chat batches, log-probs, answer accuracy), deepspeed_zero (ZeRO).
"""
