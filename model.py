"""The GPT: GPT-2 and GPT-Neo in one small class, with LoRA and the unit of every parameter.

Parameter names are GPT-2's own (transformer.wte, transformer.h.{i}.attn.c_attn, ...), so a
Hugging Face GPT-2 checkpoint maps one to one (GPT-Neo's names are mapped on load).
"""
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

from common import atomic_path, download, read_json, write_text
one_line = lambda e: " ".join(str(e).split())  # noqa: E731  (temporary)


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

    def __post_init__(self):
        """A shape that cannot be built is bad input (a flag or a config.json), not a bug: say which."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model config: width n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.attention_layers and len(self.attention_layers) != self.n_layer:
            raise ValueError(f"model config: {len(self.attention_layers)} attention_layers for {self.n_layer} layers")

    def is_local(self, layer: int) -> bool:
        return bool(self.attention_layers) and self.attention_layers[layer] == "local"


class Linear(nn.Linear):
    """nn.Linear with an optional low-rank adapter: y = x W^T + b + (alpha/r) x A^T B^T.

    The adapter lives on the layer itself (lora_A, lora_B) so the base weight keeps its
    GPT-2 name (...c_attn.weight) and LoRA parameters are named after the layer they adapt.
    """

    def add_lora(self, rank: int, alpha: float):
        like = dict(device=self.weight.device, dtype=self.weight.dtype)  # e.g. a bf16 base gets bf16 adapters
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
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

    def forward(self, x, pos=None, mask=None):
        """x (B, T, C). Plain causal attention by default; probe.py packs several answers after one
        prompt and passes `mask` (B, T, T), True where i may attend to j, and positions `pos` (B, T)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        if mask is None and (self.window is None or T <= self.window):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.scale)
        else:
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
            if self.window is not None:
                # local attention (GPT-Neo): i sees j only if pos_i - pos_j < window. Built per call,
                # not kept as a buffer, so checkpoints hold weights only.
                p = torch.arange(T, device=x.device) if pos is None else pos  # (T,) or (B, T)
                mask = mask & ((p[..., :, None] - p[..., None, :]) < self.window)
            if mask.dim() == 3:
                mask = mask[:, None]  # (B, 1, T, T): the same for every head
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

    def forward(self, x, pos=None, mask=None):  # pre-LN: x + f(LN(x))
        x = x + self.resid_dropout(self.attn(self.ln_1(x), pos, mask))
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

    def hidden(self, idx, pos=None, mask=None):
        """Final hidden states (B, T, C). `pos` (B, T) and `mask` (B, T, T) are for packed rows
        (probe.py); by default positions are 0..T-1 and attention is causal."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context ({self.config.block_size})")
        if pos is None:
            pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, None if mask is None else pos, mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        x = self.hidden(idx)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            # target -1 = no loss at this position: that is how a salient-span loss is written
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "GPT":
        """A known hub name (downloaded once into $TGL_CACHE) or a local Hugging Face folder."""
        return load_hf(name_or_path)

    def save_pretrained(self, folder):
        """config.json + model.safetensors that transformers loads (LoRA merged, model untouched)."""
        save_hf(self, folder)


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
    """The unit a parameter belongs to: embed, h.{i}.attn, h.{i}.mlp or ln_f.

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


