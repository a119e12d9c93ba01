"""Hugging Face files <-> model.GPT: config.json, parameter names and layouts, safetensors, per family.

One table serves both ways: loading (checkpoint.load_model's --init FOLDER or hub name, via load_hf) and
export (experiments/export.py, via to_hf). Families: gpt2, gpt_neo, gpt_neox (Pythia), llama (Llama 3.x,
SmolLM2) and qwen2 (Qwen2.5); any other model_type, or an option model.py does not implement, is refused
in one line naming it, never loaded approximately (docs/models.md).

A folder holds config.json and model.safetensors, or model.safetensors.index.json and its shards (read one
shard at a time: each parameter is filled as soon as its pieces are in, so the peak is the model plus about
one shard), or an old pytorch_model.bin. A hub name (ORG/NAME, or one of HUB_NAMES) is downloaded once into
$TGL_CACHE by experiments.fetch.hub_folder, with the tokenizer files the repository has.
"""
import json
import math
import os
import re
from dataclasses import asdict, replace

import numpy as np
import torch

from checkpoint import load_checkpoint
from common import read_json
from model import GPT, GPTConfig

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "EleutherAI/gpt-neo-125m",
             "EleutherAI/gpt-neo-1.3B")  # bare names known without an ORG/; any ORG/NAME is a hub name too
INDEX = "model.safetensors.index.json"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (in, out)
FIELDS = "block_size vocab_size n_layer n_head n_embd n_inner layer_norm_epsilon window_size".split()
_ROTARY = dict(block_size="max_position_embeddings", vocab_size="vocab_size", n_layer="num_hidden_layers",
               n_head="num_attention_heads", n_embd="hidden_size", n_inner="intermediate_size",
               tie_embeddings="tie_word_embeddings")
HF_NAMES = {  # GPTConfig field -> config.json field
    "gpt2": dict(zip(FIELDS[:7], FIELDS), block_size="n_positions", scale_attn="scale_attn_weights",
                 tie_embeddings="tie_word_embeddings"),
    "gpt_neo": dict(zip(FIELDS, FIELDS), block_size="max_position_embeddings", n_layer="num_layers",
                    n_head="num_heads", n_embd="hidden_size", n_inner="intermediate_size",
                    tie_embeddings="tie_word_embeddings"),
    "gpt_neox": dict(_ROTARY, layer_norm_epsilon="layer_norm_eps", parallel_residual="use_parallel_residual"),
    "llama": dict(_ROTARY, layer_norm_epsilon="rms_norm_eps", n_kv_head="num_key_value_heads"),
}
HF_NAMES["qwen2"] = HF_NAMES["llama"]
FAMILY = {  # what config.json does not say: the family's fixed design (and its defaults)
    "gpt2": dict(), "gpt_neo": dict(qkv_bias=False, scale_attn=False),
    "gpt_neox": dict(mlp="gelu", parallel_residual=True, tie_embeddings=False),
    "llama": dict(qkv_bias=False, bias=False, rms_norm=True, mlp="swiglu", tie_embeddings=False),
    "qwen2": dict(bias=False, rms_norm=True, mlp="swiglu", tie_embeddings=False)}
ACT = {"gpt2": ("activation_function", "gelu_new"), "gpt_neo": ("activation_function", "gelu_new"),
       "gpt_neox": ("hidden_act", "gelu"), "llama": ("hidden_act", "silu"), "qwen2": ("hidden_act", "silu")}
