"""Steps 1 and 2 of TGL: trace where new knowledge pulls on the model, then choose the units to train.

  1. Trace. For every unit u (embed, h.{i}.attn, h.{i}.mlp, ln_f; see model.unit_of):
     span_norm[u] = mean over probes of ||grad_u L_span||   (loss on the answer tokens only)
     lm_norm[u]   = mean over random windows of old text of ||grad_u L_lm||
     rgn[u]       = span_norm[u] / lm_norm[u]
  2. Select. tgl_plan(): per unit 0 (frozen, TGL+FP) or an LR scale (TGL+ALR).

    python trace.py --init RUN --probes diag_*.jsonl --text t0.txt --out trace.json
"""
import hashlib
import importlib
import json
import math
import random
import re
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

import data
from checkpoint import load_model
from common import POS, check_output, flag, input_errors, number, parse_config, read_json, write_text
from experiments import probe_files  # the data sets' probe files
from model import autocast, pick_device, unit_names, unit_of
from optim import group_norms, local, sharded

# ----- step 1: trace
def unit_norms(names, norms, across=False) -> dict:  # {unit: 2-norm of its parameters' gradients}
    units = list(dict.fromkeys(map(unit_of, names)))  # in the network's order
    at = [units.index(unit_of(n)) for n in names]
    return dict(zip(units, group_norms(norms, at, len(units), across)))

def grad_norms(model) -> dict:  # of the .grad now: train.py's log
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return {}
    names, grads = zip(*named)
    norms = [torch.linalg.vector_norm(local(g), dtype=torch.float32) for g in grads]  # FSDP: of its slice
    return unit_norms(names, norms, sharded(grads[0]))

class GradNormHooks:
    """While entered, each parameter requiring grad records ||grad|| and drops it
    (no full gradient is held); eval mode, .grad set aside. A post-accumulate hook fires once, on the sum;
    a tensor hook would fire per *use* of the tied wte, on partial sums."""

    def __init__(self, model):
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("no parameter requires grad: nothing to trace")
        self.reset()

    def _record(self, i, p):  # fp32 whatever the grad's dtype; no sync
        self._norms[i] = torch.linalg.vector_norm(local(p.grad), dtype=torch.float32)
        p.grad = None

    def __enter__(self):
        self._saved = [(p, p.grad) for p in self.model.parameters()], self.model.training
        self.model.eval().zero_grad(set_to_none=True)
        self._handles = [p.register_post_accumulate_grad_hook(partial(self._record, i))
                         for i, (_, p) in enumerate(self.named)]
        return self

    def __exit__(self, *exc):
        params, training = self._saved
        for h in self._handles:
            h.remove()
        for p, grad in params:
            p.grad = grad
        self.model.train(training)

    def reset(self):
        self._norms = [torch.zeros((), device=p.device) for _, p in self.named]

    def norms(self) -> dict:
        return unit_norms([n for n, _ in self.named], self._norms, sharded(self.named[0][1]))

def trace_norms(model, example_sets: dict, device=None) -> dict:
    """{name: ({unit: mean gradient norm}, n)} for named sets of n (idx, targets)."""
    device, out = device or next(model.parameters()).device, {}
    # One example per backward: the method averages per-example norms; a batch's norm shrinks as its
    # examples partly cancel, unequally for the span (few, similar tokens) and LM losses.
    with torch.enable_grad(), GradNormHooks(model) as hooks:
        for name, examples in example_sets.items():
            total = {}
            for example in examples:
                x, y = data.collate([example], device)  # (1, T) each
                hooks.reset()
                with autocast(device):
                    _, loss = model(x, y)
                loss.backward()  # the hooks take norms, drop grads
                total = {u: total.get(u, 0.0) + v for u, v in hooks.norms().items()}
            out[name] = ({u: v / len(examples) for u, v in total.items()}, len(examples))
    return out

