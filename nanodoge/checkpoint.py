"""
nanodoge checkpoints: out_dir/ckpt_<step>.pt files (weights, model shape, tokenizer, optimizer, RNG, step),
written atomically and rotated, and loading a model with its tokenizer from one of them or from a Hugging Face
directory or hub id.
"""
import dataclasses
import math
import os
import re

import torch

from nanodoge import files
from model import Doge, DogeConfig, pretrained_dir
from nanodoge.tokenizer import hf_tokenizer, load_tokenizer, model_settings, tokenizer_from_state

# A file under its final name is complete (the rename is llm.c's "done" marker); the newest keep_last
# are kept.

def checkpoint_paths(out_dir):
    """Complete checkpoints in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    names = [n for n in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d+\.pt", n)]
    return [os.path.join(out_dir, n) for n in sorted(names)]

def is_checkpoint(path):
    """A nanodoge checkpoint file, or a directory holding some."""
    return os.path.isfile(path) or bool(checkpoint_paths(path))

def save_checkpoint(out_dir, step, state, keep_last=2):
    path = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
    files.atomic_write(path, lambda tmp_path: torch.save(state, tmp_path))
    for old_path in checkpoint_paths(out_dir)[:-max(1, keep_last)]:
        os.remove(old_path)
    return path

def load_checkpoint(path):
    if os.path.isdir(path):
        paths = checkpoint_paths(path)
        if not paths:
            raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in {path}: train one first")
        path = paths[-1]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable nanodoge checkpoint ({type(e).__name__})") from None

def newest_model(root="out"):
    """The model written last under root, whichever stage wrote it: a run directory (for its newest complete
    ckpt_*.pt) or an exported Hugging Face directory (config.json + model.safetensors); None if there is none."""
    found = []  # (time written, directory)
    for directory, _, names in os.walk(root):
        for name in names:
            if re.fullmatch(r"ckpt_\d+\.pt", name) or (name == "model.safetensors" and "config.json" in names):
                found.append((os.path.getmtime(os.path.join(directory, name)), directory))
    return max(found)[1] if found else None

def load_model(init_from, device="cpu", tokenizer=""):
    """(model, tokenizer, checkpoint) from a nanodoge out dir or ckpt file (checkpoint is its dict), or
    from a Hugging Face-format directory or hub id (checkpoint is None; its tokenizer is the one beside it,
    or tokenizer: a tokenizer.json, a directory holding one, or a hub id)."""
    if is_checkpoint(init_from):
        checkpoint = load_checkpoint(init_from)
        if "tokenizer" not in checkpoint:
            raise ValueError(f"{init_from} holds no tokenizer metadata: it was not written by nanodoge")
        model = Doge(DogeConfig(**checkpoint["model_config"]))
        load_state_dict_checked(model, checkpoint["model"], init_from)
        tok = tokenizer_from_state(checkpoint["tokenizer"])
    else:
        if os.path.isdir(init_from) and not os.path.exists(os.path.join(init_from, "config.json")):
            raise FileNotFoundError(f"{init_from} holds neither ckpt_*.pt nor config.json: "
                                    "train a model first or pass init_from=<checkpoint>")
        path = pretrained_dir(init_from)  # a hub id's snapshot holds its tokenizer.json too
        model, checkpoint = Doge.from_pretrained(path), None
        tok = pretrained_tokenizer(path, model, tokenizer)
    return model.to(device), tok, checkpoint

def pretrained_tokenizer(path, model, tokenizer=""):
    """The tokenizer of the Hugging Face model in path: a nanodoge export's own (meta.json), else the
    tokenizer.json beside it or the one named, its roles fitted to the model (its vocabulary, its eos_token_id)."""
    if tokenizer and os.path.isfile(os.path.join(tokenizer, "meta.json")):
        return load_tokenizer(tokenizer)
    if not tokenizer and os.path.isfile(os.path.join(path, "meta.json")):
        return load_tokenizer(path)
    if not tokenizer and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path} has no tokenizer.json: pass --tokenizer=<a tokenizer.json, a directory "
                                "holding one, or a hub id such as SmallDoge/Doge-tokenizer>")
    return hf_tokenizer(tokenizer or path, model.config.vocab_size, model_settings(path).get("eos_id"))

def load_state_dict_checked(model, state_dict, source):
    """load_state_dict, with a shape or key mismatch said in one line (a checkpoint of another shape)."""
    expected = model.state_dict()
    for key, tensor in state_dict.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)} but this model expects "
                             f"{tuple(expected[key].shape)}: the checkpoint is of another architecture")
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not fit the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(state_dict)


# -----------------------------------------------------------------------------
# a run's model from a source model: the same, or a dense Doge grown into a CDMoE

GROWTH_KEYS = ("is_moe", "num_experts", "num_experts_per_tok")

def fit_model(model, wanted, source):
    """(model, note) for a run whose settings ask for wanted (DogeConfig fields): model itself where each equals
    its config; the CDMoE grown from it (grow_into_moe) where wanted asks for is_moe of a dense model (note
    says what was kept and what is new); any other difference is a one-line error."""
    config = dataclasses.asdict(model.config)
    grow = bool(wanted.get("is_moe")) and not config["is_moe"]
    for key, value in wanted.items():
        if config[key] != value and not (grow and key in GROWTH_KEYS):
            raise ValueError(f"{source} is a checkpoint of another shape: its {key} is {config[key]}, the config "
                             f"says {value} (only is_moe=True, growing a dense model into a CDMoE, changes a shape)")
    if not grow:
        return model, None
    return grow_into_moe(model, wanted.get("num_experts", config["num_experts"]),
                         wanted.get("num_experts_per_tok", config["num_experts_per_tok"]), source)

def grow_into_moe(dense, num_experts, num_experts_per_tok, source="the dense model"):
    """(the CDMoE, a one-line note) continuing a dense Doge, as CDMoE is built for: every dense tensor kept bit
    for bit (the MLP becomes the shared expert, under the same names), each layer's router_gate, down_embed and
    up_embed new ~ N(0, initializer_range), as small-doge's from_pretrained initialises them."""
    if num_experts < 1 or num_experts_per_tok > math.isqrt(num_experts) ** 2:
        raise ValueError(f"num_experts={num_experts} and num_experts_per_tok={num_experts_per_tok}: product-key "
                         "routing needs num_experts_per_tok <= isqrt(num_experts)^2")
    moe = Doge(dataclasses.replace(dense.config, is_moe=True, num_experts=num_experts,
                                   num_experts_per_tok=num_experts_per_tok)).to(dense.lm_head.weight.device)
    kept = dense.state_dict()
    new = sorted(moe.state_dict().keys() - kept.keys())
    missing, unexpected = moe.load_state_dict(kept, strict=False)
    assert sorted(missing) == new and not unexpected, (missing, unexpected)
    n_new = sum(moe.state_dict()[k].numel() for k in new)
    note = (f"grew {source} into a CDMoE ({num_experts:,} experts, {num_experts_per_tok} per token): kept all "
            f"{len(list(dense.parameters()))} dense tensors ({sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M "
            f"parameters, the MLP as "
            f"the shared expert); new: router_gate, down_embed, up_embed of each layer ({n_new / 1e6:.2f}M, "
            f"N(0, {dense.config.initializer_range})); a fresh optimizer and schedule")
    return moe, note