CLASS = {"gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
         "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Names: ours -> the family's. Top-level parameters, then a block's parts under the family's block prefix;
# several names: the family keeps as separate matrices what we fuse (q, k, v; SwiGLU's gate, up), in order
_GPT = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f", "lm_head": "lm_head"}
TOP = {"gpt2": _GPT, "gpt_neo": _GPT,
       "gpt_neox": {"wte": "gpt_neox.embed_in", "ln_f": "gpt_neox.final_layer_norm", "lm_head": "embed_out"},
       "llama": {"wte": "model.embed_tokens", "ln_f": "model.norm", "lm_head": "lm_head"}}
PREFIX = {"gpt2": "transformer.h.", "gpt_neo": "transformer.h.", "gpt_neox": "gpt_neox.layers.",
          "llama": "model.layers."}
BLOCK = {"gpt2": {},
         "gpt_neo": {"attn.c_attn": "attn.attention.q_proj attn.attention.k_proj attn.attention.v_proj",
                     "attn.c_proj": "attn.attention.out_proj"},
         "gpt_neox": {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
                      "attn.c_attn": "attention.query_key_value", "attn.c_proj": "attention.dense",
                      "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"},
         "llama": {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
                   "attn.c_attn": "self_attn.q_proj self_attn.k_proj self_attn.v_proj",
                   "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.gate_proj mlp.up_proj",
                   "mlp.c_proj": "mlp.down_proj"}}
# stored in files, not parameters: causal masks, rotary tables
BUFFERS = re.compile(r"\.attn\.(attention\.)?(bias|masked_bias)$|\.attention\.(bias|masked_bias)$"
                     r"|rotary_emb\.inv_freq$")


def is_hub_name(name: str) -> bool:
    """No such local path, and ORG/NAME (one slash, no file suffix) or a bare known name: --init downloads it.
    Anything else that does not exist is refused as a missing path."""
    if os.path.exists(name) or os.path.isdir(os.path.dirname(name)):  # runs/typo: a missing path, not a name
        return False
    return name in HUB_NAMES or bool(re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", name)
                                      and not re.search(r"\.(pt|bin|json|safetensors|txt)$", name))


# ----------------------------------------------------------------------------- config.json

def _unsupported(kind: str, cfg: dict):
    """The first option of config.json that model.py does not implement, as "option value"; None: all fine."""
    act, want_act = ACT[kind]
    rotary, neox = kind in ("gpt_neox", "llama", "qwen2"), kind == "gpt_neox"
    checks = [  # (option, its value here, the one value model.py computes)
        (act, cfg.get(act, want_act), want_act),
        ("scale_attn_by_inverse_layer_idx", cfg.get("scale_attn_by_inverse_layer_idx", False), False),
        ("attention_bias", cfg.get("attention_bias", neox), neox),  # Llama: on o_proj too; GPT-NeoX: always
        ("mlp_bias", cfg.get("mlp_bias", False), False),
        ("use_sliding_window", cfg.get("use_sliding_window", False), False),
        ("layer_types", set(cfg.get("layer_types") or ["full_attention"]), {"full_attention"})]
    if rotary:
        rope, plain = _rope(cfg), cfg.get("hidden_size", 0) // (cfg.get("num_attention_heads") or 1)
        kind_of = rope.get("rope_type", rope.get("type")) or "default"
        checks += [("head_dim", cfg.get("head_dim") or plain, plain),
                   ("rope_scaling rope_type", kind_of, kind_of if kind_of in ("default", "llama3") else "default")]
        if not neox:  # transformers' Llama and Qwen2 rotate whole heads
            checks.append(("partial_rotary_factor", rope["partial_rotary_factor"], 1.0))
    return next((f"{k} {got}" for k, got, want in checks if got != want), None)


def _rope(cfg: dict) -> dict:
    """Rotary settings as transformers 5 writes them (rope_parameters) or older files do (rope_theta,
    rope_scaling; GPT-NeoX: rotary_pct, rotary_emb_base)."""
    return {"rope_theta": cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)),
            "partial_rotary_factor": cfg.get("rotary_pct", cfg.get("partial_rotary_factor", 1.0)),
            **(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}


def config_from_hf(cfg: dict) -> GPTConfig:
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind not in CLASS:
        raise ValueError(f"model_type {kind!r}: supported are {', '.join(CLASS)}")
    if bad := _unsupported(kind, cfg):
        raise ValueError(f"model_type {kind}: {bad} is not supported (model.py does not implement it)")
    names = HF_NAMES[kind]
    lacks = [names[k] for k in FIELDS[:5] if names[k] not in cfg]
    if lacks:
        raise ValueError(f"lacks {lacks[0]!r}")
    kw = dict(FAMILY[kind], arch=kind, **{ours: cfg[hf] for ours, hf in names.items() if cfg.get(hf) is not None})
    if kind == "gpt_neo":  # attention_types [[["global", "local"], 6]]: 6 x (global, local)
        kw["attention_layers"] = [t for ts, n in cfg.get("attention_types", []) for _ in range(n) for t in ts]
    if kind in ("gpt_neox", "llama", "qwen2"):
        rope = _rope(cfg)
        kw.update(rotary_pct=float(rope["partial_rotary_factor"]), rope_theta=float(rope["rope_theta"]))
        if rope.get("rope_type", rope.get("type")) == "llama3":
            kw["rope_scaling"] = {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                               "original_max_position_embeddings")}
    if kw.get("n_kv_head") == kw["n_head"]:
        del kw["n_kv_head"]  # as many k, v heads as q heads: plain multi-head attention
    return GPTConfig(**kw)


