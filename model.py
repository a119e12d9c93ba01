"""The GPT: GPT-2 and GPT-Neo in one class with GPT-2's parameter names (a Hugging Face GPT-2 file maps one
to one), LoRA, the unit of every parameter, checkpoints, and Hugging Face files in (export: experiments/)."""
import json
import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import atomic_path, download, read_json

@dataclass
class GPTConfig:
    block_size: int = 1024          # longest sequence (n_positions / max_position_embeddings)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None      # MLP width; None means 4 * n_embd
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    arch: str = "gpt2"              # "gpt2" or "gpt_neo": only decides the export format
    qkv_bias: bool = True           # GPT-Neo's q/k/v projections have no bias
    scale_attn: bool = True         # GPT-Neo does not divide q.k by sqrt(head_dim)
    attention_layers: list = field(default_factory=list)  # per layer "global"/"local"; [] = all global
    window_size: int = 256          # how far back a "local" layer may look (GPT-Neo)

    def __post_init__(self):  # a shape that cannot be built is bad input (a flag, a config.json): say which
        for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(v := getattr(self, k), int) or v < 1:
                raise ValueError(f"model config: {k} must be an integer >= 1, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if len(self.attention_layers) not in (0, self.n_layer):
            raise ValueError(f"model config: {len(self.attention_layers)} attention_layers for {self.n_layer} layers")

class Linear(nn.Linear):
    """nn.Linear with an optional adapter (add_lora): y = x W^T + b + (alpha/r) x A^T B^T. It lives on the
    layer (lora_A, lora_B), so the base weight keeps its GPT-2 name and the adapters are named after it."""

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if getattr(self, "lora_A", None) is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scaling
        return y

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.n_head, self.dropout = config.n_head, config.dropout
        self.scale = None if config.scale_attn else 1.0  # None: SDPA's default 1/sqrt(head_dim)
        local = config.attention_layers and config.attention_layers[layer] == "local"
        self.window = config.window_size if local else None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        kw = dict(dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        if self.window is None or T <= self.window:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        else:  # GPT-Neo's local layer: i sees j if 0 <= i - j < window (built here: checkpoints hold weights only)
            d = torch.arange(T, device=x.device)[:, None] - torch.arange(T, device=x.device)  # (T, T): i - j
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(d >= 0) & (d < self.window), **kw)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)

class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc, self.c_proj = Linear(config.n_embd, inner), Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # GPT-2 and GPT-Neo use the tanh approximation of GELU ("gelu_new")
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # pre-LN: x + f(LN(x))
        x = x + self.resid_dropout(self.attn(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, listed once by parameters()
        for m in self.modules():  # GPT-2's init; the tied weight keeps lm_head's draw, the last
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: std 0.02 / sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy over the targets (B, T) if given.
        Target -1 = no loss at this position: that is how a salient-span loss is written."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context ({self.config.block_size})")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    @staticmethod
    def from_pretrained(name_or_path: str) -> "GPT":  # a known hub name (cached in $TGL_CACHE) or a local folder
        return load_hf(name_or_path)

# ----------------------------------------------------------------------------- LoRA, units, devices

def add_lora(model: GPT, rank: int = 8, alpha: float = 16.0, units=None):
    """Adapters on every Linear (c_attn, c_proj, c_fc; only in `units` if given); base weights frozen."""
    model.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, Linear) and (units is None or unit_of(name + ".weight") in units):
            like = dict(device=m.weight.device, dtype=m.weight.dtype)
            m.lora_A = nn.Parameter(torch.empty(rank, m.in_features, **like))
            m.lora_B = nn.Parameter(torch.zeros(m.out_features, rank, **like))  # B = 0: unchanged at start
            nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))  # as in the LoRA paper's code
            m.lora_scaling = alpha / rank
    model.lora = dict(rank=rank, alpha=alpha, units=None if units is None else sorted(units))
    return model

@torch.no_grad()
def merge_lora(model: GPT):
    for m in model.modules():
        if getattr(m, "lora_A", None) is not None:
            m.weight += (m.lora_B @ m.lora_A) * m.lora_scaling  # (out, in)
            del m.lora_A, m.lora_B
    model.lora = None
    return model

def unit_of(param_name: str) -> str:
    """embed (the tied lm_head too), h.{i}.attn, h.{i}.mlp or ln_f. ln_1 goes with attention and ln_2 with
    the MLP, as each LayerNorm feeds only that sublayer; an adapter goes with the layer it adapts."""
    parts = param_name.removeprefix("_orig_mod.").removeprefix("module.").removeprefix("transformer.").split(".")
    if parts[0] in ("wte", "wpe", "lm_head", "ln_f"):
        return "ln_f" if parts[0] == "ln_f" else "embed"
    if parts[0] == "h" and len(parts) > 2 and parts[2] in ("ln_1", "attn", "ln_2", "mlp"):
        return f"h.{parts[1]}.{'attn' if parts[2] in ('ln_1', 'attn') else 'mlp'}"
    raise ValueError(f"parameter {param_name!r} belongs to no unit")

