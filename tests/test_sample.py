"""sample.py: reproducible and correctly filtered sampling, streamed text, the chat loop and its template,
one-line errors, and the CLI driven through stdin."""
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from nanodoge import checkpoint as ckpt, tokenizer as tk
import sample
from conftest import write_bpe_tokenizer_json
from nanodoge.engine import Engine
from model import Doge, DogeConfig, apply_repetition_penalty, sample_next_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(tiny_text):
    return tk.train_sentencepiece([tiny_text[:50_000]], vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = DogeConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return Doge(config).eval()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, model, tok):
    """An out dir holding one checkpoint as the training loop writes it."""
    out_dir = tmp_path_factory.mktemp("out")
    ckpt.save_checkpoint(str(out_dir), 10, dict(model=model.state_dict(), model_config=vars(model.config),
                                                  step=10, tokenizer=tok.state(), stage="pt"))
    return str(out_dir)


def settings(**overrides):
    return SimpleNamespace(**{**sample.DEFAULTS, **overrides})


@torch.no_grad()
def greedy_by_hand(model, ids, n, penalty=1.0):
    """Greedy decoding with a full forward pass per token (no KV cache) and the penalty written out."""
    ids = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0][0, -1].clone()
        for t in set(ids):  # CTRL: divide a seen token's logit by the penalty if positive, else multiply
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        ids.append(int(logits.argmax()))
    return ids


def fake_stream(tokens):
    """A stand-in for Engine.generate_stream that yields the given tokens."""
    def generate_stream(idx, *args, **kwargs):
        for t in tokens:
            if isinstance(t, BaseException):
                raise t
            yield torch.tensor([t])
    return generate_stream


def typed(lines):
    """A stand-in for input(): the given lines, then end of input (Ctrl-D)."""
    lines = iter(lines)
    def read_line(prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line
    return read_line


class Terminal(io.StringIO):
    def isatty(self):
        return True

# -----------------------------------------------------------------------------
# sampling

def test_fixed_seed_is_reproducible(ckpt_dir, capsys):
    def run(seed):
        sample.main([f"--init_from={ckpt_dir}", "--prompt=To be", "--temperature=1.0", "--top_k=0",
                     "--max_new_tokens=24", "--num_samples=2", f"--seed={seed}"])
        return capsys.readouterr().out
    first = run(1)
    assert first.count("To be") == 2 and len(first) > 2 * len("To be") + 20
    assert run(1) == first
    assert run(2) != first


def test_temperature_zero_is_greedy(model, tok):
    prompt = tok.encode("The quick brown")
    expected = greedy_by_hand(model, prompt, 12)[len(prompt):]
    for top_k, top_p in [(200, 1.0), (2, 0.1)]:  # at temperature 0 the filters do not matter
        cfg = settings(temperature=0.0, top_k=top_k, top_p=top_p)
        assert list(sample.stream_tokens(Engine(model), prompt, cfg, 12)) == expected


def kept_tokens(probs, n=20_000, **kwargs):
    """Which tokens sample_next_token draws from a hand-made distribution, and how often (n draws)."""
    torch.manual_seed(0)
    order = torch.tensor([3, 0, 4, 1, 2])  # token ids deliberately not sorted by probability
    logits = torch.full((5,), -1.0)
    logits[order] = torch.tensor(probs).log()
    draws = sample_next_token(logits.expand(n, 5), **kwargs)
    counts = torch.bincount(draws, minlength=5).float() / n
    return {int(i) for i in draws.unique()}, counts


@pytest.mark.parametrize("kwargs, kept, renormalised", [
    (dict(top_k=2), {3, 0}, [0.5 / 0.7, 0.2 / 0.7]),
    (dict(top_k=4), {3, 0, 4, 1}, [0.5 / 0.95, 0.2 / 0.95, 0.15 / 0.95, 0.1 / 0.95]),
    (dict(top_p=0.6), {3, 0}, [0.5 / 0.7, 0.2 / 0.7]),  # 0.5 < 0.6 <= 0.5 + 0.2
    (dict(top_p=0.8), {3, 0, 4}, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85]),
    (dict(top_p=0.4), {3}, [1.0]),  # the most likely token is always kept
    (dict(top_k=2, top_p=0.9), {3, 0}, [0.5 / 0.7, 0.2 / 0.7]),
    # temperature comes first: at 0.5 the probabilities are p^2 / sum p^2 = .769, .123, .069, ...
    (dict(top_p=0.8, temperature=0.5), {3, 0}, [0.25 / 0.29, 0.04 / 0.29]),
])
def test_top_k_and_top_p_keep_exactly_the_intended_tokens(kwargs, kept, renormalised):
    probs = [0.5, 0.2, 0.15, 0.1, 0.05]
    drawn, counts = kept_tokens(probs, **{"temperature": 1.0, **kwargs})
    assert drawn == kept
    expected = torch.zeros(5)
    expected[[3, 0, 4, 1][:len(renormalised)]] = torch.tensor(renormalised)
    assert torch.allclose(counts, expected, atol=0.015)  # the kept tokens keep their relative odds