def result(span, lm) -> dict:  # a trace from span and LM norms, each ({unit: mean norm}, n)
    # The ratio, not the span norm: some units (embeddings, the first block) have large gradients for
    # any text; rgn asks where *this knowledge* pulls harder than ordinary text. LM norm 0: rgn 0, not inf.
    (s, n_span), (m, n_lm) = span, lm
    return {"units": list(s), "span_norm": s, "lm_norm": m, "n_span": n_span, "n_lm": n_lm,
            "rgn": {u: s[u] / m[u] if m[u] > 0 else 0.0 for u in s}}

def trace(model, span_examples, lm_windows, device=None) -> dict:  # window: w[:-1], w[1:]
    return result(*trace_norms(model, {"span": span_examples, "lm": lm_windows}, device).values())

# ----- step 2: select
DEFAULT_FLOOR = 0.01

@dataclass
class Selection:
    """The choices the paper leaves open: flags of trace.py and train.py."""
    select: str = flag("mean", "fp rule: mean (rgn above the mean), topk:K or frac:F")
    # blocks: the paper ranks layers; no choice cost more learning than FP freezing the tied embedding
    rank_units: str = flag("blocks", "units ranked: all, blocks, attn, mlp or a list; others train")
    alr_norm: str = flag("max", "alr scale: rgn/max (paper) or rgn/mean capped at 1", choices=["max", "mean"])
    floor: float = flag(DEFAULT_FLOOR, "alr: smallest LR scale (0 lets alr freeze)", type=number("[0, 1]"))
    trace_split: str = flag("all", "the traced split whose rgn selects")
    control: str = flag("none", "none, complement or random:SEED (see tgl_plan)")

    def check(self):  # argparse checks --alr-norm and --floor
        rule(self.select)
        if not re.fullmatch(r"none|complement|random:-?\d+", self.control):
            raise ValueError(f"bad --control {self.control!r}: use none, complement or random:SEED")
        return self

def rule(text: str):
    """--select -> (kind, K or F)."""
    kind, _, val = text.partition(":")
    with suppress(ValueError):
        value = {"topk": int, "frac": float}.get(kind, str)(val)
        if text == "mean" or kind == "topk" and value >= 1 or kind == "frac" and 0 < value <= 1:
            return kind, value
    raise ValueError(f"bad --select {text!r}: use mean, topk:K (K >= 1) or frac:F (0 < F <= 1)")

def resolve_units(spec: str, units) -> list:
    """--rank-units -> the ranked units."""
    part = {"all": "", "blocks": "h.", "attn": ".attn", "mlp": ".mlp"}.get(spec)
    chosen = [u for u in units if part in u] if part is not None else \
        [u.strip() for u in spec.split(",") if u.strip()]
    if not chosen or any(u not in units for u in chosen):
        raise ValueError(f"bad --rank-units {spec!r}: use all, blocks, attn, mlp or units of {list(units)}")
    return chosen

def select(rgn: dict, mode="fp", rule_="mean", units=None, alr_norm="max", floor=DEFAULT_FLOOR) -> dict:
    """{unit: scale}; only `units` (default: all) are ranked, others keep 1. fp: 1 chosen, 0 frozen;
    mean: rgn above the mean (all if none is), topk:K the K largest, frac:F the ceil(F * n) largest.
    alr: rgn / max (paper) or min(1, rgn / mean), at least floor."""
    ranked = list(rgn) if units is None else list(units)
    if not ranked or not set(ranked) <= set(rgn):
        raise ValueError(f"ranked units {ranked}: want a non-empty subset of {list(rgn)}")
    mean, scales = sum(rgn[u] for u in ranked) / len(ranked), dict.fromkeys(rgn, 1.0)
    if mode == "fp":
        kind, value = rule(rule_)
        if kind == "mean":  # the paper's: the count adapts to how peaked the trace is
            chosen = {u for u in ranked if rgn[u] > mean} or set(ranked)
        else:
            k = value if kind == "topk" else math.ceil(value * len(ranked))
            chosen = set(sorted(ranked, key=lambda u: -rgn[u])[:k])  # stable: ties go to the earlier
        return scales | {u: float(u in chosen) for u in ranked}
    ref = max(rgn[u] for u in ranked) if alr_norm == "max" else mean
    return scales | {u: max(floor, min(1.0, rgn[u] / ref)) if ref > 0 else 1.0 for u in ranked}

