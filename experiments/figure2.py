"""The paper's Figure 2 for any model in one command: the relative gradient norm of each layer's attention
and MLP, for updated relations (TempLAMA) and new entities (ECBD), drawn with the table beside it.

    python -m experiments.figure2 --init EleutherAI/pythia-160m --out runs/fig2-pythia
    python -m experiments.figure2 --init gpt2 --out runs/fig2-gpt2 --plan   # the steps and a time ESTIMATE

--init is a hub name, a Hugging Face folder or a tgl run folder. The steps, each skipped when its output
is there (the same command again goes on where it stopped; --overwrite starts over):
  1. TempLAMA (--templama: fetched into $TGL_CACHE/data, or your files): the facts whose answer changed
     between --dates T0 T1 -> OUT/probes/updated.jsonl (`experiments.realdata splits templama`)
  2. ECBD's new entities, from its unpacked folder (--ecbd; a browser-only download) -> OUT/probes/ecbd/
  3. old text for the LM windows: the first --snapshot-mb MB of TemporalWiki's 2021-08 Wikipedia snapshot
     (ranged reads, as experiments.twiki does), or --text
  4. one trace over both probe sets (trace.py's trace_files): one LM norm shared by both, so updated and new
     differ by their span norms alone -> OUT/trace.json
  5. the figure: OUT/figure2.txt (the terminal charts and the table) and OUT/figure2.png (with matplotlib)
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

import probe
import trace as tgl_trace
from checkpoint import load_model
from common import Parser, check_output, duration, input_errors, read_json, write_text
from experiments import fetch, plot, probe_files, realdata
from experiments.hf import is_hub_name
from experiments.tools import check_number, script
from experiments.twiki import TEMPLAMA_SETS, sh
from model import pick_device

PROG = "figure2.py"
SPLITS = ("updated", "new")
MONTH = "08"  # TemporalWiki's first snapshot (2021-08): the old text, as twiki.py's stage 1 reads it
RUN_KEYS = ("init", "templama", "dates", "ecbd", "text", "snapshot_mb", "n_span", "n_lm", "block_size", "seed")


def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init", required=True, help="the model: a hub name (EleutherAI/pythia-160m, gpt2, ...), an HF folder or a run")
    a("--out", required=True, help="folder for the probes, trace.json, figure2.txt and figure2.png")
    a("--templama", nargs="+", default=["templama"], help="'templama' or 'dynamic-templama' (fetched), or "
      ".json/.jsonl files or folders of TempLAMA records")
    a("--dates", nargs=2, default=["2019", "2020"], metavar=("T0", "T1"),
      help="updated relations: facts whose answer differs between T0 and T1 (years; quarters for Dynamic TempLAMA)")
    a("--ecbd", default="ecbd", help="ECBD's unpacked folder (YEAR/np_spans_test.json), or 'ecbd' for the one "
      "registered with `python -m experiments.realdata fetch ecbd --folder PATH`")
    a("--text", help="old text for the LM windows (a file or folder); default: the Wikipedia snapshot prefix")
    a("--snapshot-mb", type=float, default=5.0, help="MB of the old Wikipedia snapshot fetched for the LM windows")
    a("--n-span", type=int, default=100, help="probes traced per kind (updated, new): a seeded sample if more")
    a("--n-lm", type=int, default=64, help="random LM windows of old text")
    a("--block-size", type=int, default=256, help="LM window length in tokens (the model's context at most)")
    a("--seed", type=int, default=0, help="seed of the probe sample and the LM windows")
    a("--device", default="auto", help="cpu, cuda, mps or auto")
    a("--plan", action="store_true", help="print the steps and an ESTIMATE of the time on this device; trace nothing")
    a("--overwrite", action="store_true", help="start over in --out when it holds a figure of other flags")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- before anything slow

def ecbd_root(args) -> Path:
    return fetch.cache_root() / "ecbd" if args.ecbd == "ecbd" else Path(args.ecbd)


def check(args):
    """Every flag and path: one line now, not after the downloads."""
    check_output(args.out, "--out", "dir")
    if not (os.path.exists(args.init) or is_hub_name(args.init)):
        raise ValueError(f"--init {args.init}: no such folder, nor a hub name (ORG/NAME, or gpt2)")
    for flag in ("n_span", "n_lm", "block_size"):
        check_number("--" + flag.replace("_", "-"), getattr(args, flag), low=1, integer=True)
    check_number("--snapshot-mb", args.snapshot_mb, low=0, low_open=True)
    for src in args.templama:
        if src not in TEMPLAMA_SETS and not os.path.exists(src):
            raise ValueError(f"--templama {src}: no such file or folder (or 'templama' / 'dynamic-templama')")
    realdata._check_dates(*args.dates)
    if not sorted(ecbd_root(args).glob("*/np_spans_test.json")):
        raise ValueError(f"--ecbd {args.ecbd}: no YEAR/np_spans_test.json in {ecbd_root(args)}. {fetch.ECBD_HELP}")
    if args.text and not os.path.exists(args.text):
        raise ValueError(f"--text {args.text}: no such file or folder")
    saved = Path(args.out) / "figure2.json"
    if saved.is_file() and not args.overwrite:
        before, now = read_json(saved), flags(args)
        before = before if isinstance(before, dict) else {}
        diff = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in RUN_KEYS if before.get(k) != now[k]]
        if diff:
            raise ValueError(f"{saved}: {args.out} holds a figure of other flags ({'; '.join(diff)}); use the same "
                             "flags, another --out, or --overwrite to start over")


def flags(args) -> dict:
    return json.loads(json.dumps({k: getattr(args, k) for k in RUN_KEYS}))


# ----------------------------------------------------------------------------- the steps

def old_text(args) -> Path:
    if args.text:
        return Path(args.text)
    return realdata.snapshot_dir(args.snapshot_mb) / f"wikipedia_{MONTH}_gpt2_prefix.csv"


def templama_inputs(args) -> list:
    return [fetch.cache_root() / s if s in TEMPLAMA_SETS else Path(s) for s in args.templama]


def steps(args) -> list:
    """(what, argv, done): the commands that do each step by hand."""
    out, probes, cache = Path(args.out), Path(args.out) / "probes", fetch.cache_root()
    todo = [(f"fetch {s}", script("experiments.realdata", "fetch", s),
             all((cache / s / f).is_file() for f in fetch.DATASETS[s].files))
            for s in args.templama if s in TEMPLAMA_SETS]
    if not args.text:
        todo.append(("old text", script("experiments.realdata", "fetch", "twiki-snapshot", "--max-mb",
                                        f"{args.snapshot_mb:g}", "--month", MONTH), old_text(args).is_file()))
    todo.append(("updated", script("experiments.realdata", "splits", "templama", "--input", *templama_inputs(args),
                                   "--from", args.dates[0], "--to", args.dates[1], "--out", probes, "--diag-frac", 0),
                 (probes / ".templama-splits.done").is_file()))
    todo.append(("new", script("experiments.realdata", "splits", "ecbd", "--input", ecbd_root(args),
                               "--out", probes / "ecbd", "--diag-frac", 0),
                 (probes / "ecbd" / ".ecbd-splits.done").is_file()))
    todo.append(("trace", script("trace.py", "--init", args.init, "--probes", *probe_specs(args), "--text",
                                 old_text(args), "--out", out / "trace.json", "--n-span", args.n_span, "--n-lm",
                                 args.n_lm, "--block-size", args.block_size, "--seed", args.seed, "--device",
                                 args.device), (out / "trace.json").is_file()))
    todo.append(("figure", script("experiments.plot", "--trace", out / "trace.json", "--png", out / "figure2.png"),
                 False))
    return todo


def probe_specs(args) -> list:
    probes = Path(args.out) / "probes"
    new = sorted((probes / "ecbd").glob("*/new.jsonl")) or [probes / "ecbd" / "YEAR" / "new.jsonl"]
    return [f"{probes / 'updated.jsonl'}:updated", *(f"{f}:new" for f in new)]


def make_split(kind, inputs, out: Path, dates=(None, None)):
    """realdata.make_splits once (diag_frac 0: nothing is evaluated here, every probe may be traced)."""
    marker = out / f".{kind}-splits.done"
    if not marker.is_file():
        counts = realdata.make_splits(kind, inputs, out, dates, diag_frac=0, seed=0)
        write_text(marker, json.dumps(counts))


def prepare(args):
    """Steps 1-3: what is missing is fetched, the probe files written."""
    for s in args.templama:
        if s in TEMPLAMA_SETS and not all((fetch.cache_root() / s / f).is_file() for f in fetch.DATASETS[s].files):
            fetch.fetch(s)
    if not old_text(args).is_file() and not args.text:
        fetch.fetch("twiki-snapshot", old_text(args).parent, max_mb=args.snapshot_mb, month=MONTH)
    probes = Path(args.out) / "probes"
    make_split("templama", templama_inputs(args), probes, tuple(args.dates))
    make_split("ecbd", [ecbd_root(args)], probes / "ecbd")
    if not (probes / "updated.jsonl").is_file():
        raise ValueError(f"no TempLAMA fact changed its answer between {args.dates[0]} and {args.dates[1]}: "
                         "choose --dates further apart")


def run_trace(args, model, tok, device) -> dict:
    """Step 4: trace.py's trace_files over both probe sets, written as trace.py writes it."""
    path = Path(args.out) / "trace.json"
    if path.is_file():
        return tgl_trace.load_trace(path)
    cfg = tgl_trace.TraceConfig(init=args.init, probes=probe_specs(args), text=str(old_text(args)), out=str(path),
                                n_span=args.n_span, n_lm=args.n_lm, block_size=args.block_size, seed=args.seed)
    d = tgl_trace.trace_files(model, tok, cfg, device)
    write_text(path, json.dumps(d, indent=1))
    return d


