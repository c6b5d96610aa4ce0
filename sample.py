"""
Sample from a trained Doge: stream the continuation of a prompt, or chat turn by turn with the chat template
SFT trained on. Any nanodoge checkpoint (an out dir's newest, or one file) or Hugging Face Doge (a directory or
a hub id) works; the text is decoded with the tokenizer stored with it.

    python sample.py --prompt="ROMEO:"                          # the model trained last (newest under out/)
    python sample.py --init_from=out/pt/ckpt_0001000.pt --start=FILE:prompt.txt --num_samples=3
    python sample.py --init_from=out/grpo --chat                # /reset starts over, /exit (or Ctrl-D) quits

Tokens are printed as they are made. In chat, the <think> part is dimmed (--show_think=False hides it) and
Ctrl-C stops the current answer, not the program.
"""
import os
import sys
import time

import torch

from nanodoge import checkpoint as ckpt, devices, settings
from nanodoge.engine import Engine
from nanodoge.tokenizer import SYSTEM_PROMPT, render_chat

DEFAULTS = dict(
    init_from="",  # out dir (its newest checkpoint) | ckpt file | Hugging Face dir | hub id; "" = what out/ got last
    tokenizer="",  # a Hugging Face dir's tokenizer, if it has none beside it: tokenizer.json | its dir | hub id
    prompt="",           # the text to continue, or FILE:path to read it from a file
    start="",            # nanoGPT's name for prompt (give one of the two)
    num_samples=1,
    max_new_tokens=256,
    temperature=0.8,     # 0 = greedy
    top_k=200,           # keep the top_k most likely tokens (0 = all)
    top_p=1.0,           # keep the smallest set of tokens whose probability reaches top_p (1.0 = all)
    repetition_penalty=1.0,  # > 1 discourages tokens already in the text (CTRL, arXiv 1909.05858)
    seed=1337,
    device="auto",       # auto = cuda, else mps, else cpu
    dtype="auto",        # auto | float32 | bfloat16 | float16; auto = bf16 where the device computes it natively
    compile=False,
    chat=False,          # an interactive multi-turn conversation instead of one prompt
    system=SYSTEM_PROMPT,    # the system message that opens every conversation, as in SFT ("" = none)
    show_think=True,     # chat: show the <think> part (dimmed on a terminal) or hide it
)

DIM, NORMAL = "\033[2m", "\033[0m"

# -----------------------------------------------------------------------------
# loading

def load(cfg):
    """(generation engine, tokenizer) on the chosen device and dtype, ready to generate."""
    init_from = cfg.init_from or ckpt.newest_model("out")
    if init_from is None:
        raise FileNotFoundError("nothing trained under out/ yet: train a model first (offline: python prepare_data.py, "
                                "then python train_pt.py config/doge_tiny.py) or pass --init_from=<out dir | ckpt "
                                "file | Hugging Face dir | hub id>")
    looks_local = os.path.isdir(os.path.dirname(init_from) or ".")
    if not os.path.exists(init_from) and looks_local:  # else it may be a hub id such as SmallDoge/Doge-20M
        raise FileNotFoundError(f"no checkpoint at {init_from}: train one first (python train_pt.py) or pass "
                                "--init_from=<out dir | ckpt file | Hugging Face dir | hub id>")
    device = devices.setup_distributed(cfg.device).device
    dtype, why = devices.resolve_dtype(cfg.dtype, device)
    source = init_from if cfg.init_from else f"{init_from} (the model trained last: the newest under out/)"
    print(f"sampling {source} on {device} | {why}", file=sys.stderr)
    model, tok, _ = ckpt.load_model(init_from, device, cfg.tokenizer)
    model = model.to(getattr(torch, dtype)).eval()  # weights in dtype: inference needs no fp32 master copy
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{init_from}: its tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: the checkpoint's tokenizer is not the model's")
    return Engine(model, compile=cfg.compile), tok


def read_prompt(cfg):
    """The prompt text from --prompt or --start, FILE:path read from the file; empty is an error."""
    if cfg.prompt and cfg.start:
        raise ValueError("give --prompt or --start, not both (they are the same setting)")
    text = cfg.prompt or cfg.start
    if text.startswith("FILE:"):
        path = text[len("FILE:"):]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if not text:
        raise ValueError("the prompt is empty: pass --prompt=TEXT or --start=FILE:prompt.txt (or use --chat)")
    return text

# -----------------------------------------------------------------------------
# generation, streamed

