"""GPT-2/GPT-Neo as one GPT with GPT-2's parameter names; LoRA, units, checkpoints, Hugging Face files."""
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
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP width; None: 4 * n_embd
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    arch: str = "gpt2"  # or "gpt_neo"; picks only the export format
    qkv_bias: bool = True  # False (GPT-Neo): no q/k/v bias
    scale_attn: bool = True  # False (GPT-Neo): no 1/sqrt(head_dim) on q.k
    attention_layers: list = field(default_factory=list)  # per layer "global"/"local"; [] = all global
    window_size: int = 256  # how far back a "local" layer looks

    def __post_init__(self):
        sizes = (self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd)
        if not (all(isinstance(v, int) and v >= 1 for v in sizes) and self.n_embd % self.n_head == 0
                and 0 <= self.dropout < 1 and len(self.attention_layers) in (0, self.n_layer)):
            raise ValueError(f"model config: want int sizes >= 1, n_embd % n_head == 0, 0 <= dropout < 1, "
                             f"0 or n_layer attention_layers; got {self}")

class Linear(nn.Linear):
    """nn.Linear + optional LoRA, y = xW^T + b + (alpha/r) xA^T B^T; W keeps its GPT-2 name."""

    def forward(self, x):
        y = super().forward(x)
        if getattr(self, "lora_A", None) is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scaling
        return y

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.n_head, self.dropout = config.n_head, config.dropout
        self.scale = None if config.scale_attn else 1.0  # None: SDPA's 1/sqrt(head_dim)
        self.window = config.window_size if "local" in config.attention_layers[layer:layer + 1] else None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        mask, p = None, self.dropout if self.training else 0.0
        if self.window is not None and T > self.window:  # GPT-Neo's local: i sees j if 0 <= i - j < window
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().triu(1 - self.window)
        y = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=mask is None, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc, self.c_proj = Linear(config.n_embd, inner), Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # "gelu_new" (GPT-2, GPT-Neo): tanh-approximated GELU
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp, self.resid_dropout = MLP(config), nn.Dropout(config.dropout)

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
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, once in parameters()
        for m in self.modules():  # GPT-2's init
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):  # residual projections
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V) and, given targets (B, T), the mean cross-entropy (-1: no loss)."""
        t, pos = self.transformer, torch.arange(idx.shape[1], device=idx.device)
        x = t.drop(t.wte(idx) + t.wpe(pos))  # (B, T, C)
        for block in t.h:
            x = block(x)
        logits = self.lm_head(t.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """idx (B, T) -> (B, T + max_new_tokens): one token at a time, each fed back in. temperature 0 (the
        default) is greedy, the same every call; > 0 samples from softmax(logits / temperature), top_k keeping
        only the k likeliest tokens. Sampling draws from `generator` (or torch's global RNG)."""
        was_training = self.training
        self.eval()  # no dropout while sampling
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]  # the model sees at most block_size tokens
            logits, _ = self(context)
            logits = logits[:, -1, :].float()  # (B, V): only the last position predicts the next token
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
        self.train(was_training)
        return idx

def add_lora(model: GPT, rank: int = 8, alpha: float = 16.0, units=None):
    """Adapters on every Linear (only in `units` if given); base weights frozen."""
    model.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, Linear) and (units is None or unit_of(name + ".weight") in units):
            m.lora_A = nn.Parameter(m.weight.new_empty(rank, m.in_features))
            m.lora_B = nn.Parameter(m.weight.new_zeros(m.out_features, rank))  # B = 0: unchanged at start
            nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))  # as in the LoRA paper's code
            m.lora_scaling = alpha / rank
    model.lora = dict(rank=rank, alpha=alpha, units=None if units is None else sorted(units))
    return model

@torch.no_grad()
def merge_lora(model: GPT):
    for m in model.modules():
        if getattr(m, "lora_A", None) is not None:
            m.weight += (m.lora_B @ m.lora_A) * m.lora_scaling
            del m.lora_A, m.lora_B
    model.lora = None
    return model

def unit_of(param_name: str) -> str:
    """embed (+ tied lm_head), h.{i}.attn, h.{i}.mlp or ln_f; ln_1/ln_2 join the sublayer they alone
    feed, an adapter the layer it adapts."""
    p = re.sub(r"^(_orig_mod\.)?(module\.)?(transformer\.)?", "", param_name).split(".")
    if p[0] in ("wte", "wpe", "lm_head", "ln_f"):
        return "ln_f" if p[0] == "ln_f" else "embed"
    if p[0] == "h" and len(p) > 2 and p[2] in ("ln_1", "attn", "ln_2", "mlp"):
        return f"h.{p[1]}.{'attn' if p[2] in ('ln_1', 'attn') else 'mlp'}"
    raise ValueError(f"parameter {param_name!r} belongs to no unit")

UNIT_RE = re.compile(r"embed|h\.(\d+)\.(attn|mlp)|ln_f")  # a unit's name, as unit_of returns it

def unit_names(n_layer: int) -> list:  # in network order
    return ["embed"] + [f"h.{i}.{s}" for i in range(n_layer) for s in ("attn", "mlp")] + ["ln_f"]