def test_repetition_penalty_formula(model, tok):
    logits = torch.tensor([[2.0, 1.5, -1.0, -2.0, 0.5]])
    seen = torch.tensor([[1, 3, 3]])
    penalised = apply_repetition_penalty(logits, seen, 2.0)
    # CTRL (arXiv 1909.05858), as transformers applies it: a seen token's logit / 2 if positive, * 2 if not
    assert penalised.tolist() == [[2.0, 0.75, -1.0, -4.0, 0.5]]
    # in generation the penalty covers the prompt and every token generated so far
    prompt = tok.encode("aaaa")  # without the penalty this model repeats one token forever
    expected = greedy_by_hand(model, prompt, 16, penalty=1.8)[len(prompt):]
    cfg = settings(temperature=0.0, repetition_penalty=1.8)
    assert list(sample.stream_tokens(Engine(model), prompt, cfg, 16)) == expected
    assert expected != greedy_by_hand(model, prompt, 16)[len(prompt):]  # the penalty changed the text

# -----------------------------------------------------------------------------
# streamed text

def test_stream_text_prints_whole_characters_once(tok):
    text = "héllo 🐶 wörld,\n\nça va? ✓\n🐶 end"  # finished lines are dropped from the decode window
    pieces = [piece for _, piece in sample.stream_text(tok, tok.encode(text))]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # a split character waits until it is complete
    assert "🐶" in pieces and "" in pieces  # the emoji's bytes come as several tokens


def test_completion_stops_at_end_of_document(model, tok, monkeypatch, capsys):
    engine = Engine(model)
    monkeypatch.setattr(engine, "generate_stream", fake_stream(tok.encode("All's well") + [tok.eos_id]))
    texts = sample.complete(engine, tok, "Prologue. ", settings(num_samples=1))
    assert texts == ["All's well"]
    assert capsys.readouterr().out == "Prologue. All's well\n---------------\n"

# -----------------------------------------------------------------------------
# chat

def test_chat_renders_the_sft_tokens(model, tok, monkeypatch):
    prompts = []
    engine = Engine(model)
    generate_stream = engine.generate_stream
    def recording_stream(idx, *args, **kwargs):
        prompts.append(idx[0].tolist())
        return generate_stream(idx, *args, **kwargs)
    monkeypatch.setattr(engine, "generate_stream", recording_stream)
    cfg = settings(temperature=0.0, max_new_tokens=6)
    messages = sample.chat(engine, tok, cfg, read_line=typed(["What is 12 + 7?", "And 3 * 4?"]), out=io.StringIO())
    system = dict(role="system", content=tk.SYSTEM_PROMPT)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[:2] == [system, dict(role="user", content="What is 12 + 7?")]
    # each turn's prompt is the SFT rendering of the conversation up to the assistant's reply
    for turn, prompt in enumerate(prompts):
        conversation = messages[:2 * turn + 3]  # ... user, assistant (as SFT sees it)
        sft_ids, sft_mask = tk.render_chat(tok, conversation)
        assert prompt == sft_ids[:len(prompt)]
        assert sft_mask[len(prompt) - 1] == 0 and sft_mask[len(prompt)] == 1  # the learned reply starts here
        assert prompt == tk.render_chat(tok, conversation[:-1], add_generation_prompt=True)[0]