def config_to_hf(c: GPTConfig) -> dict:
    """config.json of c's family, refused if it would not load back as c (a mix of families' switches)."""
    if c.arch not in CLASS:
        raise ValueError(f"no Hugging Face model matches arch={c.arch}")
    cfg = {hf: getattr(c, ours) for ours, hf in HF_NAMES[c.arch].items()}
    key, act = ACT[c.arch]
    cfg.update({key: act}, model_type=c.arch, architectures=[CLASS[c.arch]], tie_word_embeddings=c.tie_embeddings)
    if c.arch == "gpt2":
        cfg.update(attn_pdrop=c.dropout, embd_pdrop=c.dropout, resid_pdrop=c.dropout)
    elif c.arch == "gpt_neo":
        cfg.update(attention_types=[[c.attention_layers or ["global"] * c.n_layer, 1]], embed_dropout=c.dropout,
                   attention_dropout=c.dropout, resid_dropout=c.dropout)
    else:  # rotary families: rope both as transformers 5 reads it and as older versions do
        rope = dict(rope_theta=c.rope_theta, rope_type="llama3" if c.rope_scaling else "default",
                    partial_rotary_factor=c.rotary_pct, **(c.rope_scaling or {}))
        cfg.update(rope_theta=c.rope_theta, rope_parameters=rope, attention_dropout=c.dropout,
                   rope_scaling=c.rope_scaling and dict(c.rope_scaling, rope_type="llama3"),
                   intermediate_size=c.n_inner or 4 * c.n_embd)
    if c.arch == "gpt_neox":
        cfg.update(rotary_pct=c.rotary_pct, rotary_emb_base=c.rope_theta, hidden_dropout=c.dropout)
    elif c.arch in ("llama", "qwen2"):
        only = {"attention_bias": False, "mlp_bias": False} if c.arch == "llama" else {"use_sliding_window": False}
        cfg.update(num_key_value_heads=c.n_kv_head or c.n_head, head_dim=c.n_embd // c.n_head, **only)
    plain = lambda g: asdict(replace(  # noqa: E731  (the same model: unused fields aside)
        g, dropout=0.0, arch=c.arch, n_kv_head=g.n_kv_head or g.n_head, n_inner=g.n_inner or 4 * g.n_embd,
        window_size=g.window_size if "local" in g.attention_layers else 0))
    try:
        back = config_from_hf(json.loads(json.dumps(cfg)))
    except ValueError:
        back = None
    if back is None or plain(back) != plain(c):
        raise ValueError(f"no Hugging Face model matches arch={c.arch}, qkv_bias={c.qkv_bias}, scale_attn="
                         f"{c.scale_attn}, attention_layers={c.attention_layers} and the other switches of {c}")
    return cfg


# ----------------------------------------------------------------------------- names and layouts

def hf_names(c: GPTConfig, ours) -> dict:
    """{our parameter name: [the family's names of its pieces]} for the names `ours`."""
    fam = "llama" if c.arch == "qwen2" else c.arch
    out = {}
    for name in ours:
        if m := re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", name):
            i, part, kind = m.groups()
            out[name] = [f"{PREFIX[fam]}{i}.{p}.{kind}" for p in BLOCK[fam].get(part, part).split()]
        else:
            top, kind = name.removeprefix("transformer.").rsplit(".", 1)
            out[name] = [f"{TOP[fam][top]}.{kind}"]
    return out


def to_ours(c: GPTConfig, name: str, parts: list) -> torch.Tensor:
    """The family's pieces of our parameter `name` -> our tensor (nn.Linear's (out, in))."""
    t = torch.cat(parts) if len(parts) > 1 else parts[0]  # q, k, v stacked; SwiGLU: gate then up
    if c.arch == "gpt2" and name.endswith(CONV1D):
        t = t.t()  # GPT-2's Conv1D: (in, out)
    if c.arch == "gpt_neox" and ".c_attn." in name:  # per head q, k, v [n_head, 3, hs] -> [3, n_head, hs]
        t = t.unflatten(0, (c.n_head, 3, -1)).transpose(0, 1).flatten(0, 2)
    return t


def from_ours(c: GPTConfig, name: str, t: torch.Tensor, n_parts: int) -> list:
    """to_ours' inverse: our tensor -> the family's pieces."""
    if c.arch == "gpt2" and name.endswith(CONV1D):
        t = t.t()
    if c.arch == "gpt_neox" and ".c_attn." in name:
        t = t.unflatten(0, (3, c.n_head, -1)).transpose(0, 1).flatten(0, 2)
    if n_parts == 1:
        return [t]
    kv = (c.n_kv_head or c.n_head) * (c.n_embd // c.n_head)
    return list(t.split([c.n_embd, kv, kv]) if n_parts == 3 else t.chunk(2))


def to_hf(model: GPT) -> tuple:
    """(tensors under the family's names, config.json) of a plain model (no adapters)."""
    c, sd = model.config, model.state_dict()
    cfg = config_to_hf(c)
    names = hf_names(c, [n for n in sd if not c.tie_embeddings or n != "lm_head.weight"])
    tensors = {}
    for ours, hs in names.items():
        tensors.update(zip(hs, (p.contiguous() for p in from_ours(c, ours, sd[ours].detach(), len(hs)))))
    return tensors, cfg


# ----------------------------------------------------------------------------- files

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


def weight_files(folder) -> list:
    """[(path, reader)]: model.safetensors, the shards an index lists (in order), or pytorch_model.bin."""
    if os.path.isfile(index := os.path.join(folder, INDEX)):
        wm = read_json(index)
        wm = wm.get("weight_map") if isinstance(wm, dict) else None  # {tensor: shard file}
        shards = list(wm.values()) if isinstance(wm, dict) else []
        bad = [s for s in shards if not isinstance(s, str) or not re.fullmatch(r"[\w.-]+\.safetensors", s)]
        if not shards or bad:
            raise ValueError(f"{index}: want a weight_map of tensor -> shard file name; got {bad[:1] or 'none'}")
        return [(os.path.join(folder, s), read_safetensors) for s in dict.fromkeys(shards)]
    for f, read in (("model.safetensors", read_safetensors), ("pytorch_model.bin", load_checkpoint)):
        if os.path.exists(path := os.path.join(folder, f)):
            return [(path, read)]
    raise ValueError(f"{folder}: no model.safetensors, {INDEX} or pytorch_model.bin")


def load_hf(name: str) -> GPT:
    """A hub name or a Hugging Face folder; every tensor's shape is checked against config.json."""
    folder = name
    if is_hub_name(name):
        from experiments.fetch import hub_folder  # downloaded once, resumably, beside the data sets
        folder = hub_folder(name)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{name}: not a folder with config.json, nor a hub name (ORG/NAME or one of "
                         f"{', '.join(HUB_NAMES)})")
    try:
        config = config_from_hf(read_json(cfg_path))  # read_json's errors name the file
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    model = GPT(config)
    fill(model, weight_files(folder), folder)
    return model


@torch.no_grad()
def fill(model: GPT, files: list, folder):
    """Copy each file's tensors into the model's parameters as soon as all pieces of one are read (copy_
    casts f16/bf16 to f32), so that only one file's tensors are held at a time."""
    c, params = model.config, model.state_dict()
    head = TOP["llama" if c.arch == "qwen2" else c.arch]["lm_head"] + ".weight"
    plan = hf_names(c, [n for n in params if not (c.tie_embeddings and n == "lm_head.weight")])
    wanted, pending, tied_head = {h for hs in plan.values() for h in hs}, {}, None
    for path, read in files:
        for key, t in read(path).items():
            if c.arch in ("gpt2", "gpt_neo") and not key.startswith(("transformer.", "lm_head")):
                key = "transformer." + key  # the original hub GPT-2 file has no prefix
            if key in wanted:
                pending[key] = t
            elif key == head and c.tie_embeddings:
                tied_head = t  # a tied model's head written out anyway: must equal wte (checked below)
            elif not BUFFERS.search(key):
                raise ValueError(f"{path}: {key} is {tuple(t.shape)}, config.json implies none (unexpected)")
        for ours, hs in [(o, hs) for o, hs in plan.items() if all(h in pending for h in hs)]:
            p, need = params[ours], [tuple(x.shape) for x in from_ours(c, ours, params[ours], len(hs))]
            for h, shape in zip(hs, need):
                if tuple(pending[h].shape) != shape:
                    raise ValueError(f"{path}: {h} is {tuple(pending[h].shape)}, config.json implies {shape}")
            p.copy_(to_ours(c, ours, [pending.pop(h) for h in hs]))
            del plan[ours]
    if plan:
        ours, hs = next(iter(plan.items()))
        need = dict(zip(hs, (tuple(x.shape) for x in from_ours(c, ours, params[ours], len(hs)))))
        h = next(h for h in hs if h not in pending)
        raise ValueError(f"{folder}: {h} is missing, config.json implies {need[h]}")
    wte = model.transformer.wte.weight
    if tied_head is not None and not torch.equal(tied_head.to(wte.dtype), wte):
        raise ValueError(f"{folder}: {head} is not the token embedding, but config.json ties them "
                         "(tie_word_embeddings false for an untied head)")