def table(d: dict) -> str:
    """The numbers of the figure: rgn per layer, attention and MLP, updated and new; then embed and ln_f."""
    sp, units = d["splits"], d["units"]
    head = f"{'layer':>5} " + " ".join(f"{sub + ' ' + s:>12}" for sub in ("attn", "mlp") for s in SPLITS)
    rows = [head]
    for i in sorted({int(u.split(".")[1]) for u in units if u.startswith("h.")}):
        rows.append(f"{i:>5} " + " ".join(f"{sp[s]['rgn'][f'h.{i}.{sub}']:>12.3f}" for sub in ("attn", "mlp")
                                          for s in SPLITS))
    rows += [f"{u} (not ranked): " + ", ".join(f"{s} {sp[s]['rgn'][u]:.3f}" for s in SPLITS) for u in ("embed", "ln_f")]
    n = d["counts"]
    rows.append(f"probes traced: {n['span'].get('updated', 0)} updated, {n['span'].get('new', 0)} new; "
                f"{n['lm']} LM windows of {d['block_size']} tokens")
    return "\n".join(rows)


def draw(args, d: dict) -> list:
    """Step 5: plot.py's charts (updated and new only) with the table, in text and, with matplotlib, a PNG."""
    out, path = Path(args.out), Path(args.out) / "trace.json"
    fig = plot.check_trace(path, d)
    fig = dict(fig, splits={s: fig["splits"][s] for s in SPLITS})
    text = plot.trace_charts(fig) + "\n\n" + table(d)
    write_text(out / "figure2.txt", text + "\n")
    print(text)
    written = [out / "trace.json", out / "figure2.txt"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("# no matplotlib: the figure is the text above (pip install matplotlib for figure2.png)")
        return written
    plot.trace_png(fig, out / "figure2.png", table=table(d))
    return written + [out / "figure2.png"]


# ----------------------------------------------------------------------------- --plan

def timed_pass(model, example, device, reps=3) -> float:
    """Seconds of one traced forward + backward (trace.py's hooks) of `example`: the median of `reps`."""
    times = []
    for _ in range(reps + 1):  # the first warms up
        t0 = time.perf_counter()
        tgl_trace.trace_norms(model, {"x": [example]}, device)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[reps // 2]


def probe_counts(args) -> dict:
    """Probes the trace will take of each kind: --n-span, or fewer where the probe files written hold fewer."""
    specs = dict(s.rsplit(":", 1) for s in probe_specs(args))  # {file: kind}
    have = {k: [f for f, s in specs.items() if s == k and Path(f).is_file()] for k in SPLITS}
    return {k: min(args.n_span, sum(len(probe_files.read_probes(f)) for f in fs)) if fs else args.n_span
            for k, fs in have.items()}


def plan(args, model, device) -> str:
    block = min(args.block_size, model.config.block_size)
    window = ([1] * block, [1] * block)
    span = ([1] * 16, [-1] * 15 + [1])  # a probe: about 16 tokens (prompt and answer) in TempLAMA and ECBD
    t_lm, t_span = timed_pass(model, window, device), timed_pass(model, span, device)
    n_span = probe_counts(args)
    total = args.n_lm * t_lm + sum(n_span.values()) * t_span
    lines = [f"# figure2.py --plan: {args.init} -> {args.out}"]
    lines += [("# done: " if done and not args.overwrite else "") + sh(argv) for _, argv, done in steps(args)]
    lines.append(f"# ESTIMATE of the trace on this device ({device}): {args.n_lm} LM windows x {t_lm:.3g} s + "
                 f"{' + '.join(f'{n} {s}' for s, n in n_span.items())} probes x {t_span:.3g} s = about "
                 f"{duration(total)}. Measured now: one traced forward + backward of this model at {block} tokens "
                 "and at 16 (a probe's typical length), median of 3; not counted: downloads, tokenizing the old "
                 "text, loading the model. Fewer probes: --n-span; fewer or shorter windows: --n-lm, --block-size")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    with input_errors(PROG):
        check(args)
        device = pick_device(args.device)
        out = Path(args.out)
        if args.plan:
            print(plan(args, load_model(args.init, device), device))
            return None
        model, tok = probe.load_with_tokenizer(args.init, None, device)  # the vocabulary checked to fit
        if args.block_size > model.config.block_size:  # before the data's downloads, before writing
            raise ValueError(f"--block-size {args.block_size}: the model's context is {model.config.block_size}")
        if args.overwrite:  # only what this driver wrote
            for f in ("probes", "trace.json", "figure2.txt", "figure2.png", "figure2.json"):
                shutil.rmtree(out / f) if (out / f).is_dir() else (out / f).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "figure2.json", json.dumps(flags(args), indent=1))
        for _, argv_, done in steps(args)[:-2]:
            print(f"{'# done: ' if done else '$ '}{sh(argv_)}", flush=True)
        prepare(args)
        print(f"$ {sh(steps(args)[-2][1])}", flush=True)
        d = run_trace(args, model, tok, device)
        written = draw(args, d)
    print("\nwrote " + ", ".join(map(str, written)))
    return d

if __name__ == "__main__":
    main()
