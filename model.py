"""The GPT: GPT-2, GPT-Neo, GPT-NeoX (Pythia), Llama and Qwen2 in one class, with GPT-2's parameter names.

As in nanoGPT: token + position embeddings, n_layer Blocks (LayerNorm, causal self-attention, LayerNorm,
MLP), a last LayerNorm, and a head that is the token embedding. GPT-Neo differs in three GPTConfig
fields: no q/k/v bias, no 1/sqrt(head size) on the scores, "local" layers that see window_size back.
Later families swap parts, each by a GPTConfig switch (docs/models.md; their files: experiments/hf.py).
TGL's units, what it measures, freezes or slows down, are at the end: `unit_of` maps each parameter to
embed, h.{i}.attn, h.{i}.mlp or ln_f. LoRA (`add_lora`), a method TGL stacks on, changes the model.
"""
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class GPTConfig:
    block_size: int = 1024  # the longest sequence: the number of learned positions
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP width; None: 4 * n_embd
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    arch: str = "gpt2"  # or gpt_neo, gpt_neox, llama, qwen2; picks only the export format
    qkv_bias: bool = True  # False (GPT-Neo, Llama): no q/k/v bias
    bias: bool = True  # False (Llama, Qwen2): no MLP and attn.c_proj bias
    scale_attn: bool = True  # False (GPT-Neo): no 1/sqrt(head_dim) on q.k
    attention_layers: list = field(default_factory=list)  # per layer "global"/"local"; [] = all global
    window_size: int = 256  # how far back a "local" layer looks
    rms_norm: bool = False  # True (Llama, Qwen2): RMSNorm, x / rms(x) * weight
    mlp: str = "gelu_tanh"  # or "gelu" (exact; GPT-NeoX), "swiglu" (Llama, Qwen2)
    parallel_residual: bool = False  # True (GPT-NeoX): attention and MLP read the same x
    n_kv_head: int | None = None  # grouped-query attention: k and v heads; None: n_head
    rotary_pct: float = 0.0  # 0: learned positions (wpe); > 0: rotary on that share of a head
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3's (config.json's keys)
    tie_embeddings: bool = True  # False (GPT-NeoX): lm_head is its own matrix

    def __post_init__(self):
        sizes = (self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd, self.n_kv_head or 1)
        if not (all(isinstance(v, int) and v >= 1 for v in sizes) and self.n_embd % self.n_head == 0
                and self.n_head % (self.n_kv_head or 1) == 0 and self.mlp in ("gelu_tanh", "gelu", "swiglu")
                and 0 <= self.rotary_pct <= 1 and 0 <= self.dropout < 1
                and len(self.attention_layers) in (0, self.n_layer)):
            raise ValueError(f"model config: want int sizes >= 1 (n_head | n_embd, n_kv_head | n_head), a known "
                             f"mlp, dropout in [0, 1), rotary_pct in [0, 1], 0 or n_layer attention_layers; got {self}")

class Linear(nn.Linear):
    """nn.Linear + optional LoRA, y = xW^T + b + (alpha/r) xA^T B^T; W keeps its GPT-2 name."""

    def forward(self, x):
        y = super().forward(x)
        if getattr(self, "lora_A", None) is not None:  # add_lora gave this layer an adapter
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scaling
        return y

