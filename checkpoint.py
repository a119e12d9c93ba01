"""Checkpoints: tgl's own ckpt.pt, and every script's --init (`load_model`): a run folder (or its ckpt.pt)
train.py wrote, LoRA merged; a Hugging Face folder or hub name (experiments/hf.py, the way back: export.py).
"""
import os

import torch

from common import atomic_path
from model import GPT, GPTConfig, add_lora, merge_lora

# ----------------------------------------------------------------------------- tgl's own checkpoints

CKPT_NAME = "ckpt.pt"  # {"config": asdict(GPTConfig), "model": state_dict, "lora": dict | None, ...}

def save_checkpoint(path, state: dict):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk is an OSError, no C++
        torch.save(state, f)

def load_checkpoint(path, mmap=False) -> dict:
    try:  # weights_only: runs no code; mmap: tensors read only when used
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from e

def model_from_checkpoint(ckpt: dict) -> GPT:
    """A LoRA run's adapters are merged into the weights: whoever loads it gets a plain GPT."""
    model, lora = GPT(GPTConfig(**ckpt["config"])), ckpt.get("lora")
    if lora:
        add_lora(model, lora["rank"], lora["alpha"], lora["units"])
    model.load_state_dict(ckpt["model"])
    if lora:
        merge_lora(model).requires_grad_(True)  # add_lora froze the base weights
    return model

def load_model(init: str, device: str = "cpu") -> GPT:
    """Any --init: a run folder or its ckpt.pt (LoRA merged), an HF folder or a hub name."""
    path = os.path.join(init, CKPT_NAME) if os.path.isdir(init) else init
    if not (os.path.isfile(path) and path.endswith(".pt")):
        from experiments.hf import load_hf  # plumbing
        return load_hf(init).to(device)
    try:
        ckpt = load_checkpoint(path)
        if ckpt.get("sharded"):  # train.py --fsdp's
            from experiments.fsdp import read_sharded
            ckpt = read_sharded(path, ckpt)
        return model_from_checkpoint(ckpt).to(device)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a tgl checkpoint ({type(e).__name__}: {e})") from None
