"""engine.py: the same tokens as Doge.generate (greedy and sampled, padded batches, eos, penalties, top-k over
keys), and the fused decode step against the model's full forward."""
from types import SimpleNamespace

import pytest
import torch

from nanodoge import engine as E, post_training
import model as M
from nanodoge.engine import Engine

# the same tiny model as the parity tests: A, residuals and norms moved off their init
from test_model import make_model, max_diff  # noqa: E402

def both(model, idx, n, seed=0, stop_check_every=None, **kwargs):
    """(Doge.generate, Engine.generate, the Engine's stream) from the same RNG state."""
    engine = Engine(model)
    engine.stop_check_every = stop_check_every or engine.stop_check_every
    torch.manual_seed(seed)
    reference = model.generate(idx, n, **kwargs)
    torch.manual_seed(seed)
    fast = engine.generate(idx, n, **kwargs)
    torch.manual_seed(seed)
    streamed = list(engine.generate_stream(idx, n, **kwargs))
    return reference, fast, torch.stack(streamed, dim=1) if streamed else idx[:, :0]

@pytest.mark.parametrize("overrides", [dict(), dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
                                       dict(is_moe=True, num_experts=16, num_experts_per_tok=4)])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9),
                                      dict(temperature=0.0, repetition_penalty=3.0)])
def test_engine_generates_what_the_model_generates(overrides, sampling):
    """Left-padded prompts of unequal length, keys beyond keep_window_size (top-k over keys from step 4 on),
    a vocabulary cut to 90 ids: token for token the same."""
    model = make_model(keep_window_size=12, **overrides)
    prompts = [torch.randperm(90)[:n].tolist() for n in (3, 9, 1, 6)]
    idx, attention_mask = M.left_pad(prompts, pad_id=0)
    reference, fast, streamed = both(model, idx, 10, attention_mask=attention_mask, vocab_size=90, **sampling)
    assert torch.equal(fast, reference)
    assert torch.equal(streamed, reference[:, idx.size(1):])

@pytest.mark.parametrize("stop_check_every", [1, 3, 8])
def test_engine_stops_where_the_model_stops(stop_check_every):
    """With eos ids the rows finish at different steps; generation ends at the step the last one finishes,
    however seldom the engine reads the stop condition (every step on a CPU, every few on a GPU)."""
    model = make_model()
    idx = torch.randint(97, (3, 4))
    free = model.generate(idx, 12, temperature=0.0)
    eos = [int(free[0, 6]), int(free[1, 8]), int(free[2, 10])]  # each row stops, by step 7 at the latest
    reference, fast, streamed = both(model, idx, 12, stop_check_every=stop_check_every, temperature=0.0,
                                     eos_token_id=eos)
    assert reference.size(1) < free.size(1)
    assert torch.equal(fast, reference) and torch.equal(streamed, reference[:, 4:])

def test_completions_are_the_new_tokens_and_their_text_ends_before_the_first_stop():
    """generate_completions: Doge.generate's new tokens of left-padded prompts; completion_texts cuts each before
    its first stop token (a row that stopped early holds stop_ids[0] after it)."""
    model = make_model()
    prompts = [torch.randperm(90)[:n].tolist() for n in (3, 7)]
    idx, attention_mask = M.left_pad(prompts, pad_id=5)
    free = model.generate(idx, 12, temperature=0.0, attention_mask=attention_mask, vocab_size=90)[:, 7:]
    stop_ids = [int(free[0, 2]), int(free[1, 5])]
    completions = E.generate_completions(model, prompts, 12, 0.0, stop_ids, 90, pad_id=5)
    assert torch.equal(completions, model.generate(idx, 12, temperature=0.0, eos_token_id=stop_ids,
                                                   attention_mask=attention_mask, vocab_size=90)[:, 7:])
    before_stop = lambda row: row[:next(k for k, t in enumerate(row) if t in stop_ids)]
    assert post_training.completion_texts(SimpleNamespace(decode=list), completions, stop_ids) == \
        [before_stop(row) for row in free.tolist()]

def teacher_forced_decode(model, seq, prompt_len):
    """Logits [B, T - prompt_len + 1, vocab] for positions prompt_len - 1 on: the prompt through hidden_states,
    then each next token of seq through the engine's decode_step, the KV cache growing by one key a step."""
    cache = M.KVCache(model.config.num_hidden_layers, seq.size(1))
    weights = E.decode_weights(model)
    logits = [weights.head(model.hidden_states(seq[:, :prompt_len], cache)[0][:, -1].to(weights.dtype))]
    logits += [E.decode_step(model, seq[:, t], cache, weights) for t in range(prompt_len, seq.size(1))]
    assert cache.length == seq.size(1) and cache.dt[0].shape[-1] == seq.size(1)  # dt cached beside k and v
    return torch.stack(logits, dim=1)

@pytest.mark.parametrize("overrides", [dict(), dict(attention_bias=True, mlp_bias=True),
                                       dict(is_moe=True, num_experts=16, num_experts_per_tok=4, tie_word_embeddings=True)])
def test_decode_steps_equal_full_forward_across_keep_window_edge(overrides):
    """decode_step (fused q/k/v/dt and gate/up weights) against one full forward, top-k active from key 10
    on. Distinct tokens: the first layer's v (so dt) depends on the token alone, and top-k among tied dt
    values is arbitrary (in the reference as well)."""
    model = make_model(keep_window_size=9, **overrides)
    seq = torch.stack([torch.randperm(97)[:15] for _ in range(2)])
    with torch.no_grad():
        assert max_diff(teacher_forced_decode(model, seq, 5), model(seq)[0][:, 4:]) <= 1e-5

@pytest.mark.parametrize("onednn", [True, False])
def test_bfloat16_decode_steps_stay_near_the_full_forward(onednn, monkeypatch):
    """In bfloat16 (on a CPU with bf16 instructions through oneDNN-packed weights, else plain matmuls), cast or
    under autocast, the decode path rounds differently from a full forward but stays within bfloat16's error of
    the float32 logits. (No top-k here: a rounded dt can swap which keys survive it, a difference of another kind.)"""
    if not onednn:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = make_model()
    seq = torch.stack([torch.randperm(97)[:15] for _ in range(2)])
    with torch.no_grad():
        exact = model(seq)[0][:, 4:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = teacher_forced_decode(model, seq, 5)
        cast = teacher_forced_decode(model.to(torch.bfloat16), seq, 5)
    for logits in (autocast, cast):
        assert logits.dtype == torch.bfloat16
        assert max_diff(logits.float(), exact) <= 0.05 * exact.abs().max()
        assert (logits.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9

def test_engine_errors_are_the_models():
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model).generate(torch.tensor([[1, 2, 200]]), 2)
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        Engine(model).generate(torch.zeros(1, 10, dtype=torch.long), 7)
    idx, attention_mask = M.left_pad([[1, 2], [3]], pad_id=0)
    with pytest.raises(ValueError, match="left padding"):
        Engine(model).generate(idx, 2, attention_mask=attention_mask.flip(1))
