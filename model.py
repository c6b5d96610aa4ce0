"""
The whole Doge architecture (SmallDoge, arXiv 2412.11834) in one file, numerically equal to transformers'
DogeForCausalLM: RMSNorm, RoPE, dynamic mask attention, gated MLP or cross-domain MoE, learnable residuals,
KV-cached generation, and Hugging Face checkpoint load/save. Parameter names are the reference's, so a
state_dict is a Hugging Face checkpoint as it is. Shapes: B batch, T query length, S key length, C hidden,
H query heads, G key/value heads, D head dim. Fast generation for each device lives in nanodoge/engine.py.
"""
import os
import re
import json
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------
# configuration

@dataclass
class DogeConfig:
    """Field names and defaults are those of transformers' DogeConfig (Doge-320M style)."""
    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    num_attention_heads: int = 8
    num_key_value_heads: int = None  # None: as many as query heads (MHA)
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_bias: bool = False
    mlp_bias: bool = False
    keep_window_size: int = 2048  # dynamic masking (top-k over keys) only for key lengths above this
    is_moe: bool = False
    num_experts: int = 16384
    num_experts_per_tok: int = 64
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int = None
    bos_token_id: int = None
    eos_token_id: int = None
    # {"rope_type": "dynamic", "factor": f, ...} as in the published config.json (None: plain RoPE); see rope_cos_sin
    rope_scaling: dict = None
    # the layout of small-doge's own modeling code (the -Instruct checkpoints): no q/k norms, A and dt_proj per
    # query head, so each query head has its own dynamic mask
    mask_per_query_head: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, num_attention_heads {self.num_attention_heads} and "
                             f"num_key_value_heads {self.num_key_value_heads} must divide each other in that order")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: Doge uses 'silu'")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def mask_heads(self):
        """Heads of the dynamic mask (of A and dt_proj): kv heads, or query heads in small-doge's layout."""
        return self.num_attention_heads if self.mask_per_query_head else self.num_key_value_heads

    @property
    def max_sequence_length(self):
        """The longest sequence the model takes: max_position_embeddings, factor times it with dynamic NTK RoPE."""
        factor = self.rope_scaling["factor"] if self.rope_scaling else 1
        return int(self.max_position_embeddings * factor)

    def length_limit(self):
        """max_sequence_length in words, for errors."""
        if not self.rope_scaling:
            return f"max_position_embeddings {self.max_position_embeddings}"
        return (f"{self.max_sequence_length} positions (max_position_embeddings {self.max_position_embeddings} x "
                f"the dynamic RoPE factor {self.rope_scaling['factor']:g})")

    def to_hf_dict(self):
        """config.json as transformers writes it for DogeForCausalLM."""
        skip = {"rope_theta", "rope_scaling"} | ({"mask_per_query_head"} if not self.mask_per_query_head else set())
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        rope = self.rope_scaling or {"rope_type": "default"}
        d.update(architectures=["DogeForCausalLM"], model_type="doge", dtype="float32", use_cache=True,
                 sliding_window=None, output_router_logits=False,
                 rope_parameters={**rope, "rope_theta": float(self.rope_theta)})
        return dict(sorted(d.items()))

    @classmethod
    def from_hf_dict(cls, d, source):
        """A DogeConfig from a Hugging Face config.json dict; what nanodoge cannot compute is an error."""
        if d.get("model_type") != "doge":
            raise ValueError(f"{source} is a config of model_type {d.get('model_type')!r}, not 'doge'")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        try:
            rope_scaling = check_rope_scaling({k: v for k, v in rope.items() if k != "rope_theta"} or None)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        if d.get("sliding_window") is not None:
            raise ValueError(f"{source}: sliding_window attention is not supported")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        values["rope_scaling"] = rope_scaling
        if isinstance(values.get("eos_token_id"), list):  # generation takes a list; the config keeps the first
            values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else None
        return cls(**values)

def check_rope_scaling(rope):
    """The rope block of a config (transformers' rope_type, or the legacy type), normalised: None for plain RoPE,
    {"rope_type": "dynamic", "factor": f, ...} for dynamic NTK; any other type is an error."""
    if not rope:
        return None
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", None))
    if rope_type == "default":
        return None
    if rope_type != "dynamic":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default' and 'dynamic')")
    if not isinstance(rope.get("factor"), (int, float)) or rope["factor"] < 1:
        raise ValueError(f"dynamic RoPE needs a factor >= 1, got {rope.get('factor')!r}")
    return {"rope_type": "dynamic", **rope, "factor": float(rope["factor"])}

