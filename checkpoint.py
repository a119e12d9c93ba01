"""Checkpoints: tgl's own ckpt.pt, Hugging Face folders and hub names, safetensors.

`load_model(init)` reads every script's --init as a model.GPT: a run folder (or its ckpt.pt) train.py
wrote, LoRA merged; a Hugging Face folder, its config and names translated to ours; a hub name, downloaded
once into $TGL_CACHE (~/.cache/tgl). The way back, a run as a Hugging Face folder: experiments/export.py.
"""
import json
import math
import os
import re

import numpy as np
import torch

from common import atomic_path, read_json
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
        return load_hf(init).to(device)
    try:
        return model_from_checkpoint(load_checkpoint(path)).to(device)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a tgl checkpoint ({type(e).__name__}: {e})") from None

# ----------------------------------------------------------------------------- Hugging Face files

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "EleutherAI/gpt-neo-125m",
             "EleutherAI/gpt-neo-1.3B")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (in, out)
FIELDS = "block_size vocab_size n_layer n_head n_embd n_inner layer_norm_epsilon window_size".split()
HF_NAMES = {  # GPTConfig field -> config.json field
    "gpt2": dict(zip(FIELDS[:7], FIELDS), block_size="n_positions", scale_attn="scale_attn_weights"),
    "gpt_neo": dict(zip(FIELDS, FIELDS), block_size="max_position_embeddings", n_layer="num_layers",
                    n_head="num_heads", n_embd="hidden_size", n_inner="intermediate_size")}

def read_safetensors(path) -> dict:
    """8 bytes little-endian N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the data."""
    tensors, name = {}, "header"
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")  # mapped, not read: a 3 GB file costs no 3 GB
        n = int.from_bytes(raw[:8].tobytes(), "little")
        if n > len(raw) - 8:
            raise ValueError(f"{len(raw)} bytes, header length {n}")
        header, data = json.loads(raw[8:8 + n].tobytes()), raw[8 + n:]
        header.pop("__metadata__", None)
        for name, info in header.items():
            dtype, (begin, end) = ST_DTYPES[info["dtype"]], info["data_offsets"]
            shape = [int(s) for s in info["shape"]]
            nbytes = math.prod(shape) * dtype.itemsize
            if not 0 <= begin <= end == begin + nbytes <= len(data):
                raise ValueError(f"shape {shape} does not fill data_offsets {begin}..{end}")
            tensors[name] = torch.tensor(data[begin:end]).view(dtype).reshape(shape)  # own, aligned copy
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:  # RuntimeError: a shape < 0
        raise ValueError(f"{path}: corrupt or truncated safetensors: {name}: {type(e).__name__} {e}")
    return tensors

def config_from_hf(cfg: dict) -> GPTConfig:
    names = HF_NAMES.get(cfg.get("model_type")) if isinstance(cfg, dict) else None
    if not names:
        raise ValueError("want a JSON object with model_type gpt2 or gpt_neo")
    if cfg.get("activation_function", "gelu_new") != "gelu_new" or cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("supported: gelu_new, no scale_attn_by_inverse_layer_idx")
    lacks = [names[k] for k in FIELDS[:5] if names[k] not in cfg]
    if lacks:
        raise ValueError(f"lacks {lacks[0]!r}")
    kw = {ours: cfg[hf] for ours, hf in names.items() if hf in cfg}
    if cfg["model_type"] == "gpt_neo":  # attention_types [[["global", "local"], 6]]: 6 x (global, local)
        kw.update(arch="gpt_neo", qkv_bias=False, scale_attn=False, attention_layers=[
            t for ts, repeat in cfg.get("attention_types", []) for _ in range(repeat) for t in ts])
    return GPTConfig(**kw)

def hf_to_ours(sd: dict, arch: str) -> dict:
    """transformers' parameter names and layouts -> GPT-2's names as model.GPT has them."""
    out = {}
    for key, t in sd.items():
        k = key if key == "lm_head.weight" else "transformer." + key.removeprefix("transformer.")
        if re.search(r"\.attn\.(attention\.)?(bias|masked_bias)$", k):
            continue  # old files' causal-mask buffers
        if arch == "gpt2" and k.endswith(CONV1D):
            t = t.t()  # GPT-2's Conv1D (in, out) -> nn.Linear (out, in)
        out[k.replace(".attn.attention.out_proj.", ".attn.c_proj.")] = t
    for k in [k for k in out if k.endswith(".attention.q_proj.weight")]:  # GPT-Neo: q, k, v -> one c_attn
        qkv = [k.replace(".q_proj", f".{c}_proj") for c in "qkv"]
        if all(n in out for n in qkv):
            out[k.replace("attention.q_proj", "c_attn")] = torch.cat([out.pop(n) for n in qkv])
    return out

def load_hf(name: str) -> GPT:
    """A hub name or a Hugging Face folder; every tensor's shape is checked against config.json."""
    folder = name
    if name in HUB_NAMES and not os.path.isdir(name):
        # downloaded once, resumably, beside the data sets: plumbing around the method, in experiments/
        from experiments.fetch import hub_folder
        folder = hub_folder(name)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{name}: not a folder with config.json nor one of {', '.join(HUB_NAMES)}")
    cfg = read_json(cfg_path)  # its errors name the file
    try:
        config = config_from_hf(cfg)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    for f, read in (("model.safetensors", read_safetensors), ("pytorch_model.bin", load_checkpoint)):
        path = os.path.join(folder, f)
        if os.path.exists(path):
            break
    else:
        raise ValueError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded: unsupported)")
    model, weights = GPT(config), hf_to_ours(read(path), config.arch)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights.setdefault("lm_head.weight", weights.get("transformer.wte.weight"))  # hub GPT-2 has none
    for k in [*want, *weights]:
        got, need = tuple(weights[k].shape) if k in weights else "missing", want.get(k, "none (unexpected)")
        if got != need:
            raise ValueError(f"{path}: {k} is {got}, config.json implies {need}")
    if not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"]):
        raise ValueError(f"{path}: lm_head.weight is not wte (untied: unsupported)")
    model.load_state_dict(weights)  # copy_ casts f16/bf16 to f32
    return model
