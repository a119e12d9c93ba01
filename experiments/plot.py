"""The paper's figures for our runs: Figure 1 (training curves) and Figure 2 (a trace's rgn per layer).

Figure 1: loss, probe perplexity and per-unit gradient norms over training; Figure 2: a trace's relative
gradient norm per layer.

    python -m experiments.plot out/demo/seed0/runs/full+none out/demo/seed0/runs/full+fp   # terminal
    python -m experiments.plot RUN... --png figure1.png                                    # and a PNG (matplotlib)
    python -m experiments.plot --trace out/demo/seed0/trace.json --png trace.png           # Figure 2 as a PNG

Reads each run's metrics.jsonl (train.py writes a line every --log-every updates, with the
per-unit gradient norms before clipping, and the probe scores every --eval-every updates).
The terminal view is always there (one sparkline per series); the PNG needs matplotlib.
"""
import json
import math
import os
import sys
from dataclasses import fields

from common import Parser, atomic_path, check_output, fail, input_errors, number, read_text, write_text
from model import UNIT_RE, unit_names
from trace import Selection, load_trace, tgl_plan

SPARK = "▁▂▃▄▅▆▇█"


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_row(where, r):
    """One metrics line as train.py writes it: {"step": int, "loss": number, "probes": {split: {"ppl":
    number}}, "grad_norms": {unit: number}} (the last two optional); else a ValueError naming file:line."""
    if not isinstance(r, dict):
        raise ValueError(f"{where}: a JSON {type(r).__name__}, not a metrics line (want an object with "
                         "step, loss)")
    if not isinstance(r.get("step"), int) or isinstance(r["step"], bool) or r["step"] < 0:
        raise ValueError(f"{where}: step is {r.get('step')!r}, want an integer >= 0")
    if not _num(r.get("loss")):
        raise ValueError(f"{where}: loss is {r.get('loss')!r}, want a number")
    probes, grads = r.get("probes") or {}, r.get("grad_norms") or {}
    if not isinstance(probes, dict) or not all(isinstance(v, dict) and _num(v.get("ppl"))
                                               for v in probes.values()):
        raise ValueError(f"{where}: probes is not {{split: {{ppl: number, ...}}}}")
    if not isinstance(grads, dict) or not all(_num(v) for v in grads.values()):
        raise ValueError(f"{where}: grad_norms is not {{unit: number}}")