# -----------------------------------------------------------------------------
# building blocks

def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps), computed in float32, times weight, in x's dtype (under autocast: the
    compute dtype, so q and k, and the KV cache that holds k, stay in it)."""
    return (weight * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)).to(x.dtype)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

def rope_cos_sin(config, start, end):
    """RoPE tables [end - start, D] of positions start..end-1: angle position * base^(-2i/D), duplicated to D.
    base is theta, except with dynamic NTK RoPE for a sequence of L = end > max_position_embeddings positions
    (transformers' _compute_dynamic_ntk_parameters, in float32 as there): every position of it is rotated with
    base = theta * (factor * L / max_position_embeddings - (factor - 1)) ^ (D / (D - 2)), which stretches the
    slowest frequencies over the longer sequence."""
    D, L_max = config.head_dim, config.max_position_embeddings
    base = torch.tensor(config.rope_theta, dtype=torch.float)
    if config.rope_scaling and end > L_max:
        factor = config.rope_scaling["factor"]
        base = base * ((factor * torch.tensor(end) / L_max) - (factor - 1)) ** (D / (D - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    angles = torch.arange(start, end, dtype=torch.float)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """Rotate x [..., T, D] by position (the rotate-half convention: pairs are (i, i + D/2))."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

def dynamic_mask(dt, T, keep_window_size):
    """The additive attention bias [B, G, T, S] of dynamic mask attention from each key's value dt [B, G, S]:
    every query row gets the same per-key bias, causal positions get the dtype's minimum, and when there are
    more than keep_window_size keys only each row's keep_window_size largest entries survive."""
    S = dt.size(-1)
    bias = dt[:, :, None, :].expand(-1, -1, T, -1)
    lowest = torch.finfo(dt.dtype).min
    if T > 1:  # the T new queries sit at the end: query i sees keys up to S - T + i
        causal = torch.ones(T, S, dtype=torch.bool, device=dt.device).tril(diagonal=S - T)
        bias = bias.masked_fill(~causal, lowest)
    if S > keep_window_size:
        top = bias.topk(keep_window_size, dim=-1, sorted=False).indices
        keep = torch.zeros_like(bias, dtype=torch.bool).scatter(-1, top, True)
        bias = bias.masked_fill(~keep, lowest)
    return bias

def repeat_kv(x, n):
    """[B, G, ...] -> [B, G * n, ...]: each kv head once for each of the n query heads it serves (query head h
    uses kv head h // n). Done by hand rather than SDPA's enable_gqa, which GPU kernels with a mask refuse."""
    return x if n == 1 else x.repeat_interleave(n, dim=1)

def attention_with_bias(q, k, v, bias, dropout_p):
    """softmax(q k^T / sqrt(D) + bias) v with GQA: q [B,H,T,D], k and v [B,G,S,D], bias [B,G,T,S] (one per kv
    head) or [B,H,T,S] (one per query head, small-doge's layout)."""
    B, H, T, D = q.shape
    G = k.size(1)
    bias = bias.to(q.dtype)
    if T == 1:  # a decode step: the H/G query heads of a kv group are H/G query rows under the group's bias
        bias = bias.reshape(B, G, H // G, -1) if bias.size(1) == H else bias  # or each row under its own
        y = F.scaled_dot_product_attention(q.view(B, G, H // G, D), k, v, attn_mask=bias, dropout_p=dropout_p)
        return y.view(B, H, 1, D)
    n = H // G
    return F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n),
                                          attn_mask=repeat_kv(bias, H // bias.size(1)), dropout_p=dropout_p)

# The folded head size: one coordinate for dt, padded so that the head size stays a multiple of 8, which the
# GPU's flash, cuDNN and memory-efficient kernels require (else SDPA falls back to the T x T math kernel).
FOLD = 8

def causal_attention_folded(q, k, v, dt, dropout_p):
    """attention_with_bias for a full causal sequence without top-k (S = T <= keep_window_size), equal to it
    (tests/test_model.py holds them equal) but with no T x T mask. The dynamic mask is one bias per key, the same
    for every query, so it is an extra key coordinate: [q, 1] . [k, dt * sqrt(D)] / sqrt(D) = q.k / sqrt(D) + dt.
    SDPA then runs with is_causal=True on a fused kernel, gradient to dt included. dt [B, G, S], or [B, H, S]
    with a mask per query head: then every query head gets its own copy of its kv head's keys."""
    B, H, T, D = q.shape
    if dt.size(1) != k.size(1):
        k, v = repeat_kv(k, H // k.size(1)), repeat_kv(v, H // v.size(1))
    n = H // k.size(1)
    one = torch.zeros(FOLD, dtype=q.dtype, device=q.device)
    one[0] = 1
    q = torch.cat((q, one.expand(B, H, T, FOLD)), dim=-1)                        # [B, H, T, D + FOLD]
    k = torch.cat((k, F.pad((dt.to(k.dtype) * math.sqrt(D))[..., None], (0, FOLD - 1))), dim=-1)
    v = F.pad(v, (0, FOLD))  # SDPA wants one head size for q, k and v; the zero columns are sliced off below
    y = F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), dropout_p=dropout_p, is_causal=True,
                                       scale=D ** -0.5)
    return y[..., :D]

class KVCache:
    """Keys, values and each key's dynamic-mask value dt for every layer, preallocated for max_len positions
    in the dtype they are computed in, so a decode step computes dt_proj for its new key only. padding [B, T]
    marks the left pads of a batch of prompts of unequal length: their dt is set to PAD_BIAS once, so no query
    ever attends to them."""
    def __init__(self, num_layers, max_len, padding=None):
        self.max_len, self.length, self.padding = max_len, 0, padding
        self.k, self.v, self.dt = [None] * num_layers, [None] * num_layers, [None] * num_layers

    def update(self, layer, k, v, dt):
        """Append k, v [B,G,T,D] and dt [B,G,T] (or [B,H,T]) at self.length; return everything so far."""
        if self.k[layer] is None:
            B, G, _, D = k.shape
            self.k[layer] = k.new_empty(B, G, self.max_len, D)
            self.v[layer] = v.new_empty(B, G, self.max_len, D)
            self.dt[layer] = dt.new_empty(B, dt.size(1), self.max_len)
        start, end = self.length, self.length + k.size(2)
        if self.padding is not None and start == 0:
            dt = dt.masked_fill(self.padding[:, None, :end], PAD_BIAS)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self.dt[layer][:, :, start:end] = dt
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], self.dt[layer][:, :, :end]

# The bias of a pad key: the most negative float16, finite in every dtype, so softmax gives it weight 0 and a
# query that sees only pads (a pad itself) gets a uniform average instead of NaN.
PAD_BIAS = -65504.0

# -----------------------------------------------------------------------------
# attention, MLP and MoE, the decoder layer

class DogeAttention(nn.Module):
    """Dynamic mask attention: GQA whose additive mask comes from the keys' values,
    dt = exp(A * softplus(dt_proj(v))) per key and kv head. In small-doge's layout (mask_per_query_head) dt is
    per key and query head and q, k are not normalised: the one difference between the two."""
    def __init__(self, config, layer_idx):
        super().__init__()
        H, G, D, M = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.mask_heads
        self.layer_idx, self.head_dim = layer_idx, D
        self.keep_window_size, self.attention_dropout = config.keep_window_size, config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, G * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, G * D, bias=config.attention_bias)
        self.A = nn.Parameter(torch.zeros(M))  # zeros: dt = 1 for every key, a neutral mask at init
        self.dt_proj = nn.Linear(G * D, M, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, config.hidden_size, bias=config.attention_bias)
        norm = (lambda: nn.Identity()) if config.mask_per_query_head else (lambda: RMSNorm(D, config.rms_norm_eps))
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # [B, G, T, D]
        v = self.v_proj(x)                                                             # [B, T, G*D]
        dt = torch.exp(self.A * F.softplus(self.dt_proj(v))).to(v.dtype).transpose(1, 2)  # [B, G or H, T]
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)                           # [B, G, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v, dt = cache.update(self.layer_idx, k, v, dt)  # now S = cached + T keys
        dropout_p = self.attention_dropout if self.training else 0.0
        if k.size(2) == T and T <= self.keep_window_size and (cache is None or cache.padding is None):
            y = causal_attention_folded(q, k, v, dt, dropout_p)
        else:
            y = attention_with_bias(q, k, v, dynamic_mask(dt, T, self.keep_window_size), dropout_p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                        # [B, T, C]

class DogeMLP(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class DogeCDMoE(DogeMLP):
    """Cross-domain MoE: the gated MLP as a shared expert plus num_experts one-neuron experts
    (down_embed[e], up_embed[e]) chosen by product-key routing. Each token is routed from its own router
    output (the reference's reshape mixes tokens in a full forward; equal to it token by token)."""
    def __init__(self, config):
        super().__init__(config)
        self.num_keys = math.isqrt(config.num_experts)
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.router_gate = nn.Linear(config.hidden_size, 2 * self.num_keys, bias=False)
        self.down_embed = nn.Embedding(config.num_experts, config.hidden_size)
        self.up_embed = nn.Embedding(config.num_experts, config.hidden_size)

    def forward(self, x):
        B, T, C = x.shape
        K = self.num_keys
        router_logits = self.router_gate(x).view(B * T, 2, K)  # two halves: scores of the row and column keys
        (scores, keys) = router_logits.topk(K, dim=-1)
        # product keys: candidate (i, j) scores s_x[i] + s_y[j] and is expert i * K + j
        all_scores = (scores[:, 0, :, None] + scores[:, 1, None, :]).view(B * T, K * K)
        all_experts = (keys[:, 0, :, None] * K + keys[:, 1, None, :]).view(B * T, K * K)
        scores, position = all_scores.topk(self.top_k, dim=-1)
        experts = all_experts.gather(-1, position)
        weights = F.softmax(scores, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = x.reshape(B * T, C, 1)
        expert_act = F.silu(torch.bmm(self.down_embed(experts), flat).squeeze(-1)) * weights  # [B*T, top_k]
        routed = torch.bmm(expert_act[:, None, :], self.up_embed(experts)).view(B, T, C)
        return super().forward(x) + routed, router_logits

def load_balancing_loss(router_logits, top_k):
    """Switch Transformer eq. 4-6 over product-key experts, all layers together:
    num_experts * sum_e (fraction of top-k assignments to e) * (mean routing probability of e).
    router_logits: a list of [N, 2, K] per layer."""
    logits = torch.cat(router_logits)
    K = logits.size(-1)
    all_scores = (logits[:, 0, :, None] + logits[:, 1, None, :]).flatten(1)  # [L*N, K*K], expert i*K + j
    chosen = all_scores.topk(top_k, dim=-1).indices.flatten()
    # counts per expert with a shape fixed by K (bincount's depends on the largest id: a host read, a graph break)
    counts = torch.zeros(K * K, dtype=logits.dtype, device=logits.device).scatter_add_(
        0, chosen, torch.ones_like(chosen, dtype=logits.dtype))
    tokens_per_expert = counts / chosen.numel()
    prob_per_expert = F.softmax(all_scores, dim=-1).mean(0)
    return K * K * (tokens_per_expert * prob_per_expert).sum()

class DogeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DogeAttention(config, layer_idx)
        self.input_residual = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DogeCDMoE(config) if config.is_moe else DogeMLP(config)
        self.post_attention_residual = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x, cos, sin, cache, router_logits):
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache)
        x = self.input_residual * x + F.dropout(h, self.hidden_dropout, self.training)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, logits = h
            router_logits.append(logits)
        return self.post_attention_residual * x + F.dropout(h, self.hidden_dropout, self.training)

# -----------------------------------------------------------------------------
# sampling: what Doge.generate and engine.Engine share

def check_generation(model, idx, max_new_tokens, attention_mask):
    """One-line errors for a prompt that cannot be generated from; returns its padding mask [B, T] (or None)."""
    model.check_input(idx)
    T = idx.size(1)
    if T + max_new_tokens > model.config.max_sequence_length:
        raise ValueError(f"prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds "
                         f"{model.config.length_limit()}: ask for fewer tokens or shorten the prompt")
    if attention_mask is None or attention_mask.all():
        return None
    padding = attention_mask == 0
    if (padding[:, 1:] & ~padding[:, :-1]).any() or padding[:, -1].any():
        raise ValueError("attention_mask must be left padding: zeros before the ones of each row")
    return padding

def eos_tensor(eos_token_id, device):
    """None, an id or a list of ids -> a LongTensor of ids (maybe empty)."""
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)

