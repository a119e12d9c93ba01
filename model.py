"""The GPT: GPT-2 and GPT-Neo in one small class, with LoRA and the unit of every parameter.

Parameter names are GPT-2's own (transformer.wte, transformer.h.{i}.attn.c_attn, ...), so a
Hugging Face GPT-2 checkpoint maps one to one (GPT-Neo's names are mapped on load).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def is_local(self, layer: int) -> bool:
        return bool(self.attention_layers) and self.attention_layers[layer] == "local"


class Linear(nn.Linear):
    """nn.Linear with an optional low-rank adapter: y = x W^T + b + (alpha/r) x A^T B^T.

    The adapter lives on the layer itself (lora_A, lora_B) so the base weight keeps its
    GPT-2 name (...c_attn.weight) and LoRA parameters are named after the layer they adapt.
    """

    def add_lora(self, rank: int, alpha: float):
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as in the LoRA paper's code
        self.lora_scaling = alpha / rank  # B = 0, so the layer is unchanged at start

    def merge_lora(self):
        if getattr(self, "lora_A", None) is None:
            return
        with torch.no_grad():
            self.weight += (self.lora_B @ self.lora_A) * self.lora_scaling  # (out, in)
        del self.lora_A, self.lora_B

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if getattr(self, "lora_A", None) is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scaling
        return y


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.n_head, self.dropout = config.n_head, config.dropout
        self.scale = None if config.scale_attn else 1.0  # None: SDPA's default 1/sqrt(head_dim)
        self.window = config.window_size if config.is_local(layer) else None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        if self.window is None or T <= self.window:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.scale)
        else:
            # local attention (GPT-Neo): position i sees j with i - window < j <= i. Built per call,
            # not kept as a buffer, so checkpoints hold weights only.
            i = torch.arange(T, device=x.device)
            dist = i[:, None] - i[None, :]  # (T, T)
            mask = (dist >= 0) & (dist < self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.c_proj = Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 and GPT-Neo use the tanh approximation of GELU ("gelu_new")
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
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context ({self.config.block_size})")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            # target -1 = no loss at this position: that is how a salient-span loss is written
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- LoRA

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def add_lora(model: GPT, rank: int = 8, alpha: float = 16.0, units=None):
    """Put rank-r adapters on c_attn, attn.c_proj, c_fc, mlp.c_proj (only in `units` if given),
    and freeze every base weight: after this, only lora_A / lora_B require grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.endswith(LORA_TARGETS):
            if units is None or unit_of(name + ".weight") in units:
                module.add_lora(rank, alpha)
    model.lora = dict(rank=rank, alpha=alpha, units=None if units is None else sorted(units))
    return model


def merge_lora(model: GPT):
    """Fold every adapter into its base weight (W += scale * B A) and drop the adapters."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.merge_lora()
    model.lora = None
    return model


# ----------------------------------------------------------------------------- units

def unit_of(param_name: str) -> str:
    """The unit a parameter belongs to: embed, h.{i}.attn, h.{i}.mlp or ln_f (DESIGN.md).

    ln_1 goes with attention and ln_2 with the MLP, because each LayerNorm only feeds that sublayer;
    LoRA parameters go to the unit of the layer they adapt. The tied lm_head is part of embed.
    """
    name = param_name.removeprefix("_orig_mod.").removeprefix("module.").removeprefix("transformer.")
    parts = name.split(".")
    if parts[0] in ("wte", "wpe", "lm_head"):
        return "embed"
    if parts[0] == "ln_f":
        return "ln_f"
    if parts[0] == "h" and len(parts) > 2:
        if parts[2] in ("ln_1", "attn"):
            return f"h.{parts[1]}.attn"
        if parts[2] in ("ln_2", "mlp"):
            return f"h.{parts[1]}.mlp"
    raise ValueError(f"parameter {param_name!r} belongs to no unit")


def unit_names(n_layer: int) -> list:
    """All units in network order: embed, h.0.attn, h.0.mlp, ..., ln_f."""
    return ["embed"] + [f"h.{i}.{s}" for i in range(n_layer) for s in ("attn", "mlp")] + ["ln_f"]


# ----------------------------------------------------------------------------- devices

def pick_device(name: str = "auto") -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast(device: str):
    """bf16 autocast on CUDA (where it is fast and safe), plain fp32 elsewhere."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- checkpoints
# The one checkpoint loader. A run folder of this project holds ckpt.pt: a dict with
# "config" (GPTConfig as a dict), "model" (state_dict, LoRA adapters included), "lora"
# (dict(rank, alpha, units) or None) and whatever train.py adds (optimizer, step, rng, ...).

CKPT_NAME = "ckpt.pt"


def save_checkpoint(path, state: dict):
    """Write atomically: a temporary file next to `path`, then rename, so a crash mid-write
    never leaves a half-written checkpoint in place of the last good one."""
    import os
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """Read a checkpoint this project wrote; weights_only=True refuses anything but tensors and
    plain containers, so a foreign file cannot run code on load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable tgl checkpoint ({type(e).__name__}); re-run training or pick another file") from e


def model_from_checkpoint(ckpt: dict, merge: bool = True) -> GPT:
    """Build the GPT a checkpoint describes and load its weights (LoRA merged unless merge=False)."""
    model = GPT(GPTConfig(**ckpt["config"]))
    if ckpt.get("lora"):
        lora = ckpt["lora"]
        add_lora(model, lora["rank"], lora["alpha"], lora["units"])
        for p in model.parameters():
            p.requires_grad_(True)
    model.load_state_dict(ckpt["model"])
    if ckpt.get("lora") and merge:
        merge_lora(model)
    return model


def load_model(init: str, device: str = "cpu") -> GPT:
    """One entry point for every `--init`: a run folder (or its ckpt.pt) of this project, a local
    Hugging Face folder (config.json + model.safetensors), or a known hub name."""
    import os
    path = os.path.join(init, CKPT_NAME) if os.path.isdir(init) else init
    if os.path.isfile(path) and path.endswith(".pt"):
        model = model_from_checkpoint(load_checkpoint(path))
    else:
        model = GPT.from_pretrained(init)
    return model.to(device)