def rotary(c: GPTConfig, T: int, device):
    """cos, sin (T, rd): position t turns each head's dims (i, i + rd/2) by t * theta^(-2i/rd), i < rd/2;
    q.k then depends on positions only through their distance."""
    rd = int(c.n_embd // c.n_head * c.rotary_pct)
    freq = c.rope_theta ** -(torch.arange(0, rd, 2, device=device).float() / rd)  # (rd/2,) per position
    s = c.rope_scaling
    if s:  # Llama 3: pairs that turn < low_freq_factor times over the original context
        # are slowed by factor, those > high_freq_factor kept, those between blended
        turns = s["original_max_position_embeddings"] * freq / (2 * math.pi)
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        w = ((turns - lo) / (hi - lo)).clamp(0, 1)  # 0: slowed, 1: kept
        freq = (1 - w) * freq / s["factor"] + w * freq
    angle = torch.outer(torch.arange(T, device=device).float(), freq)  # (T, rd/2)
    angle = torch.cat((angle, angle), -1)  # (T, rd)
    return angle.cos(), angle.sin()

def rotate(x, cos, sin):  # x (B, nh, T, hs): each pair (a, b) -> (a cos - b sin, b cos + a sin)
    rd = cos.shape[-1]
    a, b = x[..., :rd // 2], x[..., rd // 2:rd]
    return torch.cat((x[..., :rd] * cos + torch.cat((-b, a), -1) * sin, x[..., rd:]), -1).type_as(x)

class CausalSelfAttention(nn.Module):
    """Every position mixes in the values of earlier positions, weighted by how well its query matches
    their keys; n_head heads do this side by side on slices of the embedding, each of size hs."""

    # True: torch's fused scaled_dot_product_attention, the fast path every script uses (on a GPU it never
    # stores the (T, T) weights). False: the same written out below, to read (tests hold the two equal).
    use_sdpa = True

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.dropout, self.scale_attn = config.n_head, config.dropout, config.scale_attn
        self.n_kv = config.n_kv_head or config.n_head  # grouped-query: fewer k, v heads
        self.split = [config.n_embd] + 2 * [self.n_kv * (config.n_embd // config.n_head)]  # q, k, v
        self.c_attn = Linear(config.n_embd, sum(self.split), bias=config.qkv_bias)  # q, k, v at once
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)  # the heads' outputs back
        local = "local" in config.attention_layers[layer:layer + 1]
        self.window = config.window_size if local else None  # None: a global layer sees every earlier j

    def mask(self, T: int, device) -> torch.Tensor:
        """(T, T) bool: True where position i may attend to position j. Causal: j <= i, never the
        future. GPT-Neo's local layers also drop j more than window - 1 back: 0 <= i - j < window."""
        allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # j <= i
        if self.window is not None:
            allowed = allowed.triu(1 - self.window)  # i - j <= window - 1
        return allowed

    def forward(self, x, rope=None):
        B, T, C = x.shape  # batch, sequence length, embedding size (n_embd)
        hs = C // self.n_head  # head size
        # one matmul gives q, k and v for every head; split C into n_head heads of size hs
        q, k, v = self.c_attn(x).split(self.split, dim=2)  # (B, T, C), k and v (B, T, nkv * hs)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:  # rotary: position enters as a turn of q and k
            q, k = rotate(q, *rope), rotate(k, *rope)
        if self.n_kv < self.n_head:  # grouped-query: each k, v head serves n_head / nkv q heads in a row
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0  # attention dropout, while training only
        if self.use_sdpa:
            # the causal mask is built in (is_causal); a local layer longer than its window needs ours
            mask = self.mask(T, x.device) if self.window is not None and T > self.window else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None,
                                               scale=None if self.scale_attn else 1.0)  # None: 1/sqrt(hs)
        else:
            # scores: how well query i matches key j. 1/sqrt(hs) keeps their spread near 1 whatever hs
            # is, so softmax does not saturate (GPT-2); GPT-Neo was trained without it
            att = q @ k.transpose(-2, -1)  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
            if self.scale_attn:
                att = att / math.sqrt(hs)
            att = att.masked_fill(~self.mask(T, x.device), float("-inf"))  # what i may not see: weight 0
            att = F.softmax(att, dim=-1)  # each row i: weights over j that sum to 1
            att = F.dropout(att, p)  # p is 0 outside training
            y = att @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs): the weighted sum of values
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)
        return self.c_proj(y)  # (B, T, C)

class MLP(nn.Module):
    """Position by position: widen to n_inner, GELU (SwiGLU: silu(gate) * up), project back. Most of a
    block's parameters."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        inner, self.kind = config.n_inner or 4 * config.n_embd, config.mlp
        self.c_fc = Linear(config.n_embd, inner * (2 if self.kind == "swiglu" else 1), bias=config.bias)
        self.c_proj, self.dropout = Linear(inner, config.n_embd, bias=config.bias), nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, n_inner); SwiGLU: (B, T, 2 * n_inner)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # the gate sets how much of each up unit passes
        else:  # "gelu_new" (GPT-2, GPT-Neo): tanh-approximated; GPT-NeoX's exact
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))

class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm(config)
        self.mlp, self.resid_dropout, self.parallel = MLP(config), nn.Dropout(config.dropout), config.parallel_residual

    def forward(self, x, rope=None):
        # pre-LN (GPT-2): each sublayer reads a normalized copy of the residual stream x and adds its
        # output back. x itself is never normalized on the way, so the gradient reaches early layers
        # through the sums unchanged: deep stacks train stably (post-LN, the original Transformer's, less so).
        a = self.resid_dropout(self.attn(self.ln_1(x), rope))
        # parallel (GPT-NeoX): the MLP reads x, not x + a; both are added at once
        return x + a + self.mlp(self.ln_2(x if self.parallel else x + a))

def norm(config: GPTConfig) -> nn.Module:  # RMSNorm: LayerNorm without centring and bias
    return (nn.RMSNorm if config.rms_norm else nn.LayerNorm)(config.n_embd, eps=config.layer_norm_epsilon)

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            # learned position embedding (none with rotary)
            **({} if config.rotary_pct else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),  # pre-LN: the stream's last norm
        ))
        # tied embeddings (GPT-2): the head that scores the next token is the token embedding itself, one
        # tensor, once in parameters(); so unit_of puts lm_head in the unit "embed" (untied too)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # GPT-2's init: every weight N(0, 0.02), biases 0 (LayerNorms keep weight 1, bias 0)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                # the residual projections: each block adds two outputs (attn, mlp) to the residual stream,
                # so its variance grows with depth; with std / sqrt(2 * n_layer) all 2 * n_layer additions
                # together add about as much variance at init as one unscaled layer would (GPT-2 paper, 2.3)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V) and, given targets (B, T), the mean cross-entropy (-1: no loss)."""
        t, T, rope = self.transformer, idx.shape[1], None
        x = t.wte(idx)  # (B, T, C): what each token is
        if self.config.rotary_pct:
            rope = rotary(self.config, T, idx.device)  # where it is, as (cos, sin) for every layer
        else:
            x = x + t.wpe(torch.arange(T, device=idx.device))  # + where it is
        x = t.drop(x)
        for block in t.h:
            x = block(x, rope)
        logits = self.lm_head(t.ln_f(x))  # (B, T, V): at each position, a score for every next token
        if targets is None:
            return logits, None
        # -1 marks a position without loss: the prompt of a salient-span example, padding
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
            context = idx[:, -self.config.block_size:]  # the model has only block_size positions
            logits, _ = self(context)
            logits = logits[:, -1, :].float()  # (B, V): only the last position predicts the next token
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature  # < 1 sharpens the distribution, > 1 flattens it
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
            # B = 0: the adapter's B A x is 0, so training starts from exactly the loaded model; A is
            # random so that B's gradient, which goes through A x, is not 0 as well
            m.lora_B = nn.Parameter(m.weight.new_zeros(m.out_features, rank))
            nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))  # as in the LoRA paper's code
            m.lora_scaling = alpha / rank
    model.lora = dict(rank=rank, alpha=alpha, units=None if units is None else sorted(units))
    return model

