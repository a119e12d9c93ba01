"""The whole method in one command, on the synthetic temporal world, with the controls.

  world (general language + facts) -> pretrain a small base model on snapshot T0 (cached) -> trace
  relative gradient norms on the diagnostic probes, against held-out general text (the selection)
  and against the model's own fact text (the contrast) -> continual pretraining on the diff with
  full / mixreview / recadam / lora, each with --tgl none / fp / alr, and for each method the
  controls: FP on random selections of the same size, FP on the complement of TGL's selection
  -> plus a `full` run at ALR's mean effective learning rate -> one table.

Every step is a plain call of experiments/world.py, train.py, trace.py and probe.py with the flags printed,
so any line of the table can be re-run (or ablated) by hand.
"""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time

import data
import probe
import trace as tgl_trace
from experiments import plot, world as tgl_world
from checkpoint import load_model
from common import POS, Parser, check_output, fail, input_errors, number, write_text
from experiments.tools import script
from model import unit_names, unit_of

METHODS = ("full", "mixreview", "recadam", "lora")
TGLS = ("none", "fp", "alr")
SPLITS = ("updated", "new", "unchanged")
SEED = number("[0, 2147483647]", int)  # x1000 (+ draw) it seeds the random controls too
RANK_UNITS = "blocks"  # the paper ranks layers; embed and ln_f always train (README: "Why blocks")

# Sizes of the demo. --quick shrinks everything so the tests run the whole pipeline in seconds.
FULL = dict(entities=300, heldout_words=20000, n_layer=4, n_head=4, n_embd=128, block=64, pre_steps=1000,
            pre_batch=32, pre_lr=3e-3, steps=100, batch=16, lr=1e-3, n_span=100, n_lm=100, draws=3)
QUICK = dict(entities=24, heldout_words=1500, n_layer=2, n_head=2, n_embd=32, block=32, pre_steps=30,
             pre_batch=8, pre_lr=3e-3, steps=6, batch=8, lr=1e-3, n_span=8, n_lm=8, draws=3)


def sh(argv):
    return " ".join(a if a and " " not in a else repr(a) for a in argv)


def thread_env(threads):
    """Environment for a child process: its BLAS/OpenMP pools sized like its torch threads, so
    parallel jobs do not oversubscribe the cores."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run_jobs(jobs, n_parallel, log_dir, threads):
    """Run (name, argv) jobs, n_parallel at a time, each with its log in log_dir; print a line as
    each finishes. A failed job stops the demo with its log's last lines."""
    pending, running, done, t0 = list(jobs), {}, {}, time.time()
    while pending or running:
        while pending and len(running) < n_parallel:
            name, argv = pending.pop(0)
            log = open(os.path.join(log_dir, f"{name}.log"), "w")
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=thread_env(threads))
            running[name] = (proc, log, time.time())
        time.sleep(0.2)
        for name, (proc, log, start) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                tail = open(log.name).read().strip().splitlines()[-3:]
                raise SystemExit(f"error: run {name} failed (exit {proc.returncode}); log {log.name}:\n  " + "\n  ".join(tail))
            done[name] = time.time() - start
            print(f"  [{len(done)}/{len(jobs)}] {name:<24} {done[name]:5.1f}s   (runs {time.time() - t0:5.0f}s)", flush=True)
    return done


def mean_alr_scale(trace_path, base_dir):
    """The parameter-weighted mean of ALR's per-unit LR scales: the `full` run at lr * this is the
    control that tells ALR's gain from a plain lower learning rate."""
    model = load_model(base_dir)
    scales = tgl_trace.tgl_plan(tgl_trace.load_trace(trace_path), "alr", tgl_trace.Selection(),
                                unit_names(model.config.n_layer))
    sizes = {}
    for name, p in model.named_parameters():
        sizes[unit_of(name)] = sizes.get(unit_of(name), 0) + p.numel()
    return sum(scales[u] * n for u, n in sizes.items()) / sum(sizes.values())


def build_world(world_dir, cfg, seed):
    """The world for this seed and size; rebuilt whenever its parameters differ from the folder's."""
    from common import input_errors
    wcfg = tgl_world.WorldConfig(seed=seed, n_entities=cfg["entities"], heldout_words=cfg["heldout_words"])
    if tgl_world.world_matches(world_dir, wcfg):
        meta = json.load(open(os.path.join(world_dir, "world.json")))
        print(f"[seed {seed}] world: cached in {world_dir}", flush=True)
    else:
        why = "parameters changed, rebuilding" if os.path.exists(os.path.join(world_dir, "world.json")) else "building"
        print(f"[seed {seed}] world: {why}:\n  python -m experiments.world --out {world_dir} --seed {seed} --n-entities {cfg['entities']}"
              f" --heldout-words {cfg['heldout_words']}", flush=True)
        with input_errors("demo.py"):  # a folder of someone else's files of the world's names: one line
            meta = tgl_world.make_world(world_dir, wcfg)
    c = meta["counts"]
    print(f"[seed {seed}] world: {c['words']['t0.txt']:,} words at T0 ({c['words']['t0_facts.txt']:,} in fact documents), "
          f"{c['facts_updated']} updated facts, {c['things_new']} new entities; probes {c['probes']}", flush=True)
    return meta