def unwrap(model) -> "GPT":
    """The GPT inside a torch.compile'd (._orig_mod) and/or DDP (.module) wrapper; the GPT itself otherwise."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def unit_names(n_layer: int) -> list:
    """All units in network order: embed, h.0.attn, h.0.mlp, ..., ln_f."""
    return ["embed"] + [f"h.{i}.{s}" for i in range(n_layer) for s in ("attn", "mlp")] + ["ln_f"]


# ----------------------------------------------------------------------------- devices

def pick_device(name: str = "auto") -> str:
    """auto: cuda, else mps, else cpu. A named device must exist here (checked now, not at the first tensor)."""
    if name != "auto":
        try:
            kind = torch.device(name).type
        except RuntimeError:
            raise ValueError(f"--device {name!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch build sees no CUDA GPU; use --device cpu or install a CUDA torch")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
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
    """Atomic, so a crash mid-write never replaces the last good checkpoint with half of one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
    path = os.path.join(init, CKPT_NAME) if os.path.isdir(init) else init
    if os.path.isfile(path) and path.endswith(".pt"):
        ckpt = load_checkpoint(path)
        try:  # a nanoGPT or other foreign .pt loads (weights_only) but is not laid out as ours
            model = model_from_checkpoint(ckpt)
        except (KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise ValueError(f"{path}: not a tgl checkpoint ({type(e).__name__}: {one_line(e)}); "
                             "pass a tgl run folder, a Hugging Face folder or a known model name") from None
    else:
        model = GPT.from_pretrained(init)
    return model.to(device)


# ----------------------------------------------------------------------------- safetensors
# The format: 8 bytes little-endian N, N bytes of JSON {name: {"dtype", "shape", "data_offsets":
# [begin, end]}, "__metadata__": {...}}, then the raw bytes (offsets count from the end of the header).

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path) -> dict:
    """{name: tensor}; a corrupt or truncated file raises ValueError saying what is wrong, in one line."""
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
            raise bad(f"{name}: dtype must be F32, F16 or BF16 with a shape and two data_offsets, got {info}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= n_data):
            raise bad(f"{name}: data offsets {[begin, end]} lie outside the {n_data} data bytes")
        if end - begin != nbytes or min(shape, default=0) < 0:
            raise bad(f"{name}: shape {shape} of {info['dtype']} needs {nbytes} bytes, offsets give {end - begin}")
        buf = torch.from_numpy(raw[start + begin:start + end].copy())  # a copy: own, aligned memory
        tensors[name] = buf.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)  # bf16 via torch
    return tensors


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Write atomically (tmp file, then rename). Tensors must be F32, F16 or BF16."""
    names = {v: k for k, v in ST_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written (F32, F16, BF16 only)")
        t = t.detach().cpu().contiguous()
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(blobs[-1])])
        offset += len(blobs[-1])
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so that the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        f.writelines(blobs)


# ----------------------------------------------------------------------------- Hugging Face checkpoints

def hub_endpoint() -> str:
    """The hub: $HF_ENDPOINT (the variable Hugging Face users set for mirrors), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "EleutherAI/gpt-neo-125m", "EleutherAI/gpt-neo-1.3B")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2 stores (in, out)


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
    """GPTConfig from a Hugging Face config.json (GPT-2 or GPT-Neo field names)."""
    kind, g = cfg.get("model_type"), cfg.get
    if g("activation_function", "gelu_new") != "gelu_new" or g("scale_attn_by_inverse_layer_idx"):
        raise ValueError("config.json: only gelu_new and no scale_attn_by_inverse_layer_idx are supported")
    try:
        if kind == "gpt2":
            return GPTConfig(block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                             n_head=cfg["n_head"], n_embd=cfg["n_embd"], n_inner=g("n_inner"),
                             layer_norm_epsilon=g("layer_norm_epsilon", 1e-5), scale_attn=g("scale_attn_weights", True))
        if kind == "gpt_neo":
            layers = cfg["attention_layers"] if "attention_types" not in cfg else [  # [[["global", "local"], 12]]
                t for types, repeat in cfg["attention_types"] for _ in range(repeat) for t in types]
            if len(layers) != cfg["num_layers"]:
                raise ValueError(f"config.json: {len(layers)} attention types for {cfg['num_layers']} layers")
            return GPTConfig(block_size=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"],
                             n_layer=cfg["num_layers"], n_head=cfg["num_heads"], n_embd=cfg["hidden_size"],
                             n_inner=g("intermediate_size"), layer_norm_epsilon=g("layer_norm_epsilon", 1e-5),
                             arch="gpt_neo", qkv_bias=False, scale_attn=False, attention_layers=list(layers),
                             window_size=g("window_size", 256))
    except KeyError as e:
        raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None
    raise ValueError(f"config.json: model_type {kind!r} is not supported (gpt2 or gpt_neo)")


def hf_to_ours(sd: dict, arch: str) -> dict:
    """Rename (and transpose / concatenate) a Hugging Face state dict into our names.
    Returns {our name: (tensor, name in the file)}, so that errors name what the file holds."""
    out, qkv = {}, {}
    for key, t in sd.items():
        k = key if key == "lm_head.weight" else "transformer." + key.removeprefix("transformer.")
        if re.search(r"\.attn\.(attention\.)?(bias|masked_bias)$", k):
            continue  # causal-mask buffers that old files stored; we build masks per call
        if arch == "gpt2" and k.endswith(CONV1D):
            t = t.t()  # GPT-2's Conv1D keeps weights as (in, out); nn.Linear wants (out, in)
        m = re.fullmatch(r"(transformer\.h\.\d+\.attn)\.attention\.([qkv])_proj\.weight", k)
        if arch == "gpt_neo" and m:
            qkv.setdefault(m[1], {})[m[2]] = (t, key)
            continue
        out[k.replace(".attn.attention.out_proj.", ".attn.c_proj.")] = (t, key)
    for prefix, parts in qkv.items():  # GPT-Neo's separate q, k, v -> our one c_attn (q, k, v stacked)
        if set(parts) == {"q", "k", "v"}:
            out[prefix + ".c_attn.weight"] = (torch.cat([parts[c][0] for c in "qkv"]), parts["q"][1])
        else:  # incomplete: left under their own names for the key check to report
            out.update({f"{prefix}.attention.{c}_proj.weight": v for c, v in parts.items()})
    return out