def next_tokens(logits, seen, finished, eos_ids, temperature, top_k, top_p, repetition_penalty):
    """(next ids [B, 1], finished [B]) from the next-token logits [B, V]: sampled after the repetition penalty
    on the ids seen so far; rows already finished get the first eos id again."""
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    next_ids = sample_next_token(logits, temperature, top_k, top_p)
    if len(eos_ids):
        next_ids = torch.where(finished, eos_ids[0], next_ids)
        finished = finished | torch.isin(next_ids, eos_ids)
    return next_ids[:, None], finished

def left_pad(prompts, pad_id, device="cpu"):
    """Token lists of unequal length -> (idx [B, T], attention_mask [B, T]) for generate: each row right-aligned
    behind pad_id tokens (any id in the vocabulary), the mask 0 on those pads."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    return idx, attention_mask

def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty, as transformers applies it: logits of tokens already in the sequence are divided by
    penalty when positive, multiplied when negative."""
    score = logits.gather(1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)

def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row from logits [B, V]: greedy at temperature 0, else softmax(logits / temperature)
    restricted to the top_k most likely tokens and to the smallest set whose probability reaches top_p."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)

# -----------------------------------------------------------------------------
# the model

class Doge(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id),
            layers=nn.ModuleList(DogeDecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cos_sin(config, 0, config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """Linear and embedding weights ~ N(0, initializer_range), biases 0 (norms, residuals: ones; A: zeros,
        as constructed)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def rope(self, start, T):
        """cos, sin [T, D] of positions start..start+T-1: the tables, or past max_position_embeddings the dynamic
        NTK ones for a sequence ending at start + T. A KV-cached generation past it thus rotates the prompt with the
        base of its own length and each new token with the base of the length so far, keys kept as cached: what
        transformers' generate computes from a fresh model (its rotary module keeps the largest base it has seen
        until a call within max_position_embeddings resets it; that state is not imitated here)."""
        if start + T <= self.rope_cos.size(0):
            return self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        cos, sin = rope_cos_sin(self.config, start, start + T)
        return cos.to(self.rope_cos.device), sin.to(self.rope_cos.device)

    def check_length(self, idx):
        """A one-line error for a sequence longer than the model takes (its shape alone: no value is read)."""
        if idx.size(1) > self.config.max_sequence_length:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than {self.config.length_limit()}: "
                             "shorten it or build the model with a larger max_position_embeddings")

    def check_input(self, idx):
        """One-line errors for a prompt that would otherwise fail deep inside (or, on a GPU, asynchronously).
        Generation checks its prompt with it; training data is checked once per token file, against the largest
        id the file records, not on every forward (the value check reads the ids back to the host)."""
        self.check_length(idx)
        V = self.config.vocab_size
        if idx.numel() and ((idx < 0) | (idx >= V)).any():
            raise ValueError(f"token ids must lie in [0, {V}) (the vocabulary); got min {idx.min().item()}, "
                             f"max {idx.max().item()}: is the tokenizer the model's?")

    def hidden_states(self, idx, cache=None):
        """Final-norm hidden states [B, T, C] of idx [B, T] (the positions after the cache's, if one is given)
        and the MoE router logits of every layer."""
        start = cache.length if cache is not None else 0
        T = idx.size(1)
        cos, sin = self.rope(start, T)  # [T, D]
        x = self.model.embed_tokens(idx)                                             # [B, T, C]
        router_logits = []
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, router_logits)
        if cache is not None:
            cache.length += T
        return self.model.norm(x), router_logits

    def forward(self, idx, targets=None, cross_entropy=None, scored=None):
        """Without targets: logits [B, T, vocab] for every position. With targets [B, T] (-1 = ignore): the mean
        cross-entropy over the positions whose target is not -1 (plus router_aux_loss_coef times the
        load-balancing loss for MoE), and the logits the head computed, [N, vocab] in row-major order. The head is
        a small model's costliest layer, and fine-tuning scores only the replies: scored [N] (flat indices into
        the B x T positions, made on the host with the batch: post_training.scored_positions) runs it on
        those rows only; None
        runs it on every position. No shape here depends on the data's values, and no value is read back to the
        host: the step compiles to one graph and the GPU never waits. cross_entropy(logits [N, V], targets [N],
        -1 ignored): the loss function, F.cross_entropy by default; the training loop may pass an equal, faster
        one."""
        self.check_length(idx)
        x, router_logits = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        x, targets = x.flatten(0, 1), targets.flatten()                              # [B*T, C], [B*T]
        if scored is not None:
            x, targets = x.index_select(0, scored), targets.index_select(0, scored)  # [N, C], [N]
        logits = self.lm_head(x)                                                     # [N, vocab]
        cross_entropy = cross_entropy or (lambda logits, targets: F.cross_entropy(logits.float(), targets,
                                                                                  ignore_index=-1))
        loss = cross_entropy(logits, targets)
        if router_logits:
            loss = loss + self.config.router_aux_loss_coef * load_balancing_loss(
                router_logits, self.config.num_experts_per_tok)
        return logits, loss

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 repetition_penalty=1.0, attention_mask=None, vocab_size=None):
        """idx [B, T] -> [B, T + n], n <= max_new_tokens, with a KV cache: the prompt in one pass, then one
        position a step through the same layers. temperature 0 is greedy. Prompts of unequal length come
        left-padded, with attention_mask [B, T] 0 on the pads (left_pad makes both): RoPE scores depend on
        relative positions only, so a row's shift by its pads changes nothing once the pads are masked. A row
        that produced an eos id continues with (the first) eos id; generation stops once every row has.
        vocab_size: sample only ids below it (a tokenizer smaller than the model's padded vocabulary).
        engine.Engine generates the same tokens faster."""
        padding = check_generation(self, idx, max_new_tokens, attention_mask)
        eos_ids = eos_tensor(eos_token_id, idx.device)
        cache = KVCache(self.config.num_hidden_layers, idx.size(1) + max_new_tokens, padding)
        seen = idx if padding is None else torch.where(padding, idx[:, -1:], idx)  # a pad counts as already seen
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        new_ids, next_ids = [], idx
        for _ in range(max_new_tokens):
            x, _ = self.hidden_states(next_ids, cache)
            logits = self.lm_head(x[:, -1])[:, :vocab_size]  # [B, vocab]: only the last position's
            next_ids, finished = next_tokens(logits, seen, finished, eos_ids, temperature, top_k, top_p,
                                             repetition_penalty)
            new_ids.append(next_ids)
            if len(eos_ids) and finished.all():
                break
            seen = torch.cat((seen, next_ids), dim=1) if repetition_penalty != 1.0 else seen
        return torch.cat([idx] + new_ids, dim=1)

    # -------------------------------------------------------------------------
    # training helpers

    def param_groups(self, weight_decay):
        """AdamW groups: decay on matrices and embeddings; none on norms, residual vectors, A and biases."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]

    def flops_per_token(self, seq_len, scored=1.0):
        """Training FLOPs (forward + backward = 3x forward) per token, PaLM-style: 2 FLOPs per weight used in a
        matmul, plus q.k and p.v over the full seq_len (the causal half is not discounted). scored: the fraction
        of tokens that are targets (only they pass the output head)."""
        c = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul_params -= (1 - scored) * self.lm_head.weight.numel()
        if c.is_moe:  # each token uses top_k rows of down_embed and of up_embed
            matmul_params += c.num_hidden_layers * 2 * c.num_experts_per_tok * c.hidden_size
        attention = c.num_hidden_layers * 2 * c.num_attention_heads * c.head_dim * seq_len
        return 3 * 2 * (matmul_params + attention)

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path_or_hub_id):
        """A Doge from a Hugging Face-format directory (config.json + model.safetensors, a sharded index, or
        pytorch_model.bin) or a hub id."""
        path = pretrained_dir(path_or_hub_id)
        config_file = os.path.join(path, "config.json")
        if not os.path.exists(config_file):
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face-format checkpoint")
        try:
            with open(config_file) as f:
                config_dict = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON ({e})") from None
        config = DogeConfig.from_hf_dict(config_dict, config_file)
        state = rename_early_keys(read_checkpoint_tensors(path), path)
        A = state.get("model.layers.0.self_attn.A")
        if A is not None and "model.layers.0.self_attn.q_norm.weight" not in state and \
                A.numel() == config.num_attention_heads:  # small-doge's layout, known by its tensors
            config = replace(config, mask_per_query_head=True)
        model = cls(config)
        model.load_hf_state_dict(state, path)
        return model

    def load_hf_state_dict(self, state, source):
        """Load tensors named as in transformers; any mismatch is a one-line error, never a half-loaded model."""
        state = {k: v for k, v in state.items() if "rotary_emb." not in k}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = {k: v for k, v in self.state_dict().items()
                    if not (self.config.tie_word_embeddings and k == "lm_head.weight")}
        for k, v in state.items():
            if k in expected and v.shape != expected[k].shape:
                raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)} but config.json implies "
                                 f"{tuple(expected[k].shape)}")
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing:
            raise ValueError(f"{source} lacks {len(missing)} tensors this config needs, e.g. {missing[0]}")
        if unexpected:
            raise ValueError(f"{source} has {len(unexpected)} tensors this config does not use, e.g. {unexpected[0]}")
        self.load_state_dict(state, strict=not self.config.tie_word_embeddings)

    def save_pretrained(self, out_dir):
        """config.json + model.safetensors that transformers' DogeForCausalLM.from_pretrained loads."""
        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not (self.config.tie_word_embeddings and k == "lm_head.weight")}
        # each file written under a temporary name, then renamed: a crash leaves the previous file whole
        weights, config = os.path.join(out_dir, "model.safetensors"), os.path.join(out_dir, "config.json")
        save_file(state, weights + ".tmp", metadata={"format": "pt"})
        with open(config + ".tmp", "w") as f:
            f.write(json.dumps(self.config.to_hf_dict(), indent=2))
        os.replace(weights + ".tmp", weights)
        os.replace(config + ".tmp", config)