def pretrain(args, cfg, seed, world_dir, base, meta):
    """The base model, pretrained from scratch on T0; cached by its exact command and world config.
    It runs alone, so it gets every core the parallel runs share."""
    threads = args.threads * args.jobs
    pre = script("train.py", "--init", "scratch", "--tokenizer", "word", "--data", os.path.join(world_dir, "t0.txt"),
                 "--out", base, "--n-layer", cfg["n_layer"], "--n-head", cfg["n_head"], "--n-embd", cfg["n_embd"],
                 "--block-size", cfg["block"], "--steps", cfg["pre_steps"], "--batch-size", cfg["pre_batch"],
                 "--lr", cfg["pre_lr"], "--warmup", max(1, cfg["pre_steps"] // 20), "--min-lr", cfg["pre_lr"] / 10,
                 "--weight-decay", 0.1, "--seed", seed, "--log-every", max(1, cfg["pre_steps"] // 10),
                 "--threads", threads)
    key = sh(pre[1:]) + "\nworld " + json.dumps(meta["config"], sort_keys=True)
    pre.append("--overwrite")  # a stale or partial base is replaced (not part of the cache key)
    key_file = os.path.join(base, "demo_command.txt")
    if os.path.exists(os.path.join(base, "ckpt.pt")) and os.path.exists(key_file) and open(key_file).read() == key:
        print(f"[seed {seed}] base model: cached in {base}", flush=True)
        return
    print(f"[seed {seed}] pretraining the base model on T0 ({cfg['pre_steps']} steps):\n  python {sh(pre[1:])}", flush=True)
    t = time.time()
    if subprocess.run(pre, env=thread_env(threads), stdout=None if args.verbose else subprocess.DEVNULL).returncode != 0:
        raise SystemExit("error: pretraining failed (run the command above to see why)")
    write_text(key_file, key)
    print(f"[seed {seed}] pretrained in {time.time() - t:.0f}s", flush=True)


def run_trace(args, cfg, seed, root, lm_text, name):
    """trace.py on the diagnostic probes against the world's lm_text; returns the trace dict."""
    world_dir, base = os.path.join(root, "world"), os.path.join(root, "base")
    diag = [os.path.join(world_dir, "probes", f"diag_{s}.jsonl") for s in ("updated", "new")]
    path = os.path.join(root, f"{name}.json")
    targv = ["--init", base, "--probes", *diag, "--text", os.path.join(world_dir, lm_text), "--out", path,
             "--n-span", cfg["n_span"], "--n-lm", cfg["n_lm"], "--seed", seed, "--rank-units", RANK_UNITS]
    print(f"[seed {seed}] tracing against {lm_text}:\n  {sh(['python', 'trace.py', *map(str, targv)])}", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the side-by-side profile below says it shorter
        d = tgl_trace.main([str(a) for a in targv])
    if args.plot:
        plot.trace_png(d, os.path.join(root, f"{name}.png"))
    return d


def profile_table(traces: dict) -> str:
    """rgn per unit for each trace and split, side by side, with each column's max/min."""
    cols = [(t, s) for t in traces for s in ("all", "diag_updated", "diag_new") if s in traces[t]["splits"]]
    units = traces[next(iter(traces))]["units"]
    head = f"{'unit':<10}" + "".join(f" {(t + ':' + s.replace('diag_', ''))[:16]:>16}" for t, s in cols)
    rows = [head, "-" * len(head)]
    for u in units:
        rows.append(f"{u:<10}" + "".join(f" {traces[t]['splits'][s]['rgn'][u]:>16.2f}" for t, s in cols))
    ratio = []
    for t, s in cols:
        v = [traces[t]["splits"][s]["rgn"][u] for u in units if u.startswith("h.")]
        ratio.append(f" {max(v) / min(v) if min(v) > 0 else float('inf'):>16.2f}")
    rows.append(f"{'max/min':<10}" + "".join(ratio) + "   (over the blocks' units)")
    return "\n".join(rows)


def trace_summary(tr: dict) -> dict:
    """What the README reports per trace: rgn per unit and split, level and spread over the blocks."""
    out = {}
    for s, d in tr["splits"].items():
        v = [d["rgn"][u] for u in d["units"] if u.startswith("h.")]
        out[s] = dict(rgn=d["rgn"], min=min(v), max=max(v), max_over_min=max(v) / min(v) if min(v) > 0 else None,
                      peak=max((u for u in d["units"] if u.startswith("h.")), key=lambda u: d["rgn"][u]))
    return out


def trace_lines(per_seed: list) -> str:
    """Per seed and trace: the level and spread of rgn over the blocks' units, each split's peak, and
    how differently updated and new probes spread over units (max/min over units of their rgn ratio)."""
    lines = ["| seed | LM text | rgn over blocks (all probes) | max/min | peak: updated | peak: new | updated/new spread |",
             "|---|---|---|---|---|---|---|"]
    for r in per_seed:
        seed = r["seed"]
        for name, t in r["traces"].items():
            a, u, n = t["all"], t.get("diag_updated"), t.get("diag_new")
            spread = "-"
            if u and n:
                ratio = [u["rgn"][k] / n["rgn"][k] for k in u["rgn"] if k.startswith("h.") and n["rgn"][k] > 0]
                spread = f"{max(ratio) / min(ratio):.2f}"
            lines.append(f"| {seed} | {'held-out general text' if name == 'general' else 'own fact text'} | "
                         f"{a['min']:.1f}–{a['max']:.1f} | {a['max_over_min']:.2f} | {u['peak'] if u else '-'} | "
                         f"{n['peak'] if n else '-'} | {spread} |")
    return "\n".join(lines)


def run_specs(cfg, controls="all", seed=0):
    """[(run name, method, extra train.py flags)]: every method x TGL arm, then its controls. Draw d of
    demo seed s uses --control random:(1000 s + d): a random selection depends only on its seed and
    size, so the same d in every demo seed would repeat the same units whenever FP picks as many."""
    specs = []
    for m in METHODS:
        specs += [(f"{m}+{t}", m, ["--tgl", t]) for t in TGLS]
        if controls == "all" or controls == m:
            specs += [(f"{m}+fp:random{d}", m, ["--tgl", "fp", "--control", f"random:{1000 * seed + d}"])
                      for d in range(cfg["draws"])]
            specs.append((f"{m}+fp:complement", m, ["--tgl", "fp", "--control", "complement"]))
    return specs


def continual_jobs(args, cfg, seed, root):
    """[(name, argv)] of the continual runs of one seed (world, base and trace.json under root)."""
    world_dir, base, trace_path = os.path.join(root, "world"), os.path.join(root, "base"), os.path.join(root, "trace.json")
    probes = [os.path.join(world_dir, "probes", f"{s}.jsonl") for s in SPLITS]
    common = ["--init", base, "--data", os.path.join(world_dir, "diff.txt"), "--probes", *probes,
              "--steps", cfg["steps"], "--batch-size", cfg["batch"], "--block-size", cfg["block"],
              "--warmup", max(1, cfg["steps"] // 10), "--seed", seed, "--log-every", max(1, cfg["steps"] // 10),
              "--eval-every", max(1, cfg["steps"] // 5), "--threads", args.threads, "--rank-units", RANK_UNITS,
              "--overwrite"]  # the demo re-runs its arms
    extra = {"mixreview": ["--replay-data", os.path.join(world_dir, "t0.txt")], "recadam": [],
             "lora": ["--lora-rank", args.lora_rank], "full": []}
    lr_for = {"lora": args.lora_lr or 10 * cfg["lr"]}  # adapters start at zero and need a larger step
    jobs = []
    for name, m, flags in run_specs(cfg, "all" if args.only else args.controls, seed):  # --only may name any run
        argv = script("train.py", *common, "--method", m, "--lr", lr_for.get(m, cfg["lr"]), *extra[m], *flags,
                      "--out", os.path.join(root, "runs", name))
        jobs.append((name, argv + (["--trace", trace_path] if "none" not in flags else [])))
    alr_lr = cfg["lr"] * mean_alr_scale(trace_path, base)
    jobs.append(("full@alr-lr", script("train.py", *common, "--method", "full", "--tgl", "none", "--lr", alr_lr,
                                       "--out", os.path.join(root, "runs", "full@alr-lr"))))
    return [j for j in jobs if not args.only or j[0] in args.only]


def one_seed(args, cfg, seed):
    root = os.path.join(args.out, f"seed{seed}")
    world_dir, base, logs = os.path.join(root, "world"), os.path.join(root, "base"), os.path.join(root, "logs")
    os.makedirs(logs, exist_ok=True)
    meta = build_world(world_dir, cfg, seed)
    pretrain(args, cfg, seed, world_dir, base, meta)

    # trace: the selection uses held-out general text; the fact-text trace is the contrast
    traces = {"general": run_trace(args, cfg, seed, root, "general_heldout.txt", "trace"),
              "facts": run_trace(args, cfg, seed, root, "t0_facts.txt", "trace_facts")}
    print(f"\n[seed {seed}] relative gradient norm per unit, LM windows from held-out general text vs the "
          f"model's own fact text:\n{profile_table(traces)}\n", flush=True)
    sel = traces["general"]["selection"]["fp"]
    print(f"[seed {seed}] TGL+FP trains: " + " ".join(u for u, v in sel.items() if v) + "\n", flush=True)

    jobs = continual_jobs(args, cfg, seed, root)
    print(f"[seed {seed}] {len(jobs)} continual runs, {args.jobs} at a time, {args.threads} thread(s) each "
          f"(logs in {logs}); e.g.\n  python {sh(jobs[0][1][1:])}", flush=True)
    times = run_jobs(jobs, args.jobs, logs, args.threads)

    rows = {"base (no update)": dict(probes=base_scores(base, world_dir), time=0.0)}
    for name, _ in jobs:
        s = json.load(open(os.path.join(root, "runs", name, "summary.json")))
        rows[name] = dict(probes=s["probes"], time=times[name], scales=s.get("scales"))
    return dict(seed=seed, runs=rows, traces={k: trace_summary(v) for k, v in traces.items()}, selection=sel)


def base_scores(base, world_dir):
    model, tok = load_model(base), data.load_tokenizer(base)
    probes = [p for s in SPLITS for p in data.read_probes(os.path.join(world_dir, "probes", f"{s}.jsonl"))]
    return probe.evaluate(model, tok, probes)


def table_rows(names) -> list:
    """[(label, [run names])]: the random-selection draws of a method form one row."""
    rows, seen = [], set()
    for n in names:
        if ":random" in n:
            key = n.split(":random")[0] + ":random"
            if key not in seen:
                seen.add(key)
                draws = [m for m in names if m.startswith(key)]
                rows.append((f"{n.split('+')[0]}+fp random ({len(draws)} draws)", draws))
        else:
            rows.append((n.replace("+fp:complement", "+fp complement"), [n]))
    return rows


def table(per_seed: list) -> str:
    """Markdown table; each cell is mean ± standard deviation over seeds (and random draws)."""
    def cell(vals, fmt):
        m = sum(vals) / len(vals)
        if len(vals) == 1:
            return fmt.format(m)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        return fmt.format(m) + " ± " + fmt.format(sd)

    head = "| run | " + " | ".join(f"{s} ppl | {s} EM %" for s in SPLITS) + " | time (s) |"
    lines = [head, "|" + "---|" * (2 + 2 * len(SPLITS))]
    for label, names in table_rows(list(per_seed[0]["runs"])):
        runs = [r["runs"][n] for r in per_seed for n in names]
        cells = []
        for s in SPLITS:
            cells.append(cell([r["probes"][s]["ppl"] for r in runs], "{:.2f}"))
            cells.append(cell([100 * r["probes"][s]["em"] for r in runs], "{:.1f}"))
        cells.append(cell([r["time"] for r in runs], "{:.0f}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_paths(args):
    """--results, --plot and --out, before any work: the demo writes its table after an hour of runs."""
    check_output(args.out, "--out", "dir")
    if args.results:
        check_output(args.results, "--results")
        if os.path.splitext(args.results)[1].lower() == ".json":
            raise ValueError(f"--results {args.results}: the table is Markdown and its numbers go to a "
                             ".json beside it; name it e.g. results.md")
        try:  # a folder that takes no file: found now
            with open(probe_file := f"{args.results}.{os.getpid()}.tmp", "w"):
                pass
            os.remove(probe_file)
        except OSError as e:
            raise ValueError(f"--results {args.results}: cannot write there ({e.strerror})") from None
    if args.plot:
        plot.need_matplotlib()
    try:  # last: a refused command leaves no folder behind
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot create it ({e.strerror})") from None


def parse_args(argv=None):
    ap = Parser(prog="demo.py", description=__doc__.split("\n")[0])
    a = ap.add_argument
    a("--world", choices=["synthetic", "twiki"], default="synthetic", help="synthetic: this demo; twiki: the paper's "
      "TemporalWiki protocol on real data (every other flag then goes to twiki.py: see python -m experiments.twiki --help)")
    a("--out", help="folder for worlds, base models, traces and runs (default: out/demo, quick: out/demo-quick)")
    a("--seeds", type=SEED, nargs="+", default=[0],
      help="one full replicate (world, base, runs) per seed (>= 0)")
    a("--quick", action="store_true", help="tiny world and model: the whole pipeline in seconds (tests)")
    a("--jobs", type=POS, default=2, help="continual runs at a time")
    a("--threads", type=POS, help="threads per run (default: cores / jobs)")
    a("--controls", choices=["all", "full", "none"], default="full",
      help="FP on random selections of FP's size and on the complement: for every method (all: make results), "
           "for `full` only (the default: make demo stays within its time budget), or none")
    a("--steps", type=POS, help="continual-pretraining steps per run (default: 100, quick 6)")
    a("--lr", type=number("(0, inf)"), help="continual-pretraining learning rate (default 1e-3)")
    a("--lora-lr", type=number("(0, inf)"), help="learning rate of the lora runs (default: 10x --lr)")
    a("--lora-rank", type=POS, default=8, help="rank of the lora runs")
    a("--pretrain-steps", type=POS, help="base-model pretraining steps (default 1000, quick 30)")
    a("--only", nargs="+", help="run only these runs (e.g. full+none lora+fp full+fp:random0 full@alr-lr)")
    a("--plot", action="store_true", help="also write trace.png and trace_facts.png (needs matplotlib)")
    a("--verbose", action="store_true", help="show the base model's pretraining log")
    a("--results", help="also write the table (Markdown) and the raw numbers (JSON beside it) here")
    args = ap.parse_args(argv)
    if args.world != "synthetic":  # main() takes --world out; an abbreviation (--wor) would reach here
        ap.error(f"--world {args.world}: spell the flag out: --world {args.world}")
    if len(set(args.seeds)) < len(args.seeds):  # a repeated seed is the same replicate: a false "± 0.00"
        ap.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed given twice; give each seed once")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.out = args.out or ("out/demo-quick" if args.quick else "out/demo")
    names = {n for n, _, _ in run_specs(FULL)} | {"full@alr-lr"}
    if args.only and not set(args.only) <= names:
        ap.error(f"--only: unknown run {sorted(set(args.only) - names)[0]!r}; runs are {' '.join(sorted(names))}")
    with input_errors("demo.py"):  # before the world and the base model, not after them
        check_paths(args)
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    at = [i for i, x in enumerate(argv) if x == "--world" or x.startswith("--world=")]
    if at:  # --world twiki: the paper's real protocol (twiki.py); --world synthetic: this demo
        i, = at[-1:]
        world = argv[i][8:] if "=" in argv[i] else argv[i + 1] if i + 1 < len(argv) else ""
        if world not in ("synthetic", "twiki") or len(at) > 1:
            fail(f"--world {world!r}: use synthetic (the demo) or twiki (the paper's TemporalWiki protocol), "
                 "once", "demo.py")
        del argv[i:i + (1 if "=" in argv[i] else 2)]
        if world == "twiki":
            from experiments import twiki
            return twiki.main(argv)
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key, val in (("steps", args.steps), ("lr", args.lr), ("pre_steps", args.pretrain_steps)):
        if val is not None:
            cfg[key] = val
    t0 = time.time()
    per_seed = [one_seed(args, cfg, s) for s in args.seeds]
    text = table(per_seed)
    print(f"\nanswer-span perplexity (lower is better) and exact match (%) after continual pretraining on the diff"
          f"{'; mean ± sd over seeds ' + ' '.join(map(str, args.seeds)) if len(args.seeds) > 1 else ''}"
          f"{' (random rows: over draws too)' if args.controls != 'none' else ''}:\n")
    print(text)
    traces = trace_lines(per_seed)
    print(f"\nthe traces (relative gradient norm = span / LM gradient norm, per unit):\n\n{traces}")
    print(f"\ndemo done in {time.time() - t0:.0f}s", flush=True)
    if args.results:
        with input_errors("demo.py"):  # the runs are cached: a rerun only scores and writes
            for path, body in ((os.path.splitext(args.results)[0] + ".json",  # the table last: it says "done"
                                json.dumps(dict(seeds=args.seeds, config=cfg, per_seed=per_seed), indent=1)),
                               (args.results, text + "\n\n" + traces + "\n")):
                try:
                    write_text(path, body)
                except OSError as e:
                    raise ValueError(f"--results: cannot write {path} ({e.strerror}); the runs are cached, "
                                     "rerun with another --results") from None
    return per_seed


if __name__ == "__main__":
    main()