def load_hf(name_or_path: str) -> GPT:
    folder = name_or_path if os.path.isdir(name_or_path) else None
    if folder is None and name_or_path in HUB_NAMES:
        folder = hub_folder(name_or_path)
    if folder is None or not os.path.exists(os.path.join(folder, "config.json")):
        raise ValueError(f"{name_or_path}: neither a folder with config.json nor a known name ({', '.join(HUB_NAMES)})")
    try:
        config = config_from_hf(read_json(os.path.join(folder, "config.json")))
    except ValueError as e:
        msg = one_line(e)
        if not msg.startswith(folder):  # name the file: "FOLDER/config.json: ..."
            msg = os.path.join(folder, msg) if msg.startswith("config.json") else f"{folder}/config.json: {msg}"
        raise ValueError(msg) from None
    path = os.path.join(folder, "model.safetensors")
    if os.path.exists(path):
        sd = read_safetensors(path)
    elif os.path.exists(path := os.path.join(folder, "pytorch_model.bin")):
        try:  # weights_only: tensors and plain containers only, no code runs on load
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable weights file ({type(e).__name__})") from None
    else:
        raise ValueError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded files are not supported)")
    weights, model = hf_to_ours(sd, config.arch), GPT(config)
    head = weights.pop("lm_head.weight", None)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for k, shape in expected.items():  # the first mismatch in network order
        if k not in weights:
            raise ValueError(f"{path}: missing tensor {k} (config.json says {config.n_layer} layers)")
        if weights[k][0].shape != shape:
            raise ValueError(f"{path}: {weights[k][1]} has shape {tuple(sd[weights[k][1]].shape)}, "
                             f"config.json implies {tuple(shape)} for our {k}")
    for k, (_, key) in weights.items():
        if k not in expected:
            raise ValueError(f"{path}: unexpected tensor {key}")
    if head is not None and not torch.equal(head[0], weights["transformer.wte.weight"][0]):
        raise ValueError(f"{path}: lm_head.weight differs from wte (untied heads are not supported)")
    model.load_state_dict({k: t for k, (t, _) in weights.items()}, strict=False)  # copy_ casts f16/bf16 to f32
    return model


def save_hf(model: GPT, folder):
    """config.json + model.safetensors, laid out as current transformers writes them."""
    c = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight" and ".lora_" not in k}
    for name, m in model.named_modules():  # merged copies: the live model keeps its adapters
        if isinstance(m, Linear) and getattr(m, "lora_A", None) is not None:
            sd[name + ".weight"] = (m.weight + (m.lora_B @ m.lora_A) * m.lora_scaling).detach()
    layers = ["local" if c.is_local(i) else "global" for i in range(c.n_layer)]
    if c.arch == "gpt2" and c.qkv_bias and "local" not in layers:
        sd = {k: v.t() if k.endswith(CONV1D) else v for k, v in sd.items()}
        cfg = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=c.block_size, n_embd=c.n_embd,
                   n_layer=c.n_layer, n_head=c.n_head, n_inner=c.n_inner, scale_attn_weights=c.scale_attn,
                   attn_pdrop=c.dropout, embd_pdrop=c.dropout, resid_pdrop=c.dropout)
    elif c.arch == "gpt_neo" and not c.qkv_bias and not c.scale_attn:
        for i in range(c.n_layer):
            p = f"transformer.h.{i}.attn."
            for part, t in zip("qkv", sd.pop(p + "c_attn.weight").split(c.n_embd)):
                sd[f"{p}attention.{part}_proj.weight"] = t
            for kind in ("weight", "bias"):
                sd[f"{p}attention.out_proj.{kind}"] = sd.pop(f"{p}c_proj.{kind}")
        cfg = dict(architectures=["GPTNeoForCausalLM"], model_type="gpt_neo", max_position_embeddings=c.block_size,
                   hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head, intermediate_size=c.n_inner,
                   attention_types=[[layers, 1]], window_size=c.window_size,
                   embed_dropout=c.dropout, attention_dropout=c.dropout, resid_dropout=c.dropout)
    else:
        raise ValueError(f"no Hugging Face model matches arch={c.arch}, qkv_bias={c.qkv_bias}, "
                         f"scale_attn={c.scale_attn}, attention_layers={c.attention_layers}")
    cfg.update(vocab_size=c.vocab_size, layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new",
               tie_word_embeddings=True, dtype=str(model.transformer.wte.weight.dtype).removeprefix("torch."))
    # the GPT-2 BPE's <|endoftext|> is 50256; another vocabulary must say "none", or transformers
    # fills in GPT-2's default ids, which lie outside it
    eot = 50256 if c.vocab_size == 50257 else None
    cfg.update(bos_token_id=eot, eos_token_id=eot)
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), sd, metadata={"format": "pt"})
    write_text(os.path.join(folder, "config.json"), json.dumps(cfg, indent=2))
