"""Trace where new knowledge wants to go: per-unit gradient norms, relative norms, unit selection.

For every unit u (embed, h.{i}.attn, h.{i}.mlp, ln_f; see model.unit_of):
    span_norm[u] = mean over probes of ||grad_u L_span||   (loss on the answer tokens only)
    lm_norm[u]   = mean over random old-text windows of ||grad_u L_lm||
    rgn[u]       = span_norm[u] / lm_norm[u]
and the selection it implies (TGL+FP freeze mask, TGL+ALR learning-rate scales). DESIGN.md has the method.

    python trace.py --init RUN --probes diag_updated.jsonl diag_new.jsonl --text t0.txt --out trace.json --plot trace.png
"""
import argparse
import json
import math
import os
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from common import fail, write_text
from model import autocast, load_model, unit_names, unit_of

DEFAULT_FLOOR = 0.01  # ALR: smallest LR scale, so no unit is frozen by ALR unless --floor 0 asks for it


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
        self.units = [u for u in unit_names(_n_layer(model)) if u in owners]
        self.params = [p for _, p in named]
        self.free_grads, self.enabled, self._handles = free_grads, True, []
        device = self.params[0].device
        self._unit_idx = torch.tensor([self.units.index(u) for u in owners], device=device)  # (P,)
        self._zero = torch.zeros((), device=device)
        self.reset()

    def _hook(self, i):
        def hook(p):
            if self.enabled:  # one reduction kernel, no sync; fp32 accumulation whatever the grad dtype
                self._norms[i] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            if self.free_grads:
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
        per_param = torch.stack(self._norms).square()  # (P,)
        return torch.zeros(len(self.units), device=per_param.device).index_add_(0, self._unit_idx, per_param)

    def sq_norms(self) -> dict:  # {unit: squared norm}, one sync
        return dict(zip(self.units, self.unit_sq().tolist()))

    def norms(self) -> dict:  # {unit: norm}, one sync
        return dict(zip(self.units, self.unit_sq().sqrt().tolist()))


def unit_grad_norms(model) -> dict:
    """Per-unit norm of the gradients now in .grad (one sync). Hook-free: right after DDP's all-reduce."""
    sq = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            u = unit_of(n)
            sq[u] = sq.get(u, 0) + torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
    units = [u for u in unit_names(_n_layer(model)) if u in sq]
    return dict(zip(units, torch.stack([sq[u] for u in units]).sqrt().tolist())) if units else {}


def _n_layer(model) -> int:
    return getattr(model, "module", model).config.n_layer  # DDP wraps the GPT in .module


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
    with _tracing(model, all_params), GradNormHooks(model, free_grads=True) as hooks:
        sums, counts = {}, {}
        for name, examples in example_sets.items():
            sums[name], counts[name] = _sum_norms(model, hooks, examples, trace_batch, device)
    return hooks.units, sums, counts


def _result(units, span_sum, n_span, lm_sum, n_lm) -> dict:
    span, lm = (span_sum / n_span).tolist(), (lm_sum / n_lm).tolist()  # the one sync
    # a unit whose LM gradient is exactly 0 gets rgn 0 (JSON has no inf); it cannot happen for a real model
    rgn = [s / l if l > 0 else 0.0 for s, l in zip(span, lm)]
    return {"units": units, "span_norm": dict(zip(units, span)), "lm_norm": dict(zip(units, lm)),
            "rgn": dict(zip(units, rgn)), "n_span": n_span, "n_lm": n_lm}


def trace(model, span_examples, lm_windows, trace_batch=1, device=None, all_params=False) -> dict:
    """Per-unit span norm, LM norm and relative norm. span_examples and lm_windows are lists of
    (idx, targets) token lists (data.span_example; an LM window w gives (w[:-1], w[1:])).
    Traces the parameters that require grad (a LoRA model: its adapters), or all with all_params.
    Runs in eval mode; weights, .grad, requires_grad and train/eval mode are left as they were."""
    units, sums, counts = trace_norms(model, {"span": span_examples, "lm": lm_windows}, trace_batch, device, all_params)
    return _result(units, sums["span"], counts["span"], sums["lm"], counts["lm"])