def stream_tokens(engine, prompt_ids, cfg, max_new_tokens, stop_ids=None, vocab_size=None):
    """Yield the new token ids one by one (batch 1); stops after a token of stop_ids (which is yielded). Only ids
    below vocab_size (the tokenizer's) are sampled."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=next(engine.model.parameters()).device)
    for next_ids in engine.generate_stream(idx, max_new_tokens, temperature=cfg.temperature,
                                          top_k=cfg.top_k or None, top_p=cfg.top_p, eos_token_id=stop_ids,
                                          repetition_penalty=cfg.repetition_penalty, vocab_size=vocab_size):
        yield next_ids.item()


def stream_text(tok, token_ids):
    """Yield (token id, the text it adds) per token. The line so far is decoded and its new suffix yielded,
    since a token may hold only some bytes of a character (its text is held back until the character is
    complete) and BPE pieces decoded one by one can differ from the same pieces decoded together. A finished
    line is dropped (as transformers' TextStreamer does), so a long completion costs no more per token."""
    ids, shown = [], ""
    for token in token_ids:
        ids.append(token)
        text = tok.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            yield token, ""
            continue
        yield token, text[len(shown):]
        ids, shown = ([], "") if text.endswith("\n") else (ids, text)


def complete(engine, tok, prompt, cfg, out=None):
    """Continue prompt num_samples times, printing each completion as it is made; returns the texts."""
    out = out or sys.stdout
    prompt_ids = tok.encode(prompt)
    room = engine.model.config.max_sequence_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, no room is left in the model's "
                         f"{engine.model.config.max_sequence_length}-token context: shorten it")
    completions = []
    for _ in range(cfg.num_samples):
        out.write(prompt)
        out.flush()
        pieces, start, first_token_seconds = [], time.perf_counter(), 0.0
        tokens = stream_tokens(engine, prompt_ids, cfg, min(cfg.max_new_tokens, room), [tok.eos_id], tok.vocab_size)
        for token, piece in stream_text(tok, tokens):
            first_token_seconds = first_token_seconds or time.perf_counter() - start
            if token == tok.eos_id:  # the end of a document
                break
            pieces.append(piece)
            out.write(piece)
            out.flush()
        seconds = time.perf_counter() - start
        out.write("\n---------------\n")
        out.flush()
        decode_rate = (len(pieces) - 1) / max(seconds - first_token_seconds, 1e-9)
        print(f"[{len(pieces)} tokens: the first after {first_token_seconds * 1e3:.0f} ms "
              f"(a {len(prompt_ids)}-token prompt), then {decode_rate:.1f} tokens/s]", file=sys.stderr)
        completions.append("".join(pieces))
    return completions

# -----------------------------------------------------------------------------
# chat

def answer(engine, tok, cfg, messages, out):
    """Generate the assistant's reply to messages, printing it as it is made; returns its text (without the
    end-of-turn token). Ctrl-C ends the reply early; what was said so far is kept."""
    end_of_turn = tok.end_of_turn_id  # <|im_end|>, or the chat template's own
    think_open, think_close = tok.special_id("<think>"), tok.special_id("</think>")
    prompt_ids, _ = render_chat(tok, messages, add_generation_prompt=True)  # the same renderer as SFT
    room = engine.model.config.max_sequence_length - len(prompt_ids)
    if room < 1:
        out.write("(the conversation fills the engine's context: /reset to start over)\n")
        return None
    dim = out.isatty()
    reply, thinking = [], False
    try:
        tokens = stream_tokens(engine, prompt_ids, cfg, min(cfg.max_new_tokens, room), [end_of_turn, tok.eos_id],
                               tok.vocab_size)
        for token, piece in stream_text(tok, tokens):
            if token in (end_of_turn, tok.eos_id):
                break
            reply.append(piece)
            if token == think_open:
                thinking = True
                piece = (DIM if dim else "") + piece
            if thinking and not cfg.show_think:
                piece = ""
            if token == think_close:
                thinking = False
                piece += NORMAL if dim else ""
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write((NORMAL if dim and thinking else "") + "\n")
    out.flush()
    return "".join(reply)


def chat(engine, tok, cfg, read_line=input, out=None):
    """The multi-turn loop: a line of user text per turn; /reset forgets the conversation, /exit or EOF quits."""
    out = out or sys.stdout
    opening = [dict(role="system", content=cfg.system)] if cfg.system else []
    messages = list(opening)
    out.write("chat: /reset starts a new conversation, /exit quits; Ctrl-C stops an answer\n")
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            out.write("\n")
            return messages
        except KeyboardInterrupt:
            out.write("\n(/exit or Ctrl-D quits)\n")
            continue
        text = line.strip()
        if text == "/exit":
            return messages
        if text == "/reset":
            messages = list(opening)
            out.write("(new conversation)\n")
            continue
        if not text:
            continue
        reply = answer(engine, tok, cfg, messages + [dict(role="user", content=line)], out)
        if reply is not None:
            messages += [dict(role="user", content=line), dict(role="assistant", content=reply)]


def main(argv=None):
    cfg = settings.load_config(DEFAULTS, argv)
    prompt = None if cfg.chat else read_prompt(cfg)  # a bad prompt fails before the model loads
    engine, tok = load(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.chat:
        try:
            import readline  # noqa: F401 -- importing it gives input() line editing and history
        except ImportError:  # Windows
            pass
        chat(engine, tok, cfg)
    else:
        complete(engine, tok, prompt, cfg)


if __name__ == "__main__":
    settings.run(main)
