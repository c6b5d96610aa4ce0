"""model.py against transformers' DogeForCausalLM (the reference), generation, checkpoints and bad input."""
import os
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M
from nanodoge import post_training
from model import Doge, DogeConfig, sample_next_token

transformers = pytest.importorskip("transformers")
from transformers import DogeForCausalLM  # noqa: E402
from transformers.models.doge.modeling_doge import load_balancing_loss_func  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)

def make_model(seed=0, **overrides):
    """A tiny Doge whose A, residuals and norms are moved off their init (so a mix-up would show)."""
    torch.manual_seed(seed)
    model = Doge(DogeConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if name.endswith(".A") else 1.0))
    return model.eval()

def reference_of(model):
    """DogeForCausalLM (sdpa attention) built from our config, holding our weights."""
    hf_config = transformers.DogeConfig.from_dict(model.config.to_hf_dict())
    reference = DogeForCausalLM(hf_config).eval()
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"])
    return reference

def max_diff(a, b):
    return (a - b).abs().max().item()

# -----------------------------------------------------------------------------
# parity with the reference

def test_parity_gqa_with_keep_window_below_sequence_length():
    model = make_model(keep_window_size=8)  # 4 query heads on 2 kv heads, top-k active for T=20 > 8
    idx = torch.randint(97, (2, 20))
    with torch.no_grad():
        assert max_diff(model(idx)[0], reference_of(model)(idx).logits) <= 1e-4

def test_parity_mha_tied_embeddings():
    model = make_model(num_key_value_heads=4, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    idx = torch.randint(97, (2, 24))
    with torch.no_grad():
        assert max_diff(model(idx)[0], reference_of(model)(idx).logits) <= 1e-4

def test_loss_equals_reference_and_ignores_minus_one():
    model = make_model(keep_window_size=8)
    idx = torch.randint(97, (3, 16))
    targets = torch.cat((idx[:, 1:], torch.full((3, 1), -1)), dim=1)  # next token; last position ignored
    targets[0, :5] = -1
    labels = idx.clone()
    labels[0, 1:6] = -100  # the reference shifts labels inside
    scored = post_training.scored_positions(targets, bucket=16)  # 40 scored rows, padded to 48
    with torch.no_grad():
        logits, loss = model(idx, targets)
        head_logits, head_loss = model(idx, targets, scored=scored)
        ref_loss = reference_of(model)(idx, labels=labels).loss
        all_logits = model(idx)[0]
        by_hand = F.cross_entropy(all_logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert abs(loss.item() - by_hand.item()) <= 1e-6 and abs(head_loss.item() - by_hand.item()) <= 1e-6
    assert max_diff(logits, all_logits.flatten(0, 1)) <= 1e-6  # without scored: every position through the head
    # with scored: the head runs on the scored positions, then on pads that point at an ignored one
    assert scored.shape == (48,) and (targets.flatten()[scored[40:]] == -1).all()
    assert max_diff(head_logits[:40], all_logits[targets != -1]) <= 1e-6

def test_folded_attention_equals_float_bias_attention_with_gradients():
    """The training fast path (dynamic mask folded into an extra key coordinate, is_causal) against the
    readable one (materialised float bias), forward and every gradient, GQA."""
    torch.manual_seed(0)
    B, H, G, T, D = 2, 4, 2, 12, 16
    q, k, v = (torch.randn(B, n, T, D, dtype=torch.float64, requires_grad=True) for n in (H, G, G))
    dt = torch.rand(B, G, T, dtype=torch.float64, requires_grad=True) * 3
    fast = M.causal_attention_folded(q, k, v, dt, 0.0)
    assert (D + M.FOLD) % 8 == 0  # a head size the GPU's fused SDPA kernels accept
    slow = M.attention_with_bias(q, k, v, M.dynamic_mask(dt, T, keep_window_size=T), 0.0)
    assert max_diff(fast, slow) <= 1e-10
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (q, k, v, dt))
    grads_slow = torch.autograd.grad((slow * weights).sum(), (q, k, v, dt))
    for a, b in zip(grads_fast, grads_slow):
        assert max_diff(a, b) <= 1e-10

def test_greedy_generate_equals_reference_across_keep_window_edge():
    model = make_model(keep_window_size=10)
    prompt = torch.randint(97, (1, 6))
    ours = model.generate(prompt, 14, temperature=0.0)  # 6 + 14 = 20 keys > keep_window_size
    with torch.no_grad():
        ref = reference_of(model).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14,
                                           min_new_tokens=14, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)

def test_repetition_penalty_equals_reference():
    model = make_model(vocab_size=11)  # a small vocabulary so tokens repeat
    prompt = torch.randint(11, (1, 5))
    ours = model.generate(prompt, 12, temperature=0.0, repetition_penalty=5.0)
    with torch.no_grad():
        ref = reference_of(model).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                           min_new_tokens=12, do_sample=False, repetition_penalty=5.0,
                                           pad_token_id=0)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, model.generate(prompt, 12, temperature=0.0))  # the penalty changed something