# The first published layout's names (to spring 2025), as small-doge's converter renames them; the tensors are
# those of small-doge's layout (A and dt_proj per query head, no q/k norms)
EARLY_NAMES = [(r"^model\.word_embed\.", "model.embed_tokens."), (r"^model\.final_layernorm\.", "model.norm."),
               (r"\.pre_layernorm\.", ".input_layernorm."), (r"\.pre_residual\.weight$", ".input_residual"),
               (r"\.post_layernorm\.", ".post_attention_layernorm."),
               (r"\.post_residual\.weight$", ".post_attention_residual"),
               (r"\.feed_forward\.(gate_proj|up_proj|down_proj|router_gate|down_embed|up_embed)\.weight$",
                r".mlp.\1.weight")]

def rename_early_keys(state, source):
    """state with the early names renamed to today's; a tensor no rename maps is a one-line error."""
    renamed = {}
    for key, tensor in state.items():
        for pattern, name in EARLY_NAMES:
            key = re.sub(pattern, name, key)
        if ".feed_forward." in key:  # the March-2025 MoE: queries_proj and keys, a router of another form
            raise ValueError(f"{source}: {key} cannot be mapped: the early MoE's router (feed_forward.queries_proj, "
                             "keys, router biases) is not today's product-key router_gate")
        renamed[key] = tensor
    return renamed