def unit_names(n_layer: int) -> list:  # in network order
    return ["embed"] + [f"h.{i}.{s}" for i in range(n_layer) for s in ("attn", "mlp")] + ["ln_f"]

def unwrap(model) -> GPT:  # the GPT inside torch.compile (._orig_mod) and/or DDP (.module) wrappers
    for wrapper in ("_orig_mod", "module", "_orig_mod"):
        model = getattr(model, wrapper, model)
    return model

def pick_device(name: str = "auto") -> str:
    """auto: cuda, else mps, else cpu. A named device is checked now, not at the first tensor."""
    here = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(kind for kind, ok in here.items() if ok)
    try:
        ok = here.get(torch.device(name).type, True)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"--device {name}: no such device here; use auto or {', '.join(k for k in here if here[k])}")
    return name

def autocast(device: str):  # bf16 on CUDA (fast and safe there), plain fp32 elsewhere
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else nullcontext()

# ----------------------------------------------------------------------------- checkpoints
# ckpt.pt of a run: {"config": GPTConfig as a dict, "model": state_dict (adapters included),
# "lora": dict(rank, alpha, units) or None, and what train.py adds (optimizer, step, ...)}.

CKPT_NAME = "ckpt.pt"

def save_checkpoint(path, state: dict):
    with atomic_path(path) as tmp:  # a crash mid-write never leaves half a checkpoint in place of a good one
        torch.save(state, tmp)

def load_checkpoint(path) -> dict:
    try:  # weights_only: tensors and plain containers only, so a foreign file cannot run code on load
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from e

def model_from_checkpoint(ckpt: dict) -> GPT:
    model, lora = GPT(GPTConfig(**ckpt["config"])), ckpt.get("lora")
    if lora:
        add_lora(model, lora["rank"], lora["alpha"], lora["units"])
    model.load_state_dict(ckpt["model"])
    return merge_lora(model).requires_grad_(True) if lora else model

def load_model(init: str, device: str = "cpu") -> GPT:
    """Every `--init`: a run folder or its ckpt.pt (LoRA merged), a Hugging Face folder, or a hub name."""
    path = os.path.join(init, CKPT_NAME) if os.path.isdir(init) else init
    if not (os.path.isfile(path) and path.endswith(".pt")):
        return GPT.from_pretrained(init).to(device)
    ckpt = load_checkpoint(path)
    try:  # a nanoGPT or other foreign .pt loads (weights_only) but is not laid out as ours
        return model_from_checkpoint(ckpt).to(device)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a tgl checkpoint ({type(e).__name__}: {e}); "
                         "pass a tgl run folder, a Hugging Face folder or a known model name") from None

# ----------------------------------------------------------------------------- Hugging Face files

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "EleutherAI/gpt-neo-125m", "EleutherAI/gpt-neo-1.3B")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2: (in, out)
HF_NAMES = {  # GPTConfig field -> config.json field (experiments/export.py writes them too)
    "gpt2": dict(block_size="n_positions", vocab_size="vocab_size", n_layer="n_layer", n_head="n_head",
                 n_embd="n_embd", n_inner="n_inner", layer_norm_epsilon="layer_norm_epsilon",
                 scale_attn="scale_attn_weights"),
    "gpt_neo": dict(block_size="max_position_embeddings", vocab_size="vocab_size", n_layer="num_layers",
                    n_head="num_heads", n_embd="hidden_size", n_inner="intermediate_size",
                    layer_norm_epsilon="layer_norm_epsilon", window_size="window_size")}

def read_safetensors(path) -> dict:
    """{name: tensor} of a file laid out as 8 bytes little-endian N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end] from the end of the header}}, the data. Bad: a one-line ValueError."""
    def bad(why):
        return ValueError(f"{path}: corrupt or truncated safetensors file: {why}")
    size = os.path.getsize(path)
    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    raw = np.memmap(path, dtype=np.uint8, mode="r")  # paged in lazily: a 6 GB file is fine
    n = int.from_bytes(raw[:8].tobytes(), "little")
    if n > size - 8:
        raise bad(f"header says {n} bytes but only {size - 8} follow")
    try:
        header = json.loads(raw[8:8 + n].tobytes())
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise bad("header is not a JSON object") from None
    start, n_data, tensors = 8 + n, size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = ST_DTYPES[info["dtype"]], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"{name}: want dtype F32, F16 or BF16, a shape and two data_offsets, got {info}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= n_data):
            raise bad(f"{name}: data offsets {[begin, end]} lie outside the {n_data} data bytes")
        if end - begin != nbytes or min(shape, default=0) < 0:
            raise bad(f"{name}: shape {shape} of {info['dtype']} needs {nbytes} bytes, offsets give {end - begin}")
        buf = torch.from_numpy(raw[start + begin:start + end].copy())  # a copy: own, aligned memory
        tensors[name] = buf.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return tensors

