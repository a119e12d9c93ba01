"""Steps 1 and 2 of TGL: trace where new knowledge pulls on the model, then choose the units to train.

  1. Trace. For every unit u (embed, h.{i}.attn, h.{i}.mlp, ln_f; see model.unit_of):
         span_norm[u] = mean over probes of ||grad_u L_span||   (the loss on the answer tokens only)
         lm_norm[u]   = mean over random windows of old text of ||grad_u L_lm||
         rgn[u]       = span_norm[u] / lm_norm[u]
  2. Select. tgl_plan() turns a trace into a number per unit: 0 (frozen, TGL+FP) or an LR scale (TGL+ALR).

    python trace.py --init RUN --probes diag_updated.jsonl diag_new.jsonl --text t0.txt --out trace.json
"""
import json
import math
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import data
from common import Parser, add_flags, check_output, flag, from_args, input_errors, number, read_json, write_text
from model import autocast, load_model, pick_device, unit_names, unit_of, unwrap

# ----------------------------------------------------------------------------- step 1: gradient norms per unit

def unit_norms(named_norms, n_layer: int) -> dict:
    """{unit: norm} from [(parameter name, ||grad||)]: the 2-norm of all the unit's gradients together. One sync."""
    units = [u for u in unit_names(n_layer) if u in {unit_of(n) for n, _ in named_norms}]
    idx = torch.tensor([units.index(unit_of(n)) for n, _ in named_norms], device=named_norms[0][1].device)
    sq = torch.stack([norm for _, norm in named_norms]).square()  # (P,)
    return dict(zip(units, torch.zeros(len(units), device=sq.device).index_add_(0, idx, sq).sqrt().tolist()))

def grad_norms(model) -> dict:
    """{unit: norm} of the gradients now in .grad: training's log (after DDP's all-reduce, so every rank agrees)."""
    named = [(n, torch.linalg.vector_norm(p.grad, dtype=torch.float32))
             for n, p in model.named_parameters() if p.grad is not None]
    return unit_norms(named, unwrap(model).config.n_layer) if named else {}

class GradNormHooks:
    """One hand-written hook per parameter that requires grad: it records ||grad|| and drops the gradient.

    Why a post-accumulate hook on the Parameter, not a hook on its gradient tensor: a tensor hook fires once
    per *use* (the tied wte is used twice, as embedding and LM head) and would see partial gradients; this
    one fires once, on the finished sum. Dropping p.grad right after means every backward starts from
    nothing and no full gradient is ever kept: tracing costs a forward and a backward, no optimizer memory.
    """

    def __init__(self, model):
        self.named, self.n_layer = [(n, p) for n, p in model.named_parameters() if p.requires_grad], model.config.n_layer
        if not self.named:
            raise ValueError("no parameter requires grad: nothing to trace")
        self.reset()

    def _hook(self, i):
        def hook(p):  # fp32 accumulation whatever the gradient's dtype; one kernel, no sync
            self._norms[i] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            p.grad = None
        return hook

    def __enter__(self):
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, (_, p) in enumerate(self.named)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def reset(self):
        self._norms = [torch.zeros((), device=p.device) for _, p in self.named]

    def norms(self) -> dict:  # one sync
        return unit_norms([(n, v) for (n, _), v in zip(self.named, self._norms)], self.n_layer)

@contextmanager
def _tracing(model, all_params: bool):
    """Eval mode (dropout off: the norms are of the model's gradient, not a random sub-network's), grads on,
    .grad set aside; on exit every flag, mode and .grad is as it was."""
    params = list(model.parameters())
    flags, grads, was_training = [p.requires_grad for p in params], [p.grad for p in params], model.training
    try:
        model.eval()
        for p in params:
            p.grad = None
            p.requires_grad_(p.requires_grad or all_params)
        with torch.enable_grad():
            yield
    finally:
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        model.train(was_training)