def pretrained_dir(path_or_hub_id):
    """The local directory of a Hugging Face-format checkpoint: the path itself, or a hub id's snapshot."""
    path = str(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{path} is not a checkpoint directory (config.json + model.safetensors) "
                                "nor a hub id like SmallDoge/Doge-20M")
    return download_from_hub(path)

def download_from_hub(hub_id):
    """Local snapshot directory of a hub id (config and weights only); one line when it cannot be had."""
    from huggingface_hub import snapshot_download
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as e:
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}"
        raise ValueError(f"cannot get {hub_id} from the Hugging Face Hub ({why}): download it where the Hub is "
                         "reachable and pass its directory") from None

def read_checkpoint_tensors(path):
    """All tensors of a checkpoint directory: model.safetensors, a sharded *.index.json, or pytorch_model.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = os.path.join(path, index_name)
        if os.path.exists(index_file):
            with open(index_file) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            break
    else:
        shards = [name for name in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, name))][:1]
    if not shards:
        raise FileNotFoundError(f"{path} has no model.safetensors, pytorch_model.bin or sharded index")
    state = {}
    for shard in shards:
        file = os.path.join(path, shard)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} is listed in the checkpoint's index but missing")
        try:
            state.update(load_file(file) if file.endswith(".safetensors") else
                         torch.load(file, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ValueError(f"cannot read {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                             "(corrupt or truncated?)") from None
    return state