def tgl_plan(trace: dict, mode: str, sel: Selection, units: list) -> dict:
    """Where TGL decides: a trace -> {unit: lr scale} for the model's `units`: 0 frozen (FP), else lr *
    scale (ALR). train.py's optimizer (and LoRA) takes it."""
    rgn = (trace if sel.trace_split == "all" else trace.get("splits", {}).get(sel.trace_split, {})).get("rgn")
    if rgn is None:
        raise ValueError(f"--trace-split: the trace has no split {sel.trace_split!r}")
    if sorted(rgn) != sorted(units):
        raise ValueError(f"trace units {sorted(rgn)} do not match the model's {units}")
    for u, v in rgn.items():  # a NaN would make every comparison False and TGL a silent no-op
        if not (isinstance(v, (int, float)) and 0 <= v < math.inf):
            raise ValueError(f"trace rgn of {u} is {v!r}, not a finite number >= 0")
    ranked = resolve_units(sel.rank_units, units)
    scales = select(rgn, mode, sel.select, ranked, sel.alr_norm, sel.floor)
    # Controls: does the trace beat chance? Only ranked units change. complement (fp): frozen and trained
    # swap; random:S (seed S): fp draws as many units, alr shuffles the scales.
    if sel.control == "complement":
        if mode != "fp":
            raise ValueError("--control complement applies to --tgl fp only")
        return scales | {u: 1.0 - scales[u] for u in ranked}
    if sel.control.startswith("random:"):
        rng, values = random.Random(int(sel.control[7:])), [scales[u] for u in ranked]
        if mode == "fp":
            chosen = set(rng.sample(ranked, int(sum(values))))
            return scales | {u: float(u in chosen) for u in ranked}
        rng.shuffle(values)
        return scales | dict(zip(ranked, values))
    return scales

# ----- files in, trace out

@dataclass
class TraceConfig:
    init: str = flag(None, "model: run folder, ckpt.pt, HF folder or hub name", required=True)
    probes: list = flag([], "probe files (formats: probe_files.read_probes)", nargs="+", required=True)
    text: str = flag(None, "old text for the LM windows: file or folder", required=True)
    out: str = flag(None, "trace JSON to write", required=True)
    tokenizer: str = flag(None, "data.load_tokenizer's (default: --init's)")
    n_span: int = flag(100, "probes per split (a seeded sample if more)", type=POS)
    n_lm: int = flag(100, "random LM windows", type=POS)
    block_size: int = flag(None, "LM window length (default: the model's)", type=POS)
    seed: int = flag(0, "seed of the probe sample and LM windows")
    device: str = flag("auto", "cpu, cuda, mps or auto")
    fsdp: bool = flag(False, "under torchrun: shard the weights (FSDP2)")
    selection: Selection = field(default_factory=Selection)