def unwrap(model) -> GPT:  # the GPT inside torch.compile/DDP
    for w in ("_orig_mod", "module", "_orig_mod"):
        model = getattr(model, w, model)
    return model

def pick_device(name: str = "auto") -> str:
    here = ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available() + ["cpu"]
    if name != "auto" and name.split(":")[0] not in here:
        raise ValueError(f"--device {name}: not here; use auto or {', '.join(here)}")
    return here[0] if name == "auto" else name

def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else nullcontext()

CKPT_NAME = "ckpt.pt"  # {"config": asdict(GPTConfig), "model": state_dict, "lora": dict | None, ...}

def save_checkpoint(path, state: dict):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)

def load_checkpoint(path) -> dict:
    try:  # weights_only: runs no code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from e

def model_from_checkpoint(ckpt: dict) -> GPT:
    model, lora = GPT(GPTConfig(**ckpt["config"])), ckpt.get("lora")
    if lora:
        add_lora(model, lora["rank"], lora["alpha"], lora["units"])
    model.load_state_dict(ckpt["model"])
    return merge_lora(model).requires_grad_(True) if lora else model

def load_model(init: str, device: str = "cpu") -> GPT:
    """Any --init: a run folder or its ckpt.pt (LoRA merged), an HF folder or a hub name."""
    path = os.path.join(init, CKPT_NAME) if os.path.isdir(init) else init
    if not (os.path.isfile(path) and path.endswith(".pt")):
        return load_hf(init).to(device)
    try:
        return model_from_checkpoint(load_checkpoint(path)).to(device)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a tgl checkpoint ({type(e).__name__}: {e})") from None

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
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        if (n := int.from_bytes(raw[:8].tobytes(), "little")) > len(raw) - 8:
            raise ValueError(f"{len(raw)} bytes, header length {n}")
        header, data = json.loads(raw[8:8 + n].tobytes()), raw[8 + n:]
        header.pop("__metadata__", None)
        for name, info in header.items():
            dtype, (begin, end) = ST_DTYPES[info["dtype"]], info["data_offsets"]
            nbytes = math.prod(shape := [int(s) for s in info["shape"]]) * dtype.itemsize
            if not 0 <= begin <= end == begin + nbytes <= len(data):
                raise ValueError(f"shape {shape} does not fill data_offsets {begin}..{end}")
            tensors[name] = torch.tensor(data[begin:end]).view(dtype).reshape(shape)  # own, aligned copy
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:  # RuntimeError: a shape < 0
        raise ValueError(f"{path}: corrupt or truncated safetensors: {name}: {type(e).__name__} {e}")
    return tensors

def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")

def hub_folder(name: str) -> str:
    cache = os.environ.get("TGL_CACHE") or os.path.expanduser("~/.cache/tgl")
    os.makedirs(folder := os.path.join(cache, name.replace("/", "--")), exist_ok=True)
    have, url = set(os.listdir(folder)), f"{hub_endpoint()}/{name}/resolve/main/"
    get = lambda f: download(url + f, os.path.join(folder, f))
    if "config.json" not in have:
        get("config.json")
    if not {"model.safetensors", "pytorch_model.bin"} & have:
        try:
            get("model.safetensors")
        except FileNotFoundError:
            get("pytorch_model.bin")
    return folder

def config_from_hf(cfg: dict) -> GPTConfig:
    if not (names := isinstance(cfg, dict) and HF_NAMES.get(cfg.get("model_type"))):
        raise ValueError("want a JSON object with model_type gpt2 or gpt_neo")
    if cfg.get("activation_function", "gelu_new") != "gelu_new" or cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("supported: gelu_new, no scale_attn_by_inverse_layer_idx")
    if lacks := [names[k] for k in FIELDS[:5] if names[k] not in cfg]:
        raise ValueError(f"lacks {lacks[0]!r}")
    kw = {ours: cfg[hf] for ours, hf in names.items() if hf in cfg}
    if cfg["model_type"] == "gpt_neo":  # attention_types [[["global", "local"], 6]]: 6 x (global, local)
        kw.update(arch="gpt_neo", qkv_bias=False, scale_attn=False, attention_layers=[
            t for ts, repeat in cfg.get("attention_types", []) for _ in range(repeat) for t in ts])
    return GPTConfig(**kw)

def hf_to_ours(sd: dict, arch: str) -> dict:
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

def load_hf(name: str) -> GPT:  # hub name or HF folder
    folder = hub_folder(name) if name in HUB_NAMES and not os.path.isdir(name) else name
    if not os.path.isfile(cfg_path := os.path.join(folder, "config.json")):
        raise ValueError(f"{name}: not a folder with config.json nor one of {', '.join(HUB_NAMES)}")
    cfg = read_json(cfg_path)  # its errors name the file
    try:
        config = config_from_hf(cfg)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    for f, read in (("model.safetensors", read_safetensors), ("pytorch_model.bin", load_checkpoint)):
        if os.path.exists(path := os.path.join(folder, f)):
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