def trace_norms(model, example_sets: dict, trace_batch=1, device=None, all_params=False) -> dict:
    """{name: ({unit: mean gradient norm}, backward passes)} for named sets of (idx, targets) examples, over
    the parameters that require grad (a LoRA model: its adapters), or all of them with all_params."""
    if trace_batch < 1:
        raise ValueError("trace_batch must be >= 1")
    for name, examples in example_sets.items():
        if not examples or any(len(i) != len(t) or all(v == -1 for v in t) for i, t in examples):
            raise ValueError(f"{name}: needs examples of equal-length idx/targets with at least one target")
    device, out = device or next(model.parameters()).device, {}
    # Why one example per backward by default: the method averages per-example norms. A batch's gradient is a
    # mean of per-example gradients whose directions partly cancel, so its norm shrinks with the batch, and
    # differently for the span loss (few, similar tokens) than for the LM loss (many): rgn would then measure
    # the batching, not the knowledge. trace_batch > 1 is faster but only an approximation.
    with _tracing(model, all_params), GradNormHooks(model) as hooks:
        for name, examples in example_sets.items():
            total, n = {}, 0
            for i in range(0, len(examples), trace_batch):
                x, y = data.collate(examples[i:i + trace_batch], device)  # (B, T) each
                hooks.reset()
                with autocast(device):
                    _, loss = model(x, y)
                loss.backward()  # the hooks record each parameter's norm and drop its grad
                total = {u: total.get(u, 0.0) + v for u, v in hooks.norms().items()}
                n += 1
            out[name] = ({u: v / n for u, v in total.items()}, n)
    return out

def result(span, lm) -> dict:
    """A trace from the span and LM norms, each ({unit: mean norm}, passes)."""
    # The ratio, not the span norm alone, is what the method ranks: some units have large gradients for any
    # text (embeddings, the first block). Dividing by the LM norm asks "where does *this knowledge* pull
    # harder than ordinary language does?". An LM norm of exactly 0 gives rgn 0 (JSON has no inf).
    (s, n_span), (m, n_lm) = span, lm
    return {"units": list(s), "span_norm": s, "lm_norm": m, "n_span": n_span, "n_lm": n_lm,
            "rgn": {u: s[u] / m[u] if m[u] > 0 else 0.0 for u in s}}

def trace(model, span_examples, lm_windows, trace_batch=1, device=None, all_params=False) -> dict:
    """Span norm, LM norm and rgn per unit, from data.span_example examples and LM windows w as (w[:-1], w[1:])."""
    t = trace_norms(model, {"span": span_examples, "lm": lm_windows}, trace_batch, device, all_params)
    return result(t["span"], t["lm"])

# ----------------------------------------------------------------------------- step 2: selection

DEFAULT_FLOOR = 0.01  # ALR's smallest LR scale: no unit is frozen by ALR unless --floor 0 asks for it

@dataclass
class Selection:
    """How a trace becomes TGL's per-unit choice, for trace.py and train.py. The paper leaves these open: flags."""
    select: str = flag("mean", "fp rule: mean (rgn above the mean), topk:K or frac:F")
    # Default blocks: the paper's figures and selection are per layer, and letting FP freeze the tied
    # embedding cost more learning than anything else tried; embed and ln_f then always train.
    rank_units: str = flag("blocks", "units ranked: all, blocks, attn, mlp or a list; the others always train")
    alr_norm: str = flag("max", "alr scale: rgn/max (paper) or rgn/mean capped at 1", choices=["max", "mean"])
    floor: float = flag(DEFAULT_FLOOR, "alr: smallest LR scale (0 lets alr freeze units)", type=number("[0, 1]"))
    trace_split: str = flag("all", "the traced split whose rgn selects (all, updated, new, ...)")
    control: str = flag("none", "none, complement or random:SEED (see tgl_plan)")

    def check(self):
        """Raise ValueError naming the flag at fault, before any slow work."""
        rule(self.select)
        if self.alr_norm not in ("max", "mean") or not 0 <= self.floor <= 1:
            raise ValueError(f"--alr-norm must be max or mean and --floor in [0, 1], got {self.alr_norm}, {self.floor}")
        kind, _, seed = self.control.partition(":")
        if self.control not in ("none", "complement") and not (kind == "random" and seed.lstrip("-").isdigit()):
            raise ValueError(f"bad --control {self.control!r}: use none, complement or random:SEED (an integer)")
        return self

