"""small-doge's own Doge modeling code, the reference for the layout of its -Instruct checkpoints (no q/k norms,
A and dt_proj per query head): modeling_doge.py is src/small_doge/models/doge/modeling_doge.py of
github.com/SmallDoges/small-doge at commit 0e305a7, unchanged. Copyright 2025 Jingze Shi and the HuggingFace Inc.
team, licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0). It is written
for an older transformers: tests/test_published.py imports it with shims for transformers 5.23."""
