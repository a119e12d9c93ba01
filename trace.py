"""Trace where new knowledge wants to go: per-unit gradient norms, relative norms, unit selection.

This file is steps 1 and 2 of the method (README, "What TGL is"); train.py is step 3.
  1. Trace. For every unit u (embed, h.{i}.attn, h.{i}.mlp, ln_f; see model.unit_of):
         span_norm[u] = mean over probes of ||grad_u L_span||   (loss on the answer tokens only)
         lm_norm[u]   = mean over random old-text windows of ||grad_u L_lm||
         rgn[u]       = span_norm[u] / lm_norm[u]
  2. Select. tgl_plan() turns a trace into what the optimizer gets: the TGL+FP freeze mask or the
     TGL+ALR learning-rate scales, one number per unit. It is the one place a TGL choice is made.

    python trace.py --init RUN --probes diag_updated.jsonl diag_new.jsonl --text t0.txt --out trace.json --plot trace.png
"""
import json
import math
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common import Parser, check_output, fail, input_errors, read_json, write_text
from model import autocast, load_model, pick_device, unit_names, unit_of, unwrap

# ----------------------------------------------------------------------------- hooks

class GradNormHooks:
    """One hand-written hook per parameter that records ||grad|| per parameter; read per unit.

    Hooks are `register_post_accumulate_grad_hook`s: they fire once per backward per parameter,
    after autograd has summed every use of it (the tied wte/lm_head is one Parameter: one call,
    one norm) and accumulated the result into p.grad. Each call *overwrites* the parameter's
    record with ||p.grad||, so what is read is the norm of the gradient as it stands in .grad:
    - free_grads=True (trace): the hook drops p.grad after reading it, so every backward starts from
      an empty .grad and records that backward's gradient alone; no .grad is ever kept.
    - free_grads=False (training): under gradient accumulation the record after the last
      micro-step is the norm of the full accumulated gradient, which is what the optimizer steps
      with (before clipping). Set `.enabled = False` for earlier micro-steps to skip their norms.
      Under DDP the hook sees the local gradient before the all-reduce: use unit_grad_norms(model).
    Norms stay on the device as 0-d tensors; reading (.sq_norms / .norms) syncs once.
    Only parameters that require grad when the hooks are made get hooks; `units` lists their units.
    """

    def __init__(self, model, free_grads: bool = False):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no parameter requires grad: nothing to trace")
        owners = [unit_of(n) for n, _ in named]
        self.units = [u for u in unit_names(unwrap(model).config.n_layer) if u in owners]
        self.params = [p for _, p in named]
        self.free_grads, self.enabled, self._handles = free_grads, True, []
        device = self.params[0].device
        self._unit_idx = torch.tensor([self.units.index(u) for u in owners], device=device)  # (P,)
        self._zero = torch.zeros((), device=device)
        self.reset()

    def _hook(self, i):
        # Why a post-accumulate hook on the Parameter, not a hook on its gradient tensor: a tensor hook
        # fires once per *use* (the tied wte is used twice: embedding and LM head) and would see partial
        # gradients; this one fires once, on the finished sum, which is what the optimizer would see.
        def hook(p):
            if self.enabled:  # one reduction kernel, no sync; fp32 accumulation whatever the grad dtype
                self._norms[i] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            if self.free_grads:  # tracing: the norm is all we need, so no full gradient copy is ever held
                p.grad = None
        return hook

    def __enter__(self):
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self):
        self._norms = [self._zero] * len(self.params)

    def unit_sq(self) -> torch.Tensor:
        """(U,) squared gradient norm per unit, on the device (no sync)."""
        return per_unit_sq(self._norms, self._unit_idx, len(self.units))

    def sq_norms(self) -> dict:  # {unit: squared norm}, one sync
        return dict(zip(self.units, self.unit_sq().tolist()))

    def norms(self) -> dict:  # {unit: norm}, one sync
        return dict(zip(self.units, self.unit_sq().sqrt().tolist()))


