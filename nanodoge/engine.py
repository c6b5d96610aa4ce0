"""
Fast generation for a Doge: the tokens of Doge.generate (tests/test_engine.py holds them equal), sooner.

    engine = Engine(model)
    out = engine.generate(idx, max_new_tokens=64, temperature=0.0)      # [B, T + n], as model.generate
    for next_ids in engine.generate_stream(idx, 64):                   # [B] a step, as they are made
        ...

The prompt goes through the model's own layers (Doge.hidden_states, with the KV cache). Every later step is
one new position per row, where a small model's time goes to the number of ops and to reading the weights,
not to arithmetic. So a decode step here runs the same layer math on weights prepared once per generate call,
in the compute dtype (autocast's when it is on: no step casts them again) and fused where one matmul can do
the work of several: q, k, v and dt_proj(v_proj(.)) are one matrix, gate and up another, the q and k norms
one. What else is chosen for the device it runs on:
- the output head, read in full every step: on a CPU in float32, a transposed copy (x @ W^T on a contiguous
  W^T: F.linear's batch-1 matrix-vector product reads the [vocab, C] head several times slower); on a CPU with
  bf16 instructions (AVX-512 BF16, AMX) in bfloat16, oneDNN's blocked layout (what torch.compile's freezing
  does); elsewhere F.linear;
- the stop check: a CPU reads "has every row finished?" every step for free; a GPU would stall on it, so
  there it is read every STOP_CHECK_EVERY steps and the steps past the end are dropped.
bench.py has a row for each (README, "Speed").
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nanodoge import devices
from model import KVCache, apply_rope, attention_with_bias, check_generation, dynamic_mask, eos_tensor, \
    left_pad, next_tokens, rms_norm

STOP_CHECK_EVERY = 8  # decode steps between two host reads of the stop condition, on a GPU

def fast_linear(weight, bias=None, packed=True):
    """x -> x @ weight^T + bias for the decode step's few rows, in the layout that is fastest on weight's device.
    packed=False leaves out oneDNN's blocked bf16 layout: torch.compile cannot trace its op (inductor raised an
    InductorError on it), and packs bf16 weights for oneDNN itself."""
    if packed and weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and devices.cpu_has_native_bf16():
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # oneDNN's blocked layout, once
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")
    if weight.device.type == "cpu":
        weight_t = weight.t().contiguous()
        return lambda x: x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)
    return lambda x: F.linear(x, weight, bias)

def decode_weights(model, vocab_size=None, packed=True):
    """The weights of decode_step, once per generate call: in the compute dtype, fused, the head cut to the
    tokenizer's vocab_size rows (packed: fast_linear's)."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    # stacked, in dtype; one tensor already in dtype is used as it is (the head: no copy of it per call)
    cast = lambda *tensors: (torch.cat(tensors) if len(tensors) > 1 else tensors[0]).to(dtype)

    def linear(*pairs):  # one fast_linear for the stacked outputs of (weight, bias) pairs
        biases = [b for _, b in pairs if b is not None]
        return fast_linear(cast(*(w for w, _ in pairs)), cast(*biases) if biases else None, packed)

    c = model.config
    H, G, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    layers = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        # dt_proj(v_proj(x)) = x (W_dt W_v)^T + (W_dt b_v + b_dt): dt's input is one more output block
        v_to_dt = (a.dt_proj.weight @ a.v_proj.weight,
                   None if a.dt_proj.bias is None else a.dt_proj.weight @ a.v_proj.bias + a.dt_proj.bias)
        layers.append(SimpleNamespace(
            norm_1=cast(layer.input_layernorm.weight), residual_1=cast(layer.input_residual),
            qkv_dt=linear(*((m.weight, m.bias) for m in (a.q_proj, a.k_proj, a.v_proj)), v_to_dt),
            o=linear((a.o_proj.weight, a.o_proj.bias)), A=cast(a.A),
            qk_norm=None if c.mask_per_query_head else cast(a.q_norm.weight.expand(H, D), a.k_norm.weight.expand(G, D)),
            norm_2=cast(layer.post_attention_layernorm.weight), residual_2=cast(layer.post_attention_residual),
            gate_up=None if model.config.is_moe else linear((mlp.gate_proj.weight, mlp.gate_proj.bias),
                                                            (mlp.up_proj.weight, mlp.up_proj.bias)),
            down=None if model.config.is_moe else linear((mlp.down_proj.weight, mlp.down_proj.bias))))
    return SimpleNamespace(dtype=dtype, layers=layers, norm=cast(model.model.norm.weight),
                           head=fast_linear(cast(model.lm_head.weight[:vocab_size]), packed=packed))

