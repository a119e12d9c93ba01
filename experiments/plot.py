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
import os

from common import Parser, fail, input_errors, write_text
from model import unit_names
from trace import Selection, load_trace, tgl_plan

SPARK = "▁▂▃▄▅▆▇█"


def read_metrics(run) -> list:
    """The metrics lines of a run folder (or a metrics.jsonl path), in step order."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    try:
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    except OSError:
        fail(f"{run}: no metrics.jsonl (a train.py run folder is needed)", "plot.py")
    except json.JSONDecodeError as e:
        fail(f"{path}: not JSON lines ({e.msg})", "plot.py")
    if not recs:
        fail(f"{path}: empty", "plot.py")
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
    lo, hi = min(values), max(values)
    return "".join(SPARK[0 if hi == lo else round((v - lo) / (hi - lo) * (len(SPARK) - 1))] for v in values)


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

def trace_charts(d: dict) -> str:
    """Figure 2 in text: a chart per traced split, '*' on the units TGL+FP selects with that split."""
    sel, out = d["selection"], []
    base = Selection(**{k: sel[k] for k in ("select", "rank_units", "alr_norm", "floor", "control") if k in sel})
    for name, s in d["splits"].items():
        fp = tgl_plan(d, "fp", Selection(**dict(vars(base), trace_split=name)), s["units"])
        title = f"relative gradient norm, {name} ({s['n_span']} span / {s['n_lm']} LM passes; * = selected)"
        out.append(bar_chart(s["rgn"], title, mark={u for u, v in fp.items() if v}))
    return "\n\n".join(out)


def need_matplotlib():
    try:
        import matplotlib
    except ImportError:
        fail("matplotlib is needed for --png: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def trace_png(d: dict, path):
    """Figure 2 as a PNG: per split, relative gradient norm per layer, attention and MLP bars side by side."""
    plt = need_matplotlib()
    names = list(d["splits"])
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rgn = d["splits"][name]["rgn"]
        layers = sorted({int(u.split(".")[1]) for u in rgn if u.startswith("h.")})
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
        ax.legend(fontsize=6, ncol=6, loc="upper right")
    ax_loss.set_title("training loss", fontsize=9)
    ax_ppl.set_title("probe answer-span perplexity", fontsize=9)
    ax_ppl.set_yscale("log")
    ax_loss.legend(fontsize=6)
    ax_ppl.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = Parser(prog="plot.py", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="train.py run folders (or metrics.jsonl files)")
    ap.add_argument("--trace", help="a trace.py output: draw its Figure 2 instead (terminal; --png too)")
    ap.add_argument("--png", help="also write the figure here (needs matplotlib)")
    ap.add_argument("--units", help="comma list of units to show (default: all)")
    ap.add_argument("--width", type=int, default=40, help="sparkline width in characters")
    ap.add_argument("--out", help="also write the terminal view to this text file")
    args = ap.parse_args(argv)
    if args.width < 2:
        ap.error("--width must be >= 2")
    if args.png:
        need_matplotlib()  # fail before reading anything
    if bool(args.trace) == bool(args.runs):
        ap.error("give run folders, or --trace FILE")
    if args.trace:
        with input_errors("plot.py"):
            d = load_trace(args.trace)
            print(trace_charts(d))
            if args.png:
                trace_png(d, args.png)
                print(f"wrote {args.png}")
        return None
    runs = {}
    for r in args.runs:
        s = series(read_metrics(r))
        if args.units:
            keep = {f"grad {u.strip()}" for u in args.units.split(",")}
            s = {k: v for k, v in s.items() if not k.startswith("grad ") or k in keep}
        runs[os.path.basename(os.path.normpath(r)) if os.path.isdir(r) else r] = s
    text = terminal(runs, args.width)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    if args.png:
        png(runs, args.png)
        print(f"wrote {args.png}")
    return runs


if __name__ == "__main__":
    main()