def per_unit_sq(param_norms: list, unit_idx: torch.Tensor, n_units: int) -> torch.Tensor:
    """The one per-unit reduction: a unit's gradient norm is the 2-norm of all its parameters'
    gradients together, so its square is the sum of the parameters' squared norms. (U,) tensor."""
    per_param = torch.stack(param_norms).square()  # (P,)
    return torch.zeros(n_units, device=per_param.device).index_add_(0, unit_idx, per_param)


def unit_grad_norms(model) -> dict:
    """Per-unit norm of the gradients now in .grad (one sync). Hook-free: right after DDP's all-reduce."""
    named = [(unit_of(n), p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return {}
    units = [u for u in unit_names(unwrap(model).config.n_layer) if u in {u for u, _ in named}]
    idx = torch.tensor([units.index(u) for u, _ in named], device=named[0][1].device)
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for _, g in named]
    return dict(zip(units, per_unit_sq(norms, idx, len(units)).sqrt().tolist()))


# ----------------------------------------------------------------------------- trace

@contextmanager
def _tracing(model, all_params: bool):
    """Eval mode (dropout off: the norms are of the model's gradient, not of a random sub-network),
    grads on, old .grad set aside; on exit every flag, mode and .grad is as it was."""
    params = list(model.parameters())
    flags, grads, was_training = [p.requires_grad for p in params], [p.grad for p in params], model.training
    try:
        model.eval()
        for p in params:
            p.grad = None
            if all_params:
                p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag, g in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = g
        model.train(was_training)


def _collate(examples, device):
    """Right-pad a list of (idx, targets) to one (B, T) batch; padding has target -1, and with a
    causal model right padding does not change the real positions' logits."""
    T = max(len(idx) for idx, _ in examples)
    x = torch.zeros(len(examples), T, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, (idx, tgt) in enumerate(examples):
        x[b, :len(idx)], y[b, :len(tgt)] = torch.tensor(idx), torch.tensor(tgt)
    return x.to(device), y.to(device)


def _sum_norms(model, hooks, examples, trace_batch, device):
    """Sum over backward passes of the per-unit gradient norm: ((U,) tensor, number of passes).
    trace_batch=1: one example per backward, exact. trace_batch=B: the norm of the gradient of the
    batch loss (mean NLL over all target tokens of B examples), i.e. the norm of a mean gradient,
    which is smaller than the mean of per-example norms: faster, but only an approximation."""
    total = torch.zeros(len(hooks.units), device=device)
    n = 0
    # Why one example per backward by default: the method averages per-example norms. The gradient of a
    # batch is a mean of per-example gradients whose directions partly cancel, so its norm shrinks with the
    # batch size, and differently for the span loss (few, similar tokens) and the LM loss (many tokens):
    # rgn would then measure the batching, not the knowledge.
    for i in range(0, len(examples), trace_batch):
        x, y = _collate(examples[i:i + trace_batch], device)  # (B, T) each
        hooks.reset()
        with autocast(device):
            _, loss = model(x, y)
        loss.backward()  # the hooks record each parameter's norm and drop its grad
        total += hooks.unit_sq().sqrt()
        n += 1
    return total, n


def trace_norms(model, example_sets: dict, trace_batch=1, device=None, all_params=False):
    """Trace several named sets of (idx, targets) examples in one go.
    Returns (units, {name: (U,) sum of norms}, {name: number of backward passes})."""
    if trace_batch < 1:
        raise ValueError("trace_batch must be >= 1")
    for name, examples in example_sets.items():
        if not examples:
            raise ValueError(f"no examples to trace in {name!r}")
        for k, (idx, tgt) in enumerate(examples):
            if len(idx) != len(tgt) or all(t == -1 for t in tgt):
                raise ValueError(f"{name} example {k}: needs equal-length idx/targets with at least one target")
    device = device or next(model.parameters()).device
    # span examples and LM windows go through the same hooks and the same model state, so the ratio of their
    # norms compares like with like
    with _tracing(model, all_params), GradNormHooks(model, free_grads=True) as hooks:
        sums, counts = {}, {}
        for name, examples in example_sets.items():
            sums[name], counts[name] = _sum_norms(model, hooks, examples, trace_batch, device)
    return hooks.units, sums, counts


def _result(units, span_sum, n_span, lm_sum, n_lm) -> dict:
    span, lm = (span_sum / n_span).tolist(), (lm_sum / n_lm).tolist()  # the one sync
    # The ratio, not the span norm alone, is what the method ranks: some units have large gradients for any
    # text (embeddings, the first block). Dividing by the LM norm asks "where does *this knowledge* pull
    # harder than ordinary language does?". A unit whose LM gradient is exactly 0 gets rgn 0 (JSON has no
    # inf); it cannot happen for a real model.
    rgn = [span_u / lm_u if lm_u > 0 else 0.0 for span_u, lm_u in zip(span, lm)]
    return {"units": units, "span_norm": dict(zip(units, span)), "lm_norm": dict(zip(units, lm)),
            "rgn": dict(zip(units, rgn)), "n_span": n_span, "n_lm": n_lm}


def trace(model, span_examples, lm_windows, trace_batch=1, device=None, all_params=False) -> dict:
    """Per-unit span norm, LM norm and relative norm. span_examples and lm_windows are lists of
    (idx, targets) token lists (data.span_example; an LM window w gives (w[:-1], w[1:])).
    Traces the parameters that require grad (a LoRA model: its adapters), or all with all_params.
    Runs in eval mode; weights, .grad, requires_grad and train/eval mode are left as they were."""
    units, sums, counts = trace_norms(model, {"span": span_examples, "lm": lm_windows}, trace_batch, device, all_params)
    return _result(units, sums["span"], counts["span"], sums["lm"], counts["lm"])


# ----------------------------------------------------------------------------- selection (step 2)

DEFAULT_FLOOR = 0.01  # ALR: smallest LR scale, so no unit is frozen by ALR unless --floor 0 asks for it
CONTROLS = ("none", "complement", "random:SEED")


@dataclass
class Selection:
    """How a trace becomes TGL's per-unit choice. One definition, shared by trace.py and train.py
    (add_selection_args declares the flags once). The paper leaves these choices open; each is a flag."""
    select: str = "mean"         # fp rule: mean (rgn above the mean of the ranked units), topk:K, frac:F
    # which units compete: all, blocks, attn, mlp or a comma list. Default blocks (issue 12): the paper's
    # figures and selection are per layer, and ranking the tied embedding with the blocks let FP freeze
    # it, which cost more learning than anything else tried; embed and ln_f always train. all: ablation.
    rank_units: str = "blocks"
    alr_norm: str = "max"        # alr scale: rgn / max (paper) or min(1, rgn / mean)
    floor: float = DEFAULT_FLOOR  # alr: smallest scale
    trace_split: str = "all"     # which traced split's rgn selects (all, updated, new, ...)
    control: str = "none"        # none | complement | random:SEED (controls for the selection, see tgl_plan)

    def check(self):
        """Raise ValueError naming the flag at fault, before any slow work."""
        parse_rule(self.select)
        if self.alr_norm not in ("max", "mean"):
            raise ValueError(f"--alr-norm must be max or mean, got {self.alr_norm!r}")
        if not 0 <= self.floor <= 1:  # also false for NaN
            raise ValueError(f"--floor must be in [0, 1], got {self.floor}")
        kind, _, seed = self.control.partition(":")
        if not (self.control in ("none", "complement") or (kind == "random" and seed.lstrip("-").isdigit())):
            raise ValueError(f"bad --control {self.control!r}: use none, complement or random:SEED (an integer)")
        return self


def add_selection_args(parser):
    """The selection flags, declared once for trace.py and train.py: --select, --rank-units, --alr-norm,
    --floor, --trace-split, --control. selection_from_args() reads them back."""
    d, g = Selection(), parser.add_argument_group("TGL selection (how a trace becomes frozen units or LR scales)")
    g.add_argument("--select", default=d.select, help="fp rule: mean (rgn above the mean), topk:K or frac:F")
    g.add_argument("--rank-units", default=d.rank_units, help="units ranked by the selection: all, blocks, attn, mlp "
                   "or a comma list; units not ranked always train")
    g.add_argument("--alr-norm", choices=["max", "mean"], default=d.alr_norm,
                   help="alr scale: rgn/max (paper) or rgn/mean capped at 1")
    g.add_argument("--floor", type=float, default=d.floor, help="alr: smallest LR scale (0 lets alr freeze units)")
    g.add_argument("--trace-split", default=d.trace_split, help="which traced split's relative norms select units "
                   "(all, updated, new, ...)")
    g.add_argument("--control", default=d.control, help="a control for the selection: none; complement (fp: train "
                   "the ranked units TGL would freeze); random:SEED (fp: as many ranked units as TGL picks, drawn at "
                   "random; alr: TGL's scales shuffled among the ranked units)")
    return g


def selection_from_args(args) -> Selection:
    return Selection(args.select, args.rank_units, args.alr_norm, args.floor, args.trace_split, args.control).check()


def parse_rule(rule: str):
    """'mean' | 'topk:K' (K >= 1) | 'frac:F' (0 < F <= 1) -> (kind, value)."""
    kind, _, val = rule.partition(":")
    try:
        if kind == "mean" and not val:
            return "mean", None
        if kind == "topk" and int(val) >= 1:
            return "topk", int(val)
        if kind == "frac" and 0 < float(val) <= 1:
            return "frac", float(val)
    except ValueError:
        pass
    raise ValueError(f"bad selection rule {rule!r}: use mean, topk:K (K >= 1) or frac:F (0 < F <= 1)")


def resolve_units(spec: str, units) -> list | None:
    """--rank-units: all (None) | blocks | attn | mlp | a comma list of unit names."""
    if spec == "all":
        return None
    pick = {"blocks": lambda u: u.startswith("h."), "attn": lambda u: u.endswith(".attn"),
            "mlp": lambda u: u.endswith(".mlp")}.get(spec)
    chosen = [u for u in units if pick(u)] if pick else [u.strip() for u in spec.split(",") if u.strip()]
    unknown = [u for u in chosen if u not in units]
    if unknown or not chosen:
        raise ValueError(f"bad --rank-units {spec!r}: use all, blocks, attn, mlp or unit names from {list(units)}")
    return chosen


def select(rgn: dict, mode: str = "fp", rule: str = "mean", units=None, alr_norm: str = "max",
           floor: float = DEFAULT_FLOOR) -> dict:
    """{unit: scale} from relative norms. Only `units` (default: all) are ranked; the others keep
    scale 1.0 (trained as usual), so e.g. ranking only blocks never freezes embed or ln_f.
    fp:  1.0 for selected units, 0.0 frozen. rule mean: rgn > mean over ranked units (if all are
         equal, none is above the mean and all are kept); topk:K the K largest; frac:F the
         ceil(F * n) largest (ties go to the earlier unit).
    alr: rgn / max (alr_norm max, the paper) or min(1, rgn / mean) (alr_norm mean: capped at 1 so no
         unit's LR exceeds the tuned base LR), then at least `floor` (0 allows frozen units)."""
    ranked = list(rgn) if units is None else list(units)
    if not ranked or any(u not in rgn for u in ranked):
        raise ValueError(f"ranked units {ranked} must be a non-empty subset of {list(rgn)}")
    values = [rgn[u] for u in ranked]
    scales = {u: 1.0 for u in rgn}
    if mode == "fp":  # TGL+FP: train the units where new knowledge pulls hardest, freeze the rest
        kind, value = parse_rule(rule)
        if kind == "mean":  # the paper's rule: above-average units, so the count adapts to how peaked the trace is
            mean = sum(values) / len(values)
            chosen = {u for u in ranked if rgn[u] > mean} or set(ranked)
        else:
            k = value if kind == "topk" else max(1, math.ceil(value * len(ranked)))
            chosen = set(sorted(ranked, key=lambda u: -rgn[u])[:k])  # sorted is stable: ties by order
        scales.update({u: float(u in chosen) for u in ranked})
    elif mode == "alr":  # TGL+ALR: every unit trains, at a learning rate proportional to its rgn
        if alr_norm not in ("max", "mean") or not 0 <= floor <= 1:
            raise ValueError(f"alr_norm must be max or mean (got {alr_norm!r}) and 0 <= floor <= 1 (got {floor})")
        # relative to the largest rgn, the most "wanted" unit trains at the full lr and the others slower
        ref = max(values) if alr_norm == "max" else sum(values) / len(values)
        scales.update({u: max(floor, min(1.0, rgn[u] / ref)) if ref > 0 else 1.0 for u in ranked})
    else:
        raise ValueError(f"mode must be fp or alr, got {mode!r}")
    return scales




def tgl_plan(trace: dict, mode: str, sel: Selection, units: list) -> dict:
    """THE place where TGL decides: a trace (from trace_files or a trace.json) -> {unit: lr scale} for
    every unit of a model with these `units`. 0 = frozen (TGL+FP), 0 < s <= 1 = the unit's LR is
    lr * s (TGL+ALR). train.py hands this to make_param_groups (and, under LoRA, to add_lora: adapters
    only where s > 0); trace.py records it in the trace file and marks it in the report.

    Controls (sel.control) answer "does the trace pick better units than chance?":
      complement  fp: the ranked units TGL would freeze train, and those it would train are frozen.
      random:S    fp: the same number of ranked units as TGL picks, drawn with seed S.
                  alr: TGL's scales, shuffled among the ranked units with seed S.
    Units that are not ranked keep scale 1 in every case, so only the choice among ranked units differs."""
    rgn = trace["rgn"] if sel.trace_split == "all" else trace.get("splits", {}).get(sel.trace_split, {}).get("rgn")
    if rgn is None:
        raise ValueError(f"trace has no split {sel.trace_split!r} (has: {', '.join(trace.get('splits', {})) or 'all only'})")
    if sorted(rgn) != sorted(units):
        raise ValueError(f"trace units {sorted(rgn)} do not match this model's units {units}: traced another model?")
    bad = [u for u, v in rgn.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
    if bad:  # a NaN would make every comparison False and TGL a silent no-op
        raise ValueError(f"trace rgn of {bad[0]} is {rgn[bad[0]]!r}, not a finite number >= 0: re-run trace.py")
    ranked = resolve_units(sel.rank_units, units)
    scales = select(rgn, mode, sel.select, ranked, sel.alr_norm, sel.floor)
    if sel.control == "none":
        return scales
    ranked = ranked or list(units)
    if sel.control == "complement":
        if mode != "fp":
            raise ValueError("--control complement applies to --tgl fp (alr has no complement); use random:SEED")
        return {u: (1.0 - s if u in ranked else s) for u, s in scales.items()}
    rng = random.Random(int(sel.control.split(":")[1]))
    if mode == "fp":  # same size as TGL's pick, units drawn uniformly among the ranked ones
        k = sum(1 for u in ranked if scales[u] > 0)
        chosen = set(rng.sample(ranked, k))
        return {u: (float(u in chosen) if u in ranked else s) for u, s in scales.items()}
    shuffled = [scales[u] for u in ranked]
    rng.shuffle(shuffled)
    return dict(scales, **dict(zip(ranked, shuffled)))


# ----------------------------------------------------------------------------- files

def _span_examples(probes, tokenizer, block_size):
    out = []
    for p in probes:  # the first gold answer is traced; the prompt without its context
        idx, tgt = data_module().span_example(tokenizer, p.prompt, p.answers[0])
        idx, tgt = idx[-block_size:], tgt[-block_size:]  # keep the answer if the prompt is too long
        if any(t != -1 for t in tgt):
            out.append((idx, tgt))
    return out


def lm_windows(tokens, n: int, block_size: int, seed: int) -> list:
    """n random (x, y) windows of block_size tokens as token lists, the same for the same seed."""
    data = data_module()
    x, y = data.windows(tokens, data.random_starts(len(tokens), n, block_size, seed), block_size)  # (n, T) each
    return list(zip(x.tolist(), y.tolist()))


def data_module():  # imported late: the trace core (hooks, trace, select) needs no data.py
    import data
    return data


@dataclass
class TraceOptions:
    """What trace_files traces and how; trace.py's flags map one to one."""
    n_span: int = 100            # probes traced per split (a seeded sample if the split has more)
    n_lm: int = 100              # random LM windows of old text
    seed: int = 0                # seeds the probe sample and the windows
    trace_batch: int = 1         # examples per backward: 1 is exact (per-example norms), >1 approximates
    block_size: int | None = None  # LM window length; None = the model's context
    split_by: str = "probe"      # a split per Probe.split, or per probe file ("file")
    all_params: bool = False     # trace every parameter, not only those that require grad (LoRA: adapters)
    selection: Selection = field(default_factory=Selection)


def _probe_sets(probe_paths, tokenizer, opts: TraceOptions, block_size: int) -> dict:
    """{split: [(idx, targets)]}: up to n_span probes per split, a sample seeded by (seed, split)."""
    groups = {}
    for p in data_module().read_probe_files(probe_paths):  # same-named splits of two files never merge
        groups.setdefault(p.split if opts.split_by == "probe" and p.split else Path(p.source).stem, []).append(p)
    if not groups or "all" in groups:
        raise ValueError("no probes in the probe files" if not groups else "a probe split may not be named 'all'")
    sets = {}
    for name, probes in groups.items():
        rng = random.Random(f"{opts.seed}:{name}")
        keep = sorted(rng.sample(range(len(probes)), opts.n_span)) if len(probes) > opts.n_span else range(len(probes))
        sets[name] = _span_examples([probes[i] for i in keep], tokenizer, block_size)
    return sets


def trace_files(model, tokenizer, probe_paths, text_path, opts: TraceOptions = None, device=None) -> dict:
    """Trace probe files against old text: per split and all splits together, against one shared set
    of LM windows. Used by trace.py's CLI and by train.py --trace-probes.
    Returns a trace dict (top level = "all") with "splits", what was traced, and TGL's selection."""
    opts = opts or TraceOptions()
    block_size = opts.block_size or model.config.block_size
    if not 1 <= block_size <= model.config.block_size:
        raise ValueError(f"--block-size must be in 1..{model.config.block_size}, got {block_size}")
    units = unit_names(model.config.n_layer)
    resolve_units(opts.selection.rank_units, units)  # bad flags fail before the slow part
    sets = _probe_sets(probe_paths, tokenizer, opts, block_size)
    tokens = data_module().load_tokens(text_path, tokenizer)
    sets["\0lm"] = lm_windows(tokens, opts.n_lm, block_size, opts.seed)
    top = max(max((max(x) for x, _ in s), default=0) for s in sets.values())
    if top >= model.config.vocab_size:
        raise ValueError(f"token id {top} is outside the model's vocabulary ({model.config.vocab_size}): wrong --tokenizer?")

    # step 1 of the method: per-unit gradient norms, probe answers and LM windows alike
    units, sums, counts = trace_norms(model, sets, opts.trace_batch, device, opts.all_params)
    lm_sum, n_lm_passes = sums.pop("\0lm"), counts.pop("\0lm")
    splits = {name: _result(units, sums[name], counts[name], lm_sum, n_lm_passes) for name in sums}
    splits["all"] = _result(units, sum(sums.values()), sum(counts.values()), lm_sum, n_lm_passes)
    d = dict(splits["all"])
    d.update(splits=splits, probe_files=[str(p) for p in probe_paths], text=str(text_path), seed=opts.seed,
             counts={"span": {k: len(v) for k, v in sets.items() if k != "\0lm"}, "lm": opts.n_lm},
             trace_batch=opts.trace_batch, block_size=block_size, split_by=opts.split_by, all_params=opts.all_params,
             model_config={k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")})
    # step 2: the selection this trace implies, recorded so the file says what TGL would do with it
    sel = opts.selection
    d["selection"] = dict(asdict(sel), rule=sel.select, fp=tgl_plan(d, "fp", sel, units), alr=tgl_plan(d, "alr", sel, units))
    return d


def save_trace(path, d: dict):
    """Atomic: a half-written trace never replaces a good one."""
    write_text(path, json.dumps(d, indent=1))


def load_trace(path) -> dict:
    """A trace file, checked: a dict with 'rgn' {unit: number}; anything else is one clear error."""
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("rgn"), dict):
        raise ValueError(f"{path}: not a trace file (no 'rgn' per unit)")
    return d


# ----------------------------------------------------------------------------- report

def _layers(units) -> list:
    return sorted({int(u.split(".")[1]) for u in units if u.startswith("h.")})


def format_table(d: dict) -> str:
    """One row per unit: span norm, LM norm, rgn (all probes, then each split), FP mask, ALR scale."""
    sel, splits = d["selection"], [s for s in d["splits"] if s != "all"]
    extra = splits if len(splits) > 1 else []
    head = f"{'unit':<10} {'span':>10} {'lm':>10} {'rgn':>7}" + "".join(f" {s[:9]:>9}" for s in extra) + "  fp   alr"
    rows = [head, "-" * len(head)]
    for u in d["units"]:
        row = f"{u:<10} {d['span_norm'][u]:>10.4g} {d['lm_norm'][u]:>10.4g} {d['rgn'][u]:>7.3f}"
        row += "".join(f" {d['splits'][s]['rgn'][u]:>9.3f}" for s in extra)
        rows.append(row + f"  {'yes' if sel['fp'][u] else ' - ':<4} {sel['alr'][u]:.3f}")
    return "\n".join(rows)


def bar_chart(rgn: dict, title: str, width: int = 40, mark=()) -> str:
    """The paper's Figure 2 in text: one row for attention and one for the MLP per layer (embed and
    ln_f first and last); bar length relative to the largest rgn, '*' marks units in `mark`."""
    top = max(rgn.values()) or 1.0
    eighths = " ▏▎▍▌▋▊▉"

    def bar(v):
        full, part = divmod(round(v / top * width * 8), 8)
        return ("█" * full + (eighths[part] if part else "")).ljust(width)

    lines = [title]
    order = [("embed", "embed")] + [(f"h.{i}.{s}", (f"h.{i}" if s == "attn" else "") + f" {s}")
                                    for i in _layers(rgn) for s in ("attn", "mlp")] + [("ln_f", "ln_f")]
    for u, label in order:
        if u in rgn:
            lines.append(f"{label:>10} │{bar(rgn[u])} {rgn[u]:.3f}{' *' if u in mark else ''}")
    return "\n".join(lines)


def report(d: dict) -> str:
    parts = [format_table(d)]
    sel = Selection(**{k: d["selection"].get(k, v) for k, v in asdict(Selection()).items()})
    for name, s in d["splits"].items():
        fp = tgl_plan(d, "fp", Selection(**dict(asdict(sel), trace_split=name)), s["units"])
        parts.append(bar_chart(s["rgn"], f"\nrelative gradient norm, {name} ({s['n_span']} span / {s['n_lm']} LM passes; * = selected)",
                               mark={u for u, v in fp.items() if v}))
    return "\n".join(parts)


def need_matplotlib():
    try:
        import matplotlib
    except ImportError:
        fail("matplotlib is needed for --plot: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_png(d: dict, path):
    """Figure 2 as a PNG: per split, relative gradient norm per layer, attention and MLP bars side by side."""
    plt = need_matplotlib()
    names = list(d["splits"])
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rgn, layers = d["splits"][name]["rgn"], _layers(d["splits"][name]["rgn"])
        for off, sub in ((-0.2, "attn"), (0.2, "mlp")):
            ax.bar([i + off for i in layers], [rgn.get(f"h.{i}.{sub}", 0.0) for i in layers], width=0.4, label=sub)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("rgn")
        ax.set_xticks(layers)
    axes[-1, 0].set_xlabel("layer")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", ncol=2, fontsize=8)
    fig.suptitle("span / LM gradient norm per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    ap = Parser(prog="trace.py", description="Trace per-unit gradient norms of probe answers vs old text (TGL).")
    a, d = ap.add_argument, TraceOptions()
    a("--init", required=True, help="model: run folder, ckpt.pt, local HF folder or hub name")
    a("--probes", nargs="+", required=True, help="diagnostic probe files (any format data.read_probes reads)")
    a("--text", required=True, help="old (pretraining-like) text for the LM windows")
    a("--out", required=True, help="trace JSON to write")
    a("--tokenizer", default=None, help="tokenizer spec for data.load_tokenizer (default: from --init)")
    a("--n-span", type=int, default=d.n_span, help="probes traced per split (a seeded sample if more)")
    a("--n-lm", type=int, default=d.n_lm, help="random LM windows traced")
    a("--block-size", type=int, default=None, help="LM window length (default: the model's context)")
    a("--trace-batch", type=int, default=d.trace_batch, help="examples per backward; >1 is faster but approximate")
    a("--split-by", choices=["probe", "file"], default=d.split_by, help="splits from each probe's split field, or from file names")
    a("--all-params", action="store_true", help="trace every parameter, not only those that require grad")
    a("--seed", type=int, default=d.seed, help="seed for the probe sample and the LM windows")
    a("--device", default="auto", help="cpu, cuda, mps or auto")
    a("--plot", default=None, help="also write the per-layer bar chart as a PNG (needs matplotlib)")
    add_selection_args(ap)
    args = ap.parse_args(argv)
    if min(args.n_span, args.n_lm, args.trace_batch) < 1 or (args.block_size is not None and args.block_size < 1):
        ap.error("--n-span, --n-lm, --trace-batch and --block-size must be >= 1")
    try:
        sel = selection_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    opts = TraceOptions(args.n_span, args.n_lm, args.seed, args.trace_batch, args.block_size, args.split_by,
                        args.all_params, sel)
    return args, opts


def main(argv=None) -> dict:
    args, opts = parse_args(argv)
    with input_errors("trace.py"):  # the one error path: bad input is one line, bugs keep their traceback
        if args.plot:
            need_matplotlib()  # fail before the slow part
            check_output(args.plot, "--plot")
        check_output(args.out, "--out")
        for f in args.probes + [args.text]:  # probe files; the text may be a file or a folder
            if not (Path(f).is_file() or (f == args.text and Path(f).is_dir())):
                raise ValueError(f"{f}: no such file")
        device = pick_device(args.device)
        model = load_model(args.init, device)
        tokenizer = data_module().load_tokenizer(args.tokenizer or args.init)
        d = trace_files(model, tokenizer, args.probes, args.text, opts, device)
        d["model"] = args.init
        save_trace(args.out, d)
        print(report(d))
        print(f"\nwrote {args.out}")
        if args.plot:
            plot_png(d, args.plot)
            print(f"wrote {args.plot}")
    return d


if __name__ == "__main__":
    main()