def rule(text: str):
    """--select: 'mean' | 'topk:K' (K >= 1) | 'frac:F' (0 < F <= 1) -> (kind, value)."""
    kind, _, val = text.partition(":")
    try:
        if (kind, val) == ("mean", ""):
            return "mean", None
        if kind == "topk" and int(val) >= 1:
            return "topk", int(val)
        if kind == "frac" and 0 < float(val) <= 1:
            return "frac", float(val)
    except ValueError:
        pass
    raise ValueError(f"bad --select {text!r}: use mean, topk:K (K >= 1) or frac:F (0 < F <= 1)")

def resolve_units(spec: str, units) -> list:
    """--rank-units: all | blocks | attn | mlp | a comma list of unit names."""
    pick = {"all": lambda u: True, "blocks": lambda u: u.startswith("h."), "attn": lambda u: u.endswith(".attn"),
            "mlp": lambda u: u.endswith(".mlp")}.get(spec)
    chosen = [u for u in units if pick(u)] if pick else [u.strip() for u in spec.split(",") if u.strip()]
    if not chosen or any(u not in units for u in chosen):
        raise ValueError(f"bad --rank-units {spec!r}: use all, blocks, attn, mlp or unit names from {list(units)}")
    return chosen

def select(rgn: dict, mode="fp", rule_="mean", units=None, alr_norm="max", floor=DEFAULT_FLOOR) -> dict:
    """{unit: scale} from relative norms; only `units` (default: all) are ranked, the others keep 1.0.
    fp:  1.0 selected, 0.0 frozen. mean: rgn above the mean of the ranked units (all kept if none is);
         topk:K the K largest; frac:F the ceil(F * n) largest (ties go to the earlier unit).
    alr: rgn / max (the paper) or min(1, rgn / mean) (capped: no unit above the tuned lr), at least floor."""
    ranked = list(rgn) if units is None else list(units)
    if not ranked or any(u not in rgn for u in ranked):
        raise ValueError(f"ranked units {ranked} must be a non-empty subset of {list(rgn)}")
    values, scales = [rgn[u] for u in ranked], {u: 1.0 for u in rgn}
    if mode == "fp":  # TGL+FP: train the units where new knowledge pulls hardest, freeze the rest
        kind, value = rule(rule_)
        if kind == "mean":  # the paper's rule: the count adapts to how peaked the trace is
            chosen = {u for u in ranked if rgn[u] > sum(values) / len(values)} or set(ranked)
        else:
            k = value if kind == "topk" else max(1, math.ceil(value * len(ranked)))
            chosen = set(sorted(ranked, key=lambda u: -rgn[u])[:k])  # a stable sort: ties by network order
        return dict(scales, **{u: float(u in chosen) for u in ranked})
    # TGL+ALR: every unit trains, at a learning rate proportional to its rgn; the most wanted at the full lr
    ref = max(values) if alr_norm == "max" else sum(values) / len(values)
    return dict(scales, **{u: max(floor, min(1.0, rgn[u] / ref)) if ref > 0 else 1.0 for u in ranked})

def control(scales: dict, mode: str, spec: str, ranked: list) -> dict:
    """The controls ask "does the trace pick better units than chance?"; unranked units are untouched.
    complement (fp): the ranked units TGL would freeze train, and those it would train are frozen.
    random:S: fp, as many ranked units as TGL picks, drawn with seed S; alr, TGL's scales shuffled among them."""
    if spec == "none":
        return scales
    if spec == "complement":
        if mode != "fp":
            raise ValueError("--control complement applies to --tgl fp (alr has no complement); use random:SEED")
        return dict(scales, **{u: 1.0 - scales[u] for u in ranked})
    rng = random.Random(int(spec.split(":")[1]))
    if mode == "fp":
        chosen = set(rng.sample(ranked, sum(1 for u in ranked if scales[u] > 0)))
        return dict(scales, **{u: float(u in chosen) for u in ranked})
    shuffled = [scales[u] for u in ranked]
    rng.shuffle(shuffled)
    return dict(scales, **dict(zip(ranked, shuffled)))