def test_moe_forward_equals_reference_token_by_token_and_aux_loss():
    model = make_model(is_moe=True, num_experts=16, num_experts_per_tok=3, router_aux_loss_coef=0.01)
    reference = reference_of(model)
    idx = torch.randint(97, (1, 7))
    with torch.no_grad():
        logits, _ = model(idx)
        cache, steps = transformers.DynamicCache(config=reference.config), []
        for t in range(idx.size(1)):  # one token at a time, the reference routes each token correctly
            out = reference(idx[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert max_diff(logits, torch.cat(steps, dim=1)) <= 1e-4

    # aux loss: the reference's function on our router logits laid out as it expects ([2, tokens, keys])
    router_outputs = []
    hooks = [layer.mlp.router_gate.register_forward_hook(lambda m, i, o: router_outputs.append(o))
             for layer in model.model.layers]
    targets = torch.randint(97, (1, 7))
    with torch.no_grad():
        logits, loss = model(idx, targets)
    for h in hooks:
        h.remove()
    gate_logits = tuple(o.view(-1, 2, 4).transpose(0, 1) for o in router_outputs)
    aux = load_balancing_loss_func(gate_logits, 16, 4, 3)
    ce = F.cross_entropy(logits, targets.flatten())
    assert aux.item() > 0
    assert abs(loss.item() - (ce.item() + 0.01 * aux.item())) <= 1e-6

def test_moe_routing_is_causal():
    model = make_model(is_moe=True, num_experts=16, num_experts_per_tok=3)
    idx = torch.randint(97, (1, 8))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 97
    with torch.no_grad():
        assert max_diff(model(idx)[0][:, :-1], model(changed)[0][:, :-1]) == 0.0

# -----------------------------------------------------------------------------
# checkpoints

def test_save_pretrained_loads_in_reference(tmp_path):
    model = make_model(tie_word_embeddings=True, keep_window_size=8)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "doge" and config["rope_parameters"]["rope_theta"] == 10000.0
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied
    reference = DogeForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(97, (2, 12))
    with torch.no_grad():
        assert max_diff(model(idx)[0], reference(idx).logits) <= 1e-4

@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_from_pretrained_reads_reference_saved_dir(tmp_path, layout):
    reference = reference_of(make_model(seed=1))
    if layout == "bin":
        reference.config.save_pretrained(tmp_path)
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        reference.save_pretrained(tmp_path, max_shard_size="40KB" if layout == "sharded" else "5GB")
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    model = Doge.from_pretrained(tmp_path)
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    idx = torch.randint(97, (2, 12))
    with torch.no_grad():
        assert max_diff(model(idx)[0], reference(idx).logits) <= 1e-4

# -----------------------------------------------------------------------------
# generation

def test_kv_cache_holds_the_compute_dtype_under_autocast():
    """Under autocast the keys, values and dt leave the projections (and the q/k norms, RoPE) in the compute
    dtype, so the cache is stored in it and no decode step casts the cached keys again."""
    model = make_model()
    cache = M.KVCache(model.config.num_hidden_layers, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden_states(torch.randint(97, (2, 5)), cache)
    assert {t.dtype for t in cache.k + cache.v + cache.dt} == {torch.bfloat16}

def test_cached_generation_equals_full_recompute():
    model = make_model()
    idx = torch.randint(97, (2, 5))
    seq = idx
    with torch.no_grad():
        for _ in range(10):  # no cache: the whole sequence again each step
            seq = torch.cat((seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(idx, 10, temperature=0.0), seq)

def test_batched_generation_equals_one_by_one():
    model = make_model()
    prompts = torch.randint(97, (3, 6))
    batched = model.generate(prompts, 8, temperature=0.0)
    for row in range(3):
        assert torch.equal(batched[row:row + 1], model.generate(prompts[row:row + 1], 8, temperature=0.0))

def test_left_padded_batch_equals_one_by_one_across_keep_window_edge():
    """Prompts of unequal length in one batch: the pads are never attended and RoPE is relative, so each row
    decodes what it decodes alone, also once its keys outnumber keep_window_size (top-k over keys)."""
    model = make_model(keep_window_size=12)
    prompts = [torch.randint(97, (n,)).tolist() for n in (3, 9, 1, 6)]
    idx, attention_mask = M.left_pad(prompts, pad_id=0)
    batched = model.generate(idx, 10, temperature=0.0, attention_mask=attention_mask)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), 10, temperature=0.0)
        assert batched[row, idx.size(1):].tolist() == alone[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="left padding"):
        model.generate(idx, 2, attention_mask=attention_mask.flip(1))

def test_generate_keeps_to_a_smaller_tokenizers_ids():
    """A model whose (padded) vocabulary is larger than its tokenizer's never samples an id the tokenizer lacks."""
    torch.manual_seed(0)
    out = make_model().generate(torch.randint(97, (4, 3)), 30, temperature=2.0, vocab_size=10)
    assert out[:, 3:].max() < 10

def test_generate_eos():
    model = make_model()
    prompts = torch.randint(97, (2, 4))
    full = model.generate(prompts, 6, temperature=0.0)
    eos = int(full[0, 4])  # row 0 emits it first
    out = model.generate(prompts, 6, temperature=0.0, eos_token_id=[eos, 1000])
    assert (out[0, 4:] == eos).all()  # a finished row is filled with eos
    if eos not in full[1, 4:].tolist():
        assert torch.equal(out[1], full[1])  # the other row is unaffected
    both_first = model.generate(prompts[:1], 6, temperature=0.0, eos_token_id=eos)
    assert both_first.shape == (1, 5)  # stops once every row finished

def test_sample_next_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    assert sample_next_token(logits, temperature=0.0).tolist() == [1, 0]
    torch.manual_seed(0)
    draws = torch.stack([sample_next_token(logits, 1.0, top_k=2) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    # top_p: row 0 probabilities ~ (.03, .64, .09, .24): 0.7 keeps tokens 1 and 3
    draws = torch.stack([sample_next_token(logits, 1.0, top_p=0.7) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 3}
    draws = torch.stack([sample_next_token(logits, 1.0) for _ in range(2000)])
    frequency = (draws[:, 0] == 1).float().mean().item()
    assert abs(frequency - F.softmax(logits[0], -1)[1].item()) < 0.05
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=-1.0)

# -----------------------------------------------------------------------------
# shapes, init, training helpers

@pytest.mark.parametrize("name, published", [("20m", 13e6), ("60m", 54e6), ("160m", 152e6), ("320m", 335e6)])
def test_config_files_match_published_parameter_counts(name, published):
    values = {}
    exec(open(os.path.join(ROOT, "config", f"doge_{name}.py")).read(), values)
    fields = {f for f in DogeConfig.__dataclass_fields__}
    config = DogeConfig(**{k: v for k, v in values.items() if k in fields})
    assert config.head_dim == 128 and config.tie_word_embeddings
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Doge(config).parameters())
    assert abs(n_params / published - 1) <= 0.02

def test_init_follows_the_spec():
    model = Doge(DogeConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 4000}))
    layer = model.model.layers[0]
    assert (layer.self_attn.A == 0).all() and (layer.input_residual == 1).all()
    assert (layer.post_attention_layernorm.weight == 1).all() and (layer.self_attn.k_norm.weight == 1).all()
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 0.001
    assert abs(layer.mlp.gate_proj.weight.std().item() - 0.02) < 0.001
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied by default, like the reference

def test_param_groups():
    model = make_model(tie_word_embeddings=True, attention_bias=True)
    groups = model.param_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert "model.embed_tokens.weight" in decay and "model.layers.0.self_attn.q_proj.weight" in decay
    for name in ["model.layers.0.self_attn.A", "model.layers.0.input_residual", "model.norm.weight",
                 "model.layers.1.self_attn.k_norm.weight", "model.layers.0.self_attn.q_proj.bias"]:
        assert name in no_decay
    torch.optim.AdamW(groups)

def test_flops_per_token_counts_the_matmuls():
    """Against torch's own FLOP counter over forward + backward of a dense model."""
    from torch.utils.flop_counter import FlopCounterMode
    model = make_model(keep_window_size=16).train()  # the math kernel: its bmm are counted
    B, T = 2, 32
    idx = torch.randint(97, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    measured = counter.get_total_flops()
    assert abs(measured / (model.flops_per_token(T) * B * T) - 1) < 0.02
    targets = idx.clone()
    targets[:, :24] = -1  # a quarter scored: only those rows pass the output head
    with FlopCounterMode(display=False) as counter:
        model(idx, targets, scored=post_training.scored_positions(targets, bucket=1))[1].backward()
    assert abs(counter.get_total_flops() / (model.flops_per_token(T, scored=0.25) * B * T) - 1) < 0.02

def test_compile_one_layer_forward_backward():
    """The training forward with targets and scored rows compiles to one graph (fullgraph: a graph break, such as a
    boolean selection whose shape the data decides, is an error) and equals eager, gradients included."""
    model = make_model(num_hidden_layers=1).train()
    idx = torch.randint(97, (2, 16))
    targets = idx.masked_fill(torch.rand(2, 16) < 0.5, -1)
    scored = post_training.scored_positions(targets, bucket=8)
    compiled = torch.compile(model, fullgraph=True)
    _, loss = compiled(idx, targets, scored=scored)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, eager_loss = model(idx, targets, scored=scored)
    eager_loss.backward()
    assert abs(loss.item() - eager_loss.item()) <= 1e-5
    for g, p in zip(grads, model.parameters()):
        assert max_diff(g, p.grad) <= 1e-5

# -----------------------------------------------------------------------------
# bad input: one clear line each

def one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message

@pytest.fixture
def saved(tmp_path):
    make_model().save_pretrained(tmp_path)
    return tmp_path

def test_checkpoint_missing_tensor(saved):
    state = load_file(saved / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained(saved)
    one_line_error(e, "model.layers.1.mlp.up_proj.weight", "lacks")

def test_checkpoint_wrong_shape(saved):
    state = load_file(saved / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64 + 1)
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained(saved)
    one_line_error(e, "q_proj.weight", "(64, 65)", "(64, 64)")

def test_checkpoint_extra_tensor(saved):
    state = load_file(saved / "model.safetensors")
    state["model.layers.0.mlp.router_gate.weight"] = torch.zeros(8, 64)
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained(saved)
    one_line_error(e, "router_gate", "does not use")

def test_checkpoint_corrupt_or_missing_files(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained(saved)
    one_line_error(e, "model.safetensors", "corrupt")
    os.remove(saved / "model.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        Doge.from_pretrained(saved)
    one_line_error(e, "no model.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        Doge.from_pretrained(saved / "nowhere")
    one_line_error(e, "nowhere")

def test_config_of_another_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained(saved)
    one_line_error(e, "'llama'", "not 'doge'")

def test_older_variant_checkpoints_load_as_small_doges_layout(saved):
    """The older variant under current names (A and dt_proj per query head, no q/k norms) is recognised from its
    tensors (tests/test_published.py holds it equal to small-doge's code); a layout neither is a one-line error."""
    state = load_file(saved / "model.safetensors")
    older = {k: v for k, v in state.items() if "q_norm" not in k and "k_norm" not in k}
    for i in range(2):
        older[f"model.layers.{i}.self_attn.A"] = torch.zeros(4)
        older[f"model.layers.{i}.self_attn.dt_proj.weight"] = torch.zeros(4, 32)
    save_file(older, saved / "model.safetensors")
    assert Doge.from_pretrained(saved).config.mask_per_query_head
    older["model.layers.0.self_attn.dt_proj.weight"] = torch.zeros(4, 128)
    save_file(older, saved / "model.safetensors")
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained(saved)
    one_line_error(e, "dt_proj.weight", "(4, 128)")

def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        Doge.from_pretrained("SmallDoge/Doge-does-not-exist")
    one_line_error(e, "HF_HUB_OFFLINE", "SmallDoge/Doge-does-not-exist")

def test_token_out_of_vocabulary_and_too_long():
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError) as e:
        model.generate(torch.tensor([[1, 2, 97]]), 1)
    one_line_error(e, "[0, 97)", "max 97")
    with pytest.raises(ValueError) as e:
        model.generate(torch.tensor([[1, -2]]), 1)
    one_line_error(e, "min -2")
    with pytest.raises(ValueError) as e:
        model.generate(torch.tensor([[1, 2, 200]]), 2)
    one_line_error(e, "vocabulary")
    with pytest.raises(ValueError) as e:
        model(torch.zeros(1, 17, dtype=torch.long))
    one_line_error(e, "17", "max_position_embeddings 16")
    with pytest.raises(ValueError) as e:
        model.generate(torch.zeros(1, 10, dtype=torch.long), 7)
    one_line_error(e, "max_position_embeddings 16")
    longer = Doge(DogeConfig(**{**TINY, "max_position_embeddings": 32}))  # the override: a bigger config value
    assert longer(torch.zeros(1, 17, dtype=torch.long))[0].shape == (1, 17, 97)

def test_bench_runs_and_reports_every_row(capsys):
    """bench.py end to end on a tiny shape, with the reference: every row and ratio it promises is printed."""
    import bench
    bench.main(["--vocab_size=97", "--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=1",
                "--num_attention_heads=2", "--num_key_value_heads=1", "--batch_size=2", "--seq_len=16",
                "--timed_steps=1", "--dtypes=float32", "--new_tokens=4", "--prompt_len=4", "--ttft_prompt_len=8",
                "--long_tokens=136", "--rollout_batch=2", "--rollout_tokens=2", "--encode=False", "--compile=False"])
    out = capsys.readouterr().out
    for row in ["train nanodoge float32", "train transformers float32", "generate nanodoge float32",
                "generate transformers float32", "decode step (batch 1)", "rollouts nanodoge",
                "train float32: ", "generate float32: "]:
        assert row in out, row