def test_chat_reset_exit_and_ctrl_c(model, tok, monkeypatch):
    im_end = tok.special_id("<|im_end|>")
    replies = iter([tok.encode("first") + [im_end], tok.encode("partial") + [KeyboardInterrupt()],
                    tok.encode("third") + [im_end]])
    engine = Engine(model)
    monkeypatch.setattr(engine, "generate_stream", lambda *a, **k: fake_stream(next(replies))(*a, **k))
    lines = iter(["hi", "/reset", "tell me", "more", "/exit", "never read"])
    out = io.StringIO()
    messages = sample.chat(engine, tok, settings(system=""), read_line=lambda _: next(lines), out=out)
    # /reset dropped the first exchange; Ctrl-C ended the second answer, kept, and the loop went on
    assert messages == [dict(role="user", content="tell me"), dict(role="assistant", content="partial"),
                        dict(role="user", content="more"), dict(role="assistant", content="third")]
    text = out.getvalue()
    assert "first\n(new conversation)\npartial [stopped]\nthird\n" in text
    assert next(lines) == "never read"


@pytest.mark.parametrize("show_think", [True, False])
def test_think_part_is_dimmed_or_hidden(model, tok, monkeypatch, show_think):
    reply = "<think>7 + 5 = 12</think><answer>12</answer>"
    engine = Engine(model)
    monkeypatch.setattr(engine, "generate_stream", fake_stream(tok.encode(reply) + [tok.special_id("<|im_end|>")]))
    out = Terminal()
    history = sample.answer(engine, tok, settings(show_think=show_think), [dict(role="user", content="7+5?")], out)
    assert history == reply  # the conversation keeps the whole reply
    if show_think:
        assert out.getvalue() == f"{sample.DIM}<think>7 + 5 = 12</think>{sample.NORMAL}<answer>12</answer>\n"
    else:
        assert out.getvalue().replace(sample.NORMAL, "") == "<answer>12</answer>\n"

def test_hugging_face_directory(tmp_path, tiny_text, capsys, monkeypatch):
    """A save_pretrained directory with a tokenizer.json beside it, as SmallDoge publishes them, and a hub id."""
    write_bpe_tokenizer_json(tmp_path, tiny_text[:20_000], 400)
    hf_tok = tk.load_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    hf_model = Doge(DogeConfig(vocab_size=hf_tok.vocab_size, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128))
    hf_model.save_pretrained(str(tmp_path))
    prompt = "Thou art"
    ids = hf_tok.encode(prompt)
    reply = greedy_by_hand(hf_model, ids, 8)[len(ids):]
    reply = reply[:reply.index(hf_tok.eos_id)] if hf_tok.eos_id in reply else reply
    sample.main([f"--init_from={tmp_path}", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=8",
                 "--dtype=float32"])  # the reference's dtype: auto is bf16 on some CPUs
    assert capsys.readouterr().out == prompt + hf_tok.decode(reply) + "\n---------------\n"
    # by hub id: the snapshot (here, the same directory in place of a download) gives model and tokenizer
    import model as M
    monkeypatch.setattr(M, "download_from_hub", lambda hub_id: str(tmp_path))
    sample.main(["--init_from=SmallDoge/Doge-tiny", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=8",
                 "--dtype=float32"])
    assert capsys.readouterr().out == prompt + hf_tok.decode(reply) + "\n---------------\n"

# -----------------------------------------------------------------------------
# errors

def one_line_error(error_type, argv):
    with pytest.raises(error_type) as e:
        sample.main(argv)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_checkpoint(tmp_path, monkeypatch):
    assert "train one first" in one_line_error(FileNotFoundError, [f"--init_from={tmp_path}/nope", "--prompt=hi"])
    monkeypatch.chdir(tmp_path)  # nothing trained here: the error names the training command
    assert "config/doge_tiny.py" in one_line_error(FileNotFoundError, ["--prompt=hi"])
    os.makedirs("out/pt")  # exists but holds no checkpoint
    assert "nothing trained under out/" in one_line_error(FileNotFoundError, ["--prompt=hi"])
    # a hub id cannot be fetched offline (tests run with HF_HUB_OFFLINE=1): said at once, in one line
    assert "SmallDoge/Doge-20M" in one_line_error(ValueError, ["--init_from=SmallDoge/Doge-20M", "--prompt=hi"])