def read_metrics(run, notes=None) -> list:
    """The metrics lines of a run folder (or a metrics.jsonl path), in step order. A torn last line (a run
    still writing, or killed mid-line) is left out with a note (into `notes`, else on stderr now), as
    train.py's resume leaves it out."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise ValueError(f"{run}: no metrics.jsonl (a train.py run folder is needed)")
    text = read_text(path)
    lines, recs = text.splitlines(), []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                note = f"plot.py: note: {path}:{n}: an unfinished last line, left out"
                if notes is None:
                    print(note, file=sys.stderr)
                else:
                    notes.append(note)
                break
            raise ValueError(f"{path}:{n}: not JSON lines ({e.msg}); fix or remove the line") from None
        check_row(f"{path}:{n}", rec)
        recs.append(rec)
    if not recs:
        raise ValueError(f"{path}: no metrics lines (empty)")
    return sorted(recs, key=lambda r: r["step"])


def series(recs) -> dict:
    """{name: [(step, value)]}: loss, 'ppl <split>' and 'grad <unit>'."""
    out = {"loss": [(r["step"], r["loss"]) for r in recs]}
    for r in recs:
        for split, res in (r.get("probes") or {}).items():
            out.setdefault(f"ppl {split}", []).append((r["step"], res["ppl"]))
        for unit, g in (r.get("grad_norms") or {}).items():
            out.setdefault(f"grad {unit}", []).append((r["step"], g))
    return dict(sorted(out.items(), key=lambda kv: ("loss", "ppl", "grad").index(kv[0].split()[0])))  # stable


def sparkline(values, width=40) -> str:
    """values resampled to at most `width` characters, scaled between their min and max."""
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    finite = [v for v in values if math.isfinite(v)] or [0.0]  # a diverged run's nan/inf: drawn as '×'
    lo, hi = min(finite), max(finite)
    steps = len(SPARK) - 1
    return "".join(SPARK[0 if hi == lo else round((v - lo) / (hi - lo) * steps)] if math.isfinite(v) else "×"
                   for v in values)


def terminal(runs: dict, width=40) -> str:
    lines = []
    for name, s in runs.items():
        lines.append(f"{name}")
        for key, pts in s.items():
            v = [p[1] for p in pts]
            lines.append(f"  {key:<16} {sparkline(v, width):<{width}}  {v[0]:9.4g} -> {v[-1]:9.4g}  "
                         f"(steps {pts[0][0]}-{pts[-1][0]})")
    return "\n".join(lines)


def bar_chart(rgn: dict, title: str, width: int = 40, mark=()) -> str:
    """The paper's Figure 2 in text: a row per unit in network order, bar length relative to the largest
    rgn; '*' marks the units in `mark`."""
    top, eighths, lines = max(rgn.values()) or 1.0, " ▏▎▍▌▋▊▉", [title]
    n_layer = 1 + max((int(u.split(".")[1]) for u in rgn if u.startswith("h.")), default=-1)
    for u in [u for u in unit_names(n_layer) if u in rgn]:
        block, _, sub = u.rpartition(".")  # 'h.3 attn' then ' mlp': a layer's two units read as a pair
        label = u if not block else (block if sub == "attn" else "") + " " + sub
        full, part = divmod(round(rgn[u] / top * width * 8), 8)
        bar = ("█" * full + (eighths[part] if part else "")).ljust(width)
        lines.append(f"{label:>10} │{bar} {rgn[u]:.3f}{' *' if u in mark else ''}")
    return "\n".join(lines)

# The selection's fields, as trace.py records them (asdict of a trace.Selection), with their defaults: read
# from the dataclass, so a field added there reaches the chart (a copied list here once dropped one silently).
SEL_FIELDS = {f.name: f.default for f in fields(Selection)}


def check_trace(path, d: dict) -> dict:
    """trace.py's output, checked before drawing (trace.load_trace checks only that it has 'rgn'): every
    split's rgn a finite number >= 0 per unit, its units those of rgn, the selection's fields of their types.
    A trace without 'splits' is its own 'all' split. ValueError naming `path` else."""
    splits = d.get("splits", {"all": d})
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"{path}: 'splits' is not {{split: {{rgn, units, ...}}}}; a trace.py output?")
    for name, sp in [("the top level", d), *((f"split {k!r}", v) for k, v in splits.items())]:
        rgn = sp.get("rgn") if isinstance(sp, dict) else None
        named = isinstance(rgn, dict) and bool(rgn) and all(UNIT_RE.fullmatch(str(u)) for u in rgn)
        if not named:
            raise ValueError(f"{path}: {name}: rgn is not {{unit: number}} over units like embed, h.0.attn")
        bad = [u for u, v in rgn.items() if not (_num(v) and 0 <= v < math.inf)]
        if bad:
            raise ValueError(f"{path}: {name}: rgn of {bad[0]} is {rgn[bad[0]]!r}, want a finite number >= 0")
        if not isinstance(sp.get("units", []), list) or sorted(sp.get("units", rgn)) != sorted(rgn):
            raise ValueError(f"{path}: {name}: its units are not those of its rgn")
    sel = d.get("selection", {})
    typed = isinstance(sel, dict) and all(_num(sel[k]) if _num(default) else isinstance(sel[k], type(default))
                                          for k, default in SEL_FIELDS.items() if k in sel)
    if not typed:
        raise ValueError(f"{path}: 'selection' is not trace.py's {{{', '.join(SEL_FIELDS)}, ...}}")
    try:
        base = Selection(**{k: sel[k] for k in SEL_FIELDS if k in sel}).check()
        d = dict(d, splits=splits, selection=sel, base=base, marks={})
        for name, sp in splits.items():
            # each split's chart marks what FP selects from that split's own rgn, whichever split
            # (trace_split) the run itself selected with: the recorded trace_split is overridden here
            fp = tgl_plan(d, "fp", Selection(**dict(vars(base), trace_split=name)), list(sp["rgn"]))
            d["marks"][name] = {u for u, v in fp.items() if v}
    except ValueError as e:  # a bad recorded --select, or no h.N unit to rank: FP's choice is undefined
        raise ValueError(f"{path}: {e}") from None
    return d


def trace_charts(d: dict) -> str:
    """Figure 2 in text (d: check_trace's): a chart per traced split, '*' on the units TGL+FP selects with
    that split."""
    out = []
    for name, s in d["splits"].items():
        passes = f"{s.get('n_span', '?')} span / {s.get('n_lm', '?')} LM passes"
        title = f"relative gradient norm, {name} ({passes}; * = selected)"
        out.append(bar_chart(s["rgn"], title, mark=d["marks"][name]))
    return "\n\n".join(out)


def need_matplotlib():
    try:
        import matplotlib
    except ImportError:
        fail("matplotlib is needed for --png: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def trace_png(d: dict, path, table: str = None):
    """Figure 2 as a PNG: per split, relative gradient norm per layer, attention and MLP bars side by side;
    `table` (text) beside them, as the paper's layout has it."""
    plt = need_matplotlib()
    names = list(d["splits"])
    width = 8 + (0.07 * max(map(len, table.splitlines())) + 0.4 if table else 0)  # inches: 8pt monospace
    fig, axes = plt.subplots(len(names), 1, figsize=(width, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rgn = d["splits"][name]["rgn"]
        layers = sorted({int(u.split(".")[1]) for u in rgn if u.startswith("h.")})
        for off, sub in ((-0.2, "attn"), (0.2, "mlp")):
            ax.bar([i + off for i in layers], [rgn.get(f"h.{i}.{sub}", 0.0) for i in layers], width=0.4, label=sub)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("rgn")
        ax.set_xticks(layers)
    axes[-1, 0].set_xlabel("layer")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower right" if table else "upper right", ncol=2,
               fontsize=8)
    fig.suptitle("span / LM gradient norm per layer")
    fig.tight_layout(rect=(0, 0, 8 / width, 1))
    if table:
        side = fig.add_axes((8 / width, 0.02, 1 - 8 / width, 0.85))  # the table beside the charts
        side.set_axis_off()
        side.text(0.02, 1, table, family="monospace", fontsize=8, va="top")
    with atomic_path(path) as tmp:  # never half a PNG under the name
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def png(runs: dict, path):
    """Top: loss and probe perplexity (colour per run, line style per split); below, one panel per run:
    gradient norm per unit (attention solid, MLP dashed, colour by layer)."""
    plt = need_matplotlib()
    n = len(runs)
    fig = plt.figure(figsize=(10, 3.2 * (1 + n)))
    grid = fig.add_gridspec(1 + n, 2)
    ax_loss, ax_ppl = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    styles = ["-", "--", ":", "-."]
    for i, (name, s) in enumerate(runs.items()):
        c = f"C{i % 10}"
        ax_loss.plot(*zip(*s["loss"]), color=c, label=name)
        for j, key in enumerate(k for k in s if k.startswith("ppl ")):
            ax_ppl.plot(*zip(*s[key]), color=c, ls=styles[j % 4], label=f"{name}: {key[4:]}")
        ax = fig.add_subplot(grid[1 + i, :])
        units = [k[5:] for k in s if k.startswith("grad ")]
        layers = sorted({u.split(".")[1] for u in units if u.startswith("h.")}, key=int)
        cmap = plt.get_cmap("viridis")
        for u in units:
            if u.startswith("h."):
                k = layers.index(u.split(".")[1])
                col, ls = cmap(k / max(1, len(layers) - 1)), "-" if u.endswith("attn") else "--"
            else:
                col, ls = "grey", ":" if u == "embed" else "-."
            ax.plot(*zip(*s[f"grad {u}"]), color=col, ls=ls, label=u)
        ax.set_yscale("log")
        ax.set_title(f"{name}: gradient norm per unit (before clipping)", fontsize=9)
        ax.set_xlabel("step")
        if units:  # matplotlib warns on stderr about an empty legend
            ax.legend(fontsize=6, ncol=6, loc="upper right")
    ax_loss.set_title("training loss", fontsize=9)
    ax_ppl.set_title("probe answer-span perplexity", fontsize=9)
    ax_ppl.set_yscale("log")
    ax_loss.legend(fontsize=6)
    if ax_ppl.get_legend_handles_labels()[0]:  # no probe scores logged: no legend, no warning
        ax_ppl.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def check_outputs(args):
    """--png / --out, before anything is read or drawn: the file written is exactly the one named."""
    if args.png:
        check_output(args.png, "--png")
        if not args.png.lower().endswith(".png"):
            raise ValueError(f"--png {args.png}: want a file name ending in .png (matplotlib would write "
                             f"{args.png}.png instead)")
        need_matplotlib()
    if args.out:
        check_output(args.out, "--out")
    if args.png and args.out and os.path.abspath(args.png) == os.path.abspath(args.out):
        raise ValueError("--png and --out name the same file")


def _network_order(unit):
    """embed, h.0.attn, h.0.mlp, h.1.attn, ..., h.10.attn, ..., ln_f."""
    return unit != "embed", unit == "ln_f", [int(x) if x.isdigit() else x for x in unit.split(".")]


def pick_units(runs: dict, spec: str) -> dict:
    """--units: keep only these units' gradient series; a unit no run logged is refused, naming the rest."""
    want = [u.strip() for u in spec.split(",") if u.strip()]
    known = sorted({k[5:] for s in runs.values() for k in s if k.startswith("grad ")}, key=_network_order)
    unknown = [u for u in want if u not in known]
    if not want or unknown:
        what = f"unknown unit {unknown[0]!r}" if want else "no unit"
        raise ValueError(f"--units {spec!r}: {what}; "
                         f"the runs logged {', '.join(known) or 'no gradient norms (train.py --log-every)'}")
    keep = {f"grad {u}" for u in want}
    return {n: {k: v for k, v in s.items() if not k.startswith("grad ") or k in keep}
            for n, s in runs.items()}


def read_runs(paths, notes=None) -> dict:
    """{column name: series}: a run folder's name, or its path where two runs share a name."""
    runs = {}
    for r in paths:
        name = os.path.basename(os.path.normpath(r)) if os.path.isdir(r) else r
        runs[os.path.normpath(r) if name in runs else name] = series(read_metrics(r, notes))
    return runs


def written(flag, path, write):
    """write(), an OSError named by its flag (not by the temporary file), then say what was written."""
    try:
        write()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write it ({e.strerror or e})") from None
    print(f"wrote {path}")


def main(argv=None):
    ap = Parser(prog="plot.py", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="train.py run folders (or metrics.jsonl files)")
    ap.add_argument("--trace", help="a trace.py output: draw its Figure 2 instead (terminal; --png too)")
    ap.add_argument("--png", help="also write the figure to this .png file (needs matplotlib)")
    ap.add_argument("--units", help="comma list of units whose gradient norms to show (default: all)")
    ap.add_argument("--width", type=number("[2, 1000]", int), default=40,
                    help="sparkline width in characters")
    ap.add_argument("--out", help="also write the terminal view to this text file")
    args = ap.parse_args(argv)
    if bool(args.trace) == bool(args.runs):
        ap.error("give run folders, or --trace FILE")
    if args.trace and args.units:
        ap.error("--units picks gradient series of run folders; a --trace chart shows every unit")
    notes = []  # printed once all went well: an error stays one line
    with input_errors("plot.py"):
        check_outputs(args)  # fail before reading anything
        if args.trace:
            d = check_trace(args.trace, load_trace(args.trace))
            runs, text = None, trace_charts(d)
        else:
            runs = read_runs(args.runs, notes)
            runs = pick_units(runs, args.units) if args.units else runs
            text = terminal(runs, args.width)
        print(text)
        if args.out:
            written("--out", args.out, lambda: write_text(args.out, text + "\n"))
        if args.png:
            written("--png", args.png, lambda: trace_png(d, args.png) if args.trace else png(runs, args.png))
    for note in notes:
        print(note, file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()