def hub_endpoint() -> str:  # $HF_ENDPOINT: the variable Hugging Face users set for a mirror
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")

def hub_folder(name: str) -> str:
    """The cache folder of a hub model, filled on first use; once filled, no request is made."""
    folder = os.path.join(os.environ.get("TGL_CACHE") or os.path.expanduser("~/.cache/tgl"), name.replace("/", "--"))
    os.makedirs(folder, exist_ok=True)
    url, get = f"{hub_endpoint()}/{name}/resolve/main/", lambda f: download(url + f, os.path.join(folder, f))
    if not os.path.exists(os.path.join(folder, "config.json")):
        get("config.json")
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("model.safetensors", "pytorch_model.bin")):
        try:
            get("model.safetensors")
        except FileNotFoundError:  # some older repositories only have the pickle-format weights
            get("pytorch_model.bin")
    return folder

def config_from_hf(cfg: dict) -> GPTConfig:
    names = HF_NAMES.get(cfg.get("model_type")) if isinstance(cfg, dict) else None
    if names is None:
        raise ValueError("want a JSON object with model_type gpt2 or gpt_neo")
    if cfg.get("activation_function", "gelu_new") != "gelu_new" or cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("only gelu_new and no scale_attn_by_inverse_layer_idx are supported")
    for need in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        if names[need] not in cfg:
            raise ValueError(f"lacks the field {names[need]!r}")
    kw = {ours: cfg[hf] for ours, hf in names.items() if hf in cfg}
    if cfg["model_type"] == "gpt_neo":  # attention_types [[["global", "local"], 6]]: 6 x (global, local)
        types = cfg.get("attention_types") or [[cfg.get("attention_layers", []), 1]]
        kw.update(arch="gpt_neo", qkv_bias=False, scale_attn=False,
                  attention_layers=[t for ts, repeat in types for _ in range(repeat) for t in ts])
    return GPTConfig(**kw)

def hf_to_ours(sd: dict, arch: str) -> dict:
    out = {}
    for key, t in sd.items():
        k = key if key == "lm_head.weight" else "transformer." + key.removeprefix("transformer.")
        if re.search(r"\.attn\.(attention\.)?(bias|masked_bias)$", k):
            continue  # causal-mask buffers that old files stored
        if arch == "gpt2" and k.endswith(CONV1D):
            t = t.t()  # GPT-2's Conv1D keeps weights as (in, out); nn.Linear wants (out, in)
        out[k.replace(".attn.attention.out_proj.", ".attn.c_proj.")] = t
    for k in [k for k in out if k.endswith(".attention.q_proj.weight")]:  # GPT-Neo: q, k, v -> our one c_attn
        qkv = [k.replace(".q_proj", f".{c}_proj") for c in "qkv"]
        if all(n in out for n in qkv):  # an incomplete set stays, for load_hf to report
            out[k.replace("attention.q_proj", "c_attn")] = torch.cat([out.pop(n) for n in qkv])
    return out

def load_hf(name_or_path: str) -> GPT:
    folder = hub_folder(name_or_path) if name_or_path in HUB_NAMES and not os.path.isdir(name_or_path) else name_or_path
    if not os.path.isfile(cfg_path := os.path.join(folder, "config.json")):
        raise ValueError(f"{name_or_path}: neither a folder with config.json nor a known name ({', '.join(HUB_NAMES)})")
    try:
        config = config_from_hf(read_json(cfg_path))  # read_json's own errors name the file
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(cfg_path) else f"{cfg_path}: {e}") from None
    if os.path.exists(path := os.path.join(folder, "model.safetensors")):
        sd = read_safetensors(path)
    elif os.path.exists(path := os.path.join(folder, "pytorch_model.bin")):
        sd = load_checkpoint(path)  # weights_only, as for our own checkpoints
    else:
        raise ValueError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded files are not supported)")
    model, weights = GPT(config), hf_to_ours(sd, config.arch)
    head = weights.pop("lm_head.weight", None)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for k, shape in expected.items():  # the first mismatch in network order
        if k not in weights:
            raise ValueError(f"{path}: missing tensor {k} (config.json says {config.n_layer} layers)")
        if weights[k].shape != shape:
            raise ValueError(f"{path}: our {k} would be {tuple(weights[k].shape)}, config.json implies {tuple(shape)}")
    if unexpected := [k for k in weights if k not in expected]:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]}")
    if head is not None and not torch.equal(head, weights["transformer.wte.weight"]):
        raise ValueError(f"{path}: lm_head.weight differs from wte (untied heads are not supported)")
    model.load_state_dict(weights, strict=False)  # copy_ casts f16/bf16 to f32
    return model
