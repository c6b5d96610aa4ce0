"""
nanodoge checkpoints: out_dir/ckpt_<step>.pt files (weights, model shape, tokenizer, optimizer, RNG, step),
written atomically and rotated, and loading a model with its tokenizer from one of them or from a Hugging Face
directory or hub id.
"""
import os
import re

import torch

import common
from model import Doge, DogeConfig, pretrained_dir
from tokenizer import load_tokenizer, tokenizer_from_state

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
    common.atomic_write(path, lambda tmp_path: torch.save(state, tmp_path))
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

def load_model(init_from, device="cpu"):
    """(model, tokenizer, checkpoint) from a nanodoge out dir or ckpt file (checkpoint is its dict), or
    from a Hugging Face-format directory or hub id (checkpoint is None)."""
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
        tok = load_tokenizer(path)
    return model.to(device), tok, checkpoint

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