def trace_files(model, tokenizer, cfg: TraceConfig, device=None) -> dict:
    """The trace of each probe split and of all (the top level), with TGL's choice."""
    model_config = model.config
    block_size, units = cfg.block_size or model_config.block_size, unit_names(model_config.n_layer)
    if block_size > model_config.block_size:
        raise ValueError(f"--block-size must be at most the model's {model_config.block_size}")
    resolve_units(cfg.selection.check().rank_units, units)  # before the slow part
    by_split = {}
    for p in probe_files.read_probe_files(cfg.probes):  # each probe's split
        by_split.setdefault(p.split, []).append(p)
    if "all" in by_split:
        raise ValueError("a probe split may not be named 'all'")
    span_sets = {}  # {split: [(idx, targets)]}: a sample seeded by (seed, split), each probe's first answer
    for name, probes in by_split.items():
        keep = random.Random(f"{cfg.seed}:{name}").sample(range(len(probes)), min(cfg.n_span, len(probes)))
        pairs = [data.span_example(tokenizer, probes[k].prompt, probes[k].answers[0]) for k in sorted(keep)]
        span_sets[name] = [(i[-block_size:], t[-block_size:]) for i, t in pairs]  # the answer is at the end
    tokens = data.load_tokens(cfg.text, tokenizer)
    starts = data.random_starts(len(tokens), cfg.n_lm, block_size, cfg.seed)
    lm_windows = list(zip(*(w.tolist() for w in data.windows(tokens, starts, block_size))))
    examples = [*(e for s in span_sets.values() for e in s), *lm_windows]
    vocab_size = model_config.vocab_size
    if max(max(idx) for idx, _ in examples) >= vocab_size:
        raise ValueError(f"token ids past the model's vocabulary ({vocab_size}): wrong --tokenizer?")
    # step 1: every parameter of a loaded model requires grad, so every unit gets a norm
    norms = trace_norms(model, span_sets, device)  # {split: ({unit: mean norm}, n)}
    lm = trace_norms(model, {"lm": lm_windows}, device)["lm"]
    splits = {name: result(span, lm) for name, span in norms.items()}
    n = sum(c for _, c in norms.values())  # "all": the mean over every probe
    splits["all"] = result(({u: sum(s[u] * c for s, c in norms.values()) / n for u in lm[0]}, n), lm)
    d = dict(splits["all"], splits=splits, model=cfg.init, probe_files=cfg.probes, text=cfg.text,
             seed=cfg.seed, counts={"span": {k: c for k, (_, c) in norms.items()}, "lm": cfg.n_lm},
             block_size=block_size, fingerprint=fingerprint(model))
    plans = {mode: tgl_plan(d, mode, cfg.selection, units) for mode in ("fp", "alr")}  # step 2
    return dict(d, selection=dict(asdict(cfg.selection), **plans))

def fingerprint(model) -> str:  # which weights: names, shapes, 256 values each (fp32 on CPU: any device)
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        v = p.detach().flatten()[::max(1, p.numel() // 256)].float().numpy(force=True)
        h.update(f"{name}{tuple(p.shape)}".encode() + v.tobytes())
    return h.hexdigest()[:12]

def load_trace(path) -> dict:
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("rgn"), dict):
        raise ValueError(f"{path}: not a trace file (no 'rgn' per unit)")
    return d

def report(d: dict) -> str:  # Figure 2: python -m experiments.plot --trace FILE
    rows = [f"{'unit':<10} {'span':>10} {'lm':>10} {'rgn':>7}  fp  alr"]
    rows += [f"{u:<10} {d['span_norm'][u]:>10.4g} {d['lm_norm'][u]:>10.4g} {d['rgn'][u]:>7.3f} "
             f"{d['selection']['fp'][u]:3.0f} {d['selection']['alr'][u]:5.3f}" for u in d["units"]]
    return "\n".join(rows) + f"\ntraced: {d['counts']}"

def main(argv=None) -> dict:
    cfg = parse_config(TraceConfig, "trace.py", __doc__, argv)
    with input_errors("trace.py"):
        cfg.selection.check()
        probe_files.check_files([cfg.text], cfg.probes)  # before the model loads
        check_output(cfg.out, "--out")
        rank, device = 0, pick_device(cfg.device)
        if cfg.fsdp:  # all processes trace the same examples, with 1/N of the weights each
            rank, model, device = importlib.import_module("experiments.fsdp").sharded_model(cfg, device)
        else:
            model = load_model(cfg.init, device)
        d = trace_files(model, data.load_tokenizer(cfg.tokenizer or cfg.init), cfg, device)
        if rank == 0:
            write_text(cfg.out, json.dumps(d, indent=1))
            print(report(d) + f"\n\nwrote {cfg.out}")
    return d

if __name__ == "__main__":
    main()