def test_checkpoint_without_tokenizer(tmp_path, model):
    ckpt.save_checkpoint(str(tmp_path), 1, dict(model=model.state_dict(), model_config=vars(model.config)))
    assert "tokenizer" in one_line_error(ValueError, [f"--init_from={tmp_path}", "--prompt=hi"])


def test_empty_prompt(tmp_path, ckpt_dir):
    assert "empty" in one_line_error(ValueError, [f"--init_from={ckpt_dir}", "--prompt="])
    assert "empty" in one_line_error(ValueError, [f"--init_from={ckpt_dir}"])
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in one_line_error(ValueError, [f"--init_from={ckpt_dir}", f"--start=FILE:{tmp_path}/empty.txt"])
    assert "does not exist" in one_line_error(FileNotFoundError, [f"--init_from={ckpt_dir}", "--start=FILE:nope"])

# -----------------------------------------------------------------------------
# the command line, through stdin (no terminal needed)

def run_cli(args, stdin=""):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_cli_chat_through_stdin(ckpt_dir, model, tok):
    result = run_cli([f"--init_from={ckpt_dir}", "--chat", "--temperature=0", "--max_new_tokens=8", "--dtype=float32"],
                     stdin="To be or not\n/reset\nwhat light\n/exit\n")
    assert result.returncode == 0, result.stderr
    expected = []
    for line in ["To be or not", "what light"]:  # /reset: each reply sees only its own question
        prompt, _ = tk.render_chat(tok, [dict(role="system", content=tk.SYSTEM_PROMPT),
                                         dict(role="user", content=line)], add_generation_prompt=True)
        reply = greedy_by_hand(model, prompt, 8)[len(prompt):]
        stops = [tok.special_id("<|im_end|>"), tok.eos_id]
        expected.append(tok.decode(reply[:next((i for i, t in enumerate(reply) if t in stops), 8)]))
    assert f"> {expected[0]}\n> (new conversation)\n> {expected[1]}\n> " in result.stdout
    assert "\033[" not in result.stdout  # no terminal escapes into a pipe


def test_cli_error_is_one_line(tmp_path):
    result = run_cli([f"--init_from={tmp_path}/missing", "--prompt", "hello"])
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no checkpoint at ")


def test_default_samples_the_model_trained_last(tmp_path, monkeypatch, model, tok, capsys):
    """No --init_from: the newest complete checkpoint or exported Hugging Face directory under out/, whichever
    stage wrote it, said on the first line. A checkpoint being written (a temporary name) does not count."""
    monkeypatch.chdir(tmp_path)
    ckpt.save_checkpoint("out/pt", 10, dict(model=model.state_dict(), model_config=vars(model.config), step=10,
                                           tokenizer=tok.state(), stage="pt"))
    other = Doge(model.config)  # another model, exported later by another stage
    other.save_pretrained("out/sft/hf")
    tok.save("out/sft/hf")
    os.utime("out/sft/hf/model.safetensors", (2e9, 2e9))
    open("out/pt/ckpt_0000020.pt.tmp123", "wb").close()
    cfg = ["--prompt=To be", "--temperature=0", "--max_new_tokens=6", "--num_samples=1"]
    sample.main(cfg)
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0].startswith("sampling out/sft/hf (the model trained last")
    expected = sample.main(["--init_from=out/sft/hf", *cfg]) or capsys.readouterr().out
    assert captured.out == expected
    os.utime("out/pt/ckpt_0000010.pt", (3e9, 3e9))  # now the pre-training checkpoint is the newest
    sample.main(cfg)
    assert capsys.readouterr().err.splitlines()[0].startswith("sampling out/pt (the model trained last")