def tgl_plan(trace: dict, mode: str, sel: Selection, units: list) -> dict:
    """THE place where TGL decides: a trace -> {unit: lr scale} for every unit of a model with these
    `units`; 0 = frozen (TGL+FP), 0 < s <= 1 = the unit trains at lr * s (TGL+ALR). train.py hands it
    to the optimizer (and, under LoRA, puts adapters only where s > 0); trace.py records it."""
    if mode not in ("fp", "alr"):
        raise ValueError(f"mode must be fp or alr, got {mode!r}")
    rgn = trace["rgn"] if sel.trace_split == "all" else trace.get("splits", {}).get(sel.trace_split, {}).get("rgn")
    if rgn is None:
        raise ValueError(f"trace has no split {sel.trace_split!r} (has: {', '.join(trace.get('splits', {})) or 'all'})")
    if sorted(rgn) != sorted(units):
        raise ValueError(f"trace units {sorted(rgn)} do not match this model's units {units}: traced another model?")
    bad = [u for u, v in rgn.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
    if bad:  # a NaN would make every comparison False and TGL a silent no-op
        raise ValueError(f"trace rgn of {bad[0]} is {rgn[bad[0]]!r}, not a finite number >= 0: re-run trace.py")
    ranked = resolve_units(sel.rank_units, units)
    scales = select(rgn, mode, sel.select, ranked, sel.alr_norm, sel.floor)
    return control(scales, mode, sel.control, ranked)

# ----------------------------------------------------------------------------- probe files in, trace file out

@dataclass
class TraceConfig:
    """trace.py's flags."""
    init: str = flag(None, "model: run folder, ckpt.pt, local HF folder or hub name", required=True)
    probes: list = flag([], "diagnostic probe files (any format data.read_probes reads)", nargs="+", required=True)
    text: str = flag(None, "old (pretraining-like) text for the LM windows: file or folder", required=True)
    out: str = flag(None, "trace JSON to write", required=True)
    tokenizer: str = flag(None, "tokenizer for data.load_tokenizer (default: from --init)")
    n_span: int = flag(100, "probes traced per split (a seeded sample if more)", type=number("[1, inf)", int))
    n_lm: int = flag(100, "random LM windows traced", type=number("[1, inf)", int))
    block_size: int = flag(None, "LM window length (default: the model's context)", type=number("[1, inf)", int))
    trace_batch: int = flag(1, "examples per backward; >1 is faster but approximate", type=number("[1, inf)", int))
    split_by: str = flag("probe", "splits from each probe's split field, or one per file", choices=["probe", "file"])
    all_params: bool = flag(False, "trace every parameter, not only those that require grad (LoRA: adapters)")
    seed: int = flag(0, "seed of the probe sample and the LM windows")
    device: str = flag("auto", "cpu, cuda, mps or auto")
    selection: Selection = field(default_factory=Selection)

def probe_sets(cfg: TraceConfig, tokenizer, block_size: int) -> dict:
    """{split: [(idx, targets)]}: up to n_span probes per split, a sample seeded by (seed, split); each
    probe's first gold answer, cut to the last block_size tokens (the answer is at the end)."""
    groups = {}
    for p in data.read_probe_files(cfg.probes):  # same-named splits of two files never merge
        groups.setdefault(p.split if cfg.split_by == "probe" and p.split else Path(p.source).stem, []).append(p)
    if not groups or "all" in groups:
        raise ValueError("no probes in the probe files" if not groups else "a probe split may not be named 'all'")
    sets = {}
    for name, probes in groups.items():
        if len(probes) > cfg.n_span:
            probes = [probes[i] for i in sorted(random.Random(f"{cfg.seed}:{name}").sample(range(len(probes)), cfg.n_span))]
        examples = [data.span_example(tokenizer, p.prompt, p.answers[0]) for p in probes]
        sets[name] = [(i[-block_size:], t[-block_size:]) for i, t in examples if any(v != -1 for v in t[-block_size:])]
    return sets

def trace_files(model, tokenizer, cfg: TraceConfig, device=None) -> dict:
    """Trace probe files against old text: per split and all splits together, against one shared set of LM
    windows. Returns a trace (top level = "all") with its "splits", what was traced and TGL's selection."""
    block_size = cfg.block_size or model.config.block_size
    if not 1 <= block_size <= model.config.block_size:
        raise ValueError(f"--block-size must be in 1..{model.config.block_size}, got {block_size}")
    units = unit_names(model.config.n_layer)
    resolve_units(cfg.selection.check().rank_units, units)  # bad flags fail before the slow part
    sets = probe_sets(cfg, tokenizer, block_size)
    tokens = data.load_tokens(cfg.text, tokenizer)
    x, y = data.windows(tokens, data.random_starts(len(tokens), cfg.n_lm, block_size, cfg.seed), block_size)
    sets["\0lm"] = list(zip(x.tolist(), y.tolist()))  # (n_lm, T) windows as token lists
    if max(max(i) for s in sets.values() for i, _ in s) >= model.config.vocab_size:
        raise ValueError(f"a token id is outside the model's vocabulary ({model.config.vocab_size}): wrong --tokenizer?")
    norms = trace_norms(model, sets, cfg.trace_batch, device, cfg.all_params)  # step 1, probes and windows alike
    lm = norms.pop("\0lm")
    splits = {name: result(span, lm) for name, span in norms.items()}
    n = sum(c for _, c in norms.values())  # all splits: the mean over every probe traced
    splits["all"] = result(({u: sum(s[u] * c for s, c in norms.values()) / n for u in lm[0]}, n), lm)
    d = dict(splits["all"], splits=splits, model=cfg.init, probe_files=cfg.probes, text=cfg.text, seed=cfg.seed,
             counts={"span": {k: len(v) for k, v in sets.items() if k != "\0lm"}, "lm": cfg.n_lm},
             trace_batch=cfg.trace_batch, block_size=block_size, split_by=cfg.split_by, all_params=cfg.all_params)
    # step 2: the selection this trace implies, recorded so that the file says what TGL would do with it
    d["selection"] = dict(asdict(cfg.selection), fp=tgl_plan(d, "fp", cfg.selection, units),
                          alr=tgl_plan(d, "alr", cfg.selection, units))
    return d

def load_trace(path) -> dict:
    """A trace file, checked: a dict with 'rgn' {unit: number}; anything else is one clear error."""
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("rgn"), dict):
        raise ValueError(f"{path}: not a trace file (no 'rgn' per unit)")
    return d