@torch.no_grad()
def merge_lora(model: GPT):
    """W += (alpha/r) B A: the same function without adapters, a plain GPT again."""
    for m in model.modules():
        if getattr(m, "lora_A", None) is not None:
            m.weight += (m.lora_B @ m.lora_A) * m.lora_scaling
            del m.lora_A, m.lora_B
    model.lora = None
    return model

# ----------------------------------------------------------------------------- TGL's units

def unit_of(param_name: str) -> str:
    """embed (+ tied lm_head), h.{i}.attn, h.{i}.mlp or ln_f; ln_1/ln_2 join the sublayer they alone
    feed, an adapter the layer it adapts."""
    # ln_1's output goes only into attn, ln_2's only into the MLP: each LayerNorm is part of its sublayer's
    # path, and freezing or slowing "h.3.attn" has to act on its input normalization too. wte and lm_head
    # are one tensor (tied), so they can only be one unit; wpe is added to it at the input. Untied (GPT-NeoX),
    # lm_head stays in "embed", the vocabulary's matrices: a unit means the same, tied or not.
    p = re.sub(r"^(_orig_mod\.)?(module\.)?(transformer\.)?", "", param_name).split(".")
    if p[0] == "ln_f":
        return "ln_f"
    if p[0] in ("wte", "wpe", "lm_head"):
        return "embed"
    if p[0] == "h" and len(p) > 2 and p[2] in ("ln_1", "attn"):
        return f"h.{p[1]}.attn"
    if p[0] == "h" and len(p) > 2 and p[2] in ("ln_2", "mlp"):
        return f"h.{p[1]}.mlp"
    raise ValueError(f"parameter {param_name!r} belongs to no unit")

UNIT_RE = re.compile(r"embed|h\.(\d+)\.(attn|mlp)|ln_f")  # a unit's name, as unit_of returns it

def unit_names(n_layer: int) -> list:  # in network order
    return ["embed"] + [f"h.{i}.{s}" for i in range(n_layer) for s in ("attn", "mlp")] + ["ln_f"]

# ----------------------------------------------------------------------------- devices

def unwrap(model) -> GPT:
    """The GPT inside torch.compile (_orig_mod) and DDP (module), wrapped in either order."""
    for wrapper in ("_orig_mod", "module", "_orig_mod"):
        model = getattr(model, wrapper, model)
    return model

def pick_device(name: str = "auto") -> str:
    """--device: auto is the first of cuda, mps, cpu that this machine has."""
    here = []
    if torch.cuda.is_available():
        here.append("cuda")
    if torch.backends.mps.is_available():
        here.append("mps")
    here.append("cpu")
    if name == "auto":
        return here[0]
    if name.split(":")[0] not in here:
        raise ValueError(f"--device {name}: not here; use auto or {', '.join(here)}")
    return name

def autocast(device: str):
    """bf16 matmuls on CUDA (fp32 weights and optimizer state); full fp32 elsewhere."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