# ----------------------------------------------------------------------------- selection

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
    vals = [rgn[u] for u in ranked]
    scales = {u: 1.0 for u in rgn}
    if mode == "fp":
        kind, v = parse_rule(rule)
        if kind == "mean":
            m = sum(vals) / len(vals)
            chosen = {u for u in ranked if rgn[u] > m} or set(ranked)
        else:
            k = v if kind == "topk" else max(1, math.ceil(v * len(ranked)))
            chosen = set(sorted(ranked, key=lambda u: -rgn[u])[:k])  # sorted is stable: ties by order
        scales.update({u: float(u in chosen) for u in ranked})
    elif mode == "alr":
        if alr_norm not in ("max", "mean") or not 0 <= floor <= 1:
            raise ValueError(f"alr_norm must be max or mean (got {alr_norm!r}) and 0 <= floor <= 1 (got {floor})")
        ref = max(vals) if alr_norm == "max" else sum(vals) / len(vals)
        scales.update({u: max(floor, min(1.0, rgn[u] / ref)) if ref > 0 else 1.0 for u in ranked})
    else:
        raise ValueError(f"mode must be fp or alr, got {mode!r}")
    return scales


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


def trace_files(model, tokenizer, probe_paths, text_path, n_span=100, n_lm=100, seed=0, trace_batch=1,
                device=None, block_size=None, split_by="probe", all_params=False, rule="mean",
                rank_units="all", alr_norm="max", floor=DEFAULT_FLOOR) -> dict:
    """Trace probe files against old text: per split (Probe.split, or the file name with
    split_by='file') and all together, one shared set of LM windows. Used by the CLI and train.py.
    Returns a trace dict (top level = "all") with "splits", what was traced, and the selection."""
    block_size = block_size or model.config.block_size
    if not 1 <= block_size <= model.config.block_size:
        raise ValueError(f"block_size must be in 1..{model.config.block_size}, got {block_size}")
    resolve_units(rank_units, unit_names(model.config.n_layer))  # bad flags fail before the slow part
    groups = {}
    for path in probe_paths:
        for p in data_module().read_probes(path):
            groups.setdefault(p.split if split_by == "probe" and p.split else Path(path).stem, []).append(p)
    if not groups or "all" in groups:
        raise ValueError("no probes in the probe files" if not groups else "a probe split may not be named 'all'")
    sets = {}
    for name, probes in groups.items():  # up to n_span probes per split: a sample seeded by (seed, split)
        rng = random.Random(f"{seed}:{name}")
        keep = sorted(rng.sample(range(len(probes)), n_span)) if len(probes) > n_span else range(len(probes))
        sets[name] = _span_examples([probes[i] for i in keep], tokenizer, block_size)
    tokens = data_module().load_tokens(text_path, tokenizer)
    sets["\0lm"] = lm_windows(tokens, n_lm, block_size, seed)
    top = max(max((max(x) for x, _ in s), default=0) for s in sets.values())
    if top >= model.config.vocab_size:
        raise ValueError(f"token id {top} is outside the model's vocabulary ({model.config.vocab_size}): wrong --tokenizer?")
    units, sums, counts = trace_norms(model, sets, trace_batch, device, all_params)
    lm_sum, n_lm_passes = sums.pop("\0lm"), counts.pop("\0lm")
    splits = {name: _result(units, sums[name], counts[name], lm_sum, n_lm_passes) for name in sums}
    splits["all"] = _result(units, sum(sums.values()), sum(counts.values()), lm_sum, n_lm_passes)
    ranked = resolve_units(rank_units, units)
    d = dict(splits["all"])
    d.update(splits=splits, probe_files=[str(p) for p in probe_paths], text=str(text_path), seed=seed,
             counts={"span": {k: len(v) for k, v in sets.items() if k != "\0lm"}, "lm": n_lm},
             trace_batch=trace_batch, block_size=block_size, split_by=split_by, all_params=all_params,
             model_config={k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")})
    d["selection"] = {"rule": rule, "rank_units": rank_units, "alr_norm": alr_norm, "floor": floor,
                      "fp": select(d["rgn"], "fp", rule, ranked),
                      "alr": select(d["rgn"], "alr", rule, ranked, alr_norm, floor)}
    return d


def save_trace(path, d: dict):
    """Atomic: a half-written trace never replaces a good one."""
    write_text(path, json.dumps(d, indent=1))


def load_trace(path) -> dict:
    with open(path) as f:
        d = json.load(f)
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
    for name, s in d["splits"].items():
        fp = select(s["rgn"], "fp", d["selection"]["rule"], resolve_units(d["selection"]["rank_units"], s["units"]))
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
    ap = argparse.ArgumentParser(description="Trace per-unit gradient norms of probe answers vs old text (TGL).")
    ap.add_argument("--init", required=True, help="model: run folder, ckpt.pt, local HF folder or hub name")
    ap.add_argument("--probes", nargs="+", required=True, help="diagnostic probe files (any format data.read_probes reads)")
    ap.add_argument("--text", required=True, help="old (pretraining-like) text for the LM windows")
    ap.add_argument("--out", required=True, help="trace JSON to write")
    ap.add_argument("--tokenizer", default=None, help="tokenizer spec for data.load_tokenizer (default: from --init)")
    ap.add_argument("--n-span", type=int, default=100, help="probes traced per split (a seeded sample if more)")
    ap.add_argument("--n-lm", type=int, default=100, help="random LM windows traced")
    ap.add_argument("--block-size", type=int, default=None, help="LM window length (default: the model's context)")
    ap.add_argument("--trace-batch", type=int, default=1, help="examples per backward; >1 is faster but approximate")
    ap.add_argument("--split-by", choices=["probe", "file"], default="probe", help="splits from each probe's split field, or from file names")
    ap.add_argument("--select", default="mean", help="FP rule recorded in the JSON: mean, topk:K or frac:F")
    ap.add_argument("--rank-units", default="all", help="units ranked by the selection: all, blocks, attn, mlp or a comma list")
    ap.add_argument("--alr-norm", choices=["max", "mean"], default="max", help="ALR scale: rgn/max, or rgn/mean capped at 1")
    ap.add_argument("--floor", type=float, default=DEFAULT_FLOOR, help="smallest ALR scale (0 lets ALR freeze units)")
    ap.add_argument("--all-params", action="store_true", help="trace every parameter, not only those that require grad")
    ap.add_argument("--seed", type=int, default=0, help="seed for the probe sample and the LM windows")
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    ap.add_argument("--plot", default=None, help="also write the per-layer bar chart as a PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    if min(args.n_span, args.n_lm, args.trace_batch) < 1 or (args.block_size is not None and args.block_size < 1):
        ap.error("--n-span, --n-lm, --trace-batch and --block-size must be >= 1")
    if not 0 <= args.floor <= 1:
        ap.error("--floor must be in [0, 1]")
    try:
        parse_rule(args.select)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from model import pick_device
    if args.plot:
        need_matplotlib()  # fail before the slow part
    for f in args.probes + [args.text]:
        if not os.path.isfile(f):
            fail(f"{f}: no such file")
    device = pick_device(args.device)
    try:
        model = load_model(args.init, device)
        tokenizer = data_module().load_tokenizer(args.tokenizer or args.init)
        d = trace_files(model, tokenizer, args.probes, args.text, args.n_span, args.n_lm, args.seed,
                        args.trace_batch, device, args.block_size, args.split_by, args.all_params,
                        args.select, args.rank_units, args.alr_norm, args.floor)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
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