def decode_step(model, ids, cache, w):
    """Logits [B, vocab] of the next token after ids [B] (one new position per row): the layers of
    Doge.hidden_states for T = 1 (DogeAttention.forward, the decoder layer), on the fused weights w."""
    c, B = model.config, ids.size(0)
    H, G, D, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    cos, sin = model.rope(cache.length, 1)  # [1, D]
    x = model.model.embed_tokens(ids).to(w.dtype)  # [B, C]: the rows looked up, not a copy of the table
    for i, (layer, lw) in enumerate(zip(model.model.layers, w.layers)):
        qk, v, dt = lw.qkv_dt(rms_norm(x, lw.norm_1, eps)).split([(H + G) * D, G * D, c.mask_heads], dim=-1)
        qk = qk.view(B, H + G, D) if lw.qk_norm is None else rms_norm(qk.view(B, H + G, D), lw.qk_norm, eps)
        qk = apply_rope(qk, cos, sin)  # q and k heads together
        dt = torch.exp(lw.A * F.softplus(dt)).to(w.dtype)  # [B, G] (or [B, H])
        k, v, dt = cache.update(i, qk[:, H:, None], v.view(B, G, 1, D), dt[:, :, None])
        y = attention_with_bias(qk[:, :H, None], k, v, dynamic_mask(dt, 1, c.keep_window_size), 0.0)
        x = torch.addcmul(lw.o(y.view(B, H * D)), x, lw.residual_1)  # residual_1 * x + attention
        h = rms_norm(x, lw.norm_2, eps)
        if lw.gate_up is None:  # MoE: the module itself, on a length-1 sequence
            h = layer.mlp(h[:, None])[0][:, 0]
        else:
            gate, up = lw.gate_up(h).chunk(2, dim=-1)
            h = lw.down(F.silu(gate) * up)
        x = torch.addcmul(h, x, lw.residual_2)
    cache.length += 1
    return w.head(rms_norm(x, w.norm, eps))

class Engine:
    def __init__(self, model, compile=False):
        """compile: torch.compile the decode step (a minute's compile on a CPU, for long generations), on plain
        weights (decode_weights(packed=False)) on every CPU kind."""
        self.model, self.compiled = model, compile
        self.decode_step = torch.compile(decode_step, dynamic=True) if compile else decode_step
        self.stop_check_every = 1 if model.lm_head.weight.device.type == "cpu" else STOP_CHECK_EVERY

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                        repetition_penalty=1.0, attention_mask=None, vocab_size=None):
        """Yield the next token of every row ([B]) up to max_new_tokens times: Doge.generate's tokens (same
        arguments), one step at a time."""
        model = self.model
        padding = check_generation(model, idx, max_new_tokens, attention_mask)
        eos_ids = eos_tensor(eos_token_id, idx.device)
        cache = KVCache(model.config.num_hidden_layers, idx.size(1) + max_new_tokens, padding)
        seen = idx if padding is None else torch.where(padding, idx[:, -1:], idx)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        pending, w, next_ids = [], None, None  # pending: steps since the last stop check, (ids, all finished)
        for step in range(max_new_tokens):
            if step == 0:  # the prompt, every position at once, through the model's own layers
                x = model.hidden_states(idx, cache)[0][:, -1]
                logits = F.linear(x, model.lm_head.weight[:vocab_size])
            else:
                w = w or decode_weights(model, vocab_size, packed=not self.compiled)  # after the first token
                logits = self.decode_step(model, next_ids[:, 0], cache, w)
            next_ids, finished = next_tokens(logits, seen, finished, eos_ids, temperature, top_k, top_p,
                                             repetition_penalty)
            pending.append((next_ids[:, 0], finished.all() if len(eos_ids) else None))
            if repetition_penalty != 1.0:
                seen = torch.cat((seen, next_ids), dim=1)
            if len(pending) == self.stop_check_every or step == max_new_tokens - 1:
                all_done = [False] * len(pending) if not len(eos_ids) else \
                    torch.stack([done for _, done in pending]).tolist()  # one host read for these steps
                for (ids, _), done in zip(pending, all_done):
                    yield ids
                    if done:
                        return
                pending = []

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 repetition_penalty=1.0, attention_mask=None, vocab_size=None):
        """idx [B, T] -> [B, T + n]: Doge.generate's result."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                        repetition_penalty, attention_mask, vocab_size))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

def generate_completions(model, prompts, max_new_tokens, temperature, stop_ids, vocab_size, pad_id):
    """The new tokens [B, n] after each prompt (token lists of any lengths, left-padded with pad_id into one
    batch), of ids below vocab_size (the tokenizer's), each row ending at its first token of stop_ids: a row that
    stopped before the others holds stop_ids[0] after its stop."""
    idx, attention_mask = left_pad(prompts, pad_id, model.lm_head.weight.device)
    out = Engine(model).generate(idx, max_new_tokens, temperature=temperature, eos_token_id=stop_ids,
                                 attention_mask=attention_mask, vocab_size=vocab_size)
    return out[:, idx.size(1):]