# ----------------------------------------------------------------------------- report

def report(d: dict) -> str:
    """A row per unit: span norm, LM norm, rgn (all probes, then per split), the FP mask, the ALR scale.
    (python -m experiments.plot --trace FILE draws it as the paper's Figure 2.)"""
    sel, splits = d["selection"], [s for s in d["splits"] if s != "all"]
    head = f"{'unit':<10} {'span':>10} {'lm':>10} {'rgn':>7}" + "".join(f" {s[:9]:>9}" for s in splits) + "  fp   alr"
    rows = [head, "-" * len(head)]
    for u in d["units"]:
        row = f"{u:<10} {d['span_norm'][u]:>10.4g} {d['lm_norm'][u]:>10.4g} {d['rgn'][u]:>7.3f}"
        rows.append(row + "".join(f" {d['splits'][s]['rgn'][u]:>9.3f}" for s in splits)
                    + f"  {'yes' if sel['fp'][u] else ' - ':<4} {sel['alr'][u]:.3f}")
    return "\n".join(rows)

def main(argv=None) -> dict:
    parser = Parser(prog="trace.py", description=__doc__.split("\n")[0])
    add_flags(parser, TraceConfig)
    cfg = from_args(TraceConfig, parser.parse_args(argv))
    with input_errors("trace.py"):  # the one error path: bad input is one line, bugs keep their traceback
        cfg.selection.check()
        check_output(cfg.out, "--out")
        for f in cfg.probes + [cfg.text]:  # probe files; the text may be a file or a folder
            if not (Path(f).is_file() or (f == cfg.text and Path(f).is_dir())):
                raise ValueError(f"{f}: no such file")
        device = pick_device(cfg.device)
        model = load_model(cfg.init, device)
        d = trace_files(model, data.load_tokenizer(cfg.tokenizer or cfg.init), cfg, device)
        write_text(cfg.out, json.dumps(d, indent=1))
        print(report(d) + f"\n\nwrote {cfg.out}")
    return d

if __name__ == "__main__":
    main()
