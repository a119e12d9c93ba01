"""The whole method in one command, on the synthetic temporal world, with the controls.

  world (general language + facts) -> pretrain a small base model on snapshot T0 (cached) -> trace
  relative gradient norms on the diagnostic probes, against held-out general text (the selection)
  and against the model's own fact text (the contrast) -> continual pretraining on the diff with
  full / mixreview / recadam / lora, each with --tgl none / fp / alr, and for each method the
  controls: FP on random selections of the same size, FP on the complement of TGL's selection
  -> plus a `full` run at ALR's mean effective learning rate -> one table, and what the base model and
  each `full` arm now answer to a few updated facts. --check FILE compares each cell with the stored
  seeds of a results file (assets/results.json). Long steps print a progress line every few seconds.

Every step is a plain call of experiments/world.py, train.py, trace.py and probe.py with the flags printed,
so any line of the table can be re-run (or ablated) by hand.
"""
import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import torch

import data
from experiments import probe_files
import probe
import trace as tgl_trace
from experiments import plot, world as tgl_world
from checkpoint import load_model
from common import POS, Parser, check_output, duration, fail, input_errors, number, unused_flag, write_text
from experiments.sample import decode
from experiments.tools import script
from model import unit_names, unit_of
from train import METHODS, TGL_MODES, Config

SPLITS = ("updated", "new", "unchanged")
SEED = number("[0, 2147483647]", int)  # x1000 (+ draw) it seeds the random controls too
# The TGL choices of every run, as trace.py and train.py take them (--control is set per run). One object,
# so the flags the runs get and the ALR scale the matched-LR control computes cannot drift apart.
# rank_units blocks: the paper ranks layers; embed and ln_f always train (README: "Why blocks").
SELECTION = tgl_trace.Selection(rank_units="blocks")
PROGRESS_EVERY = 5.0  # seconds between progress lines of a running step (tests set 0: a line per record)

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


class MetricsFollower:
    """The last record of a run's metrics.jsonl as train.py appends to it: the demo shows a run's progress
    from the file every run writes anyway, so the runs and their numbers stay as they are."""

    def __init__(self, run_dir, steps):
        self.path, self.steps, self.pos = os.path.join(run_dir, "metrics.jsonl"), steps, 0
        self.last = self.shown = None
        with contextlib.suppress(FileNotFoundError):  # a replaced run's old log must not pass for the new one
            os.remove(self.path)

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                text = f.read()
        except FileNotFoundError:  # not yet written: the run is still setting up
            return self.last
        end = text.rfind(b"\n") + 1  # whole lines only: the last one may be half written
        for line in text[:end].splitlines():
            with contextlib.suppress(ValueError):
                self.last = json.loads(line)
        self.pos += end
        return self.last

    def status(self, name) -> str | None:
        """'name: step 400/1000 loss 3.21, ETA 1m' from a record not shown yet (the rate so far), or None."""
        rec = self.poll()
        if not rec or not rec.get("step") or rec is self.shown:
            return None
        self.shown = rec
        eta = rec["time"] / rec["step"] * (self.steps - rec["step"])
        return f"{name}: step {rec['step']}/{self.steps} loss {rec['loss']:.2f}, ETA {duration(eta)}"


def steps_of(argv) -> int:
    return int(argv[argv.index("--steps") + 1])


def out_of(argv) -> str:
    return str(argv[argv.index("--out") + 1])


def run_jobs(jobs, n_parallel, log_dir, threads):
    """Run (name, argv) jobs, n_parallel at a time, each with its log in log_dir; print a line as
    each finishes, and every PROGRESS_EVERY seconds one line with each running job's step, loss and ETA.
    A failed job stops the demo with its log's last lines."""
    pending, running, done, t0, shown = list(jobs), {}, {}, time.time(), time.time()
    while pending or running:
        while pending and len(running) < n_parallel:
            name, argv = pending.pop(0)
            log = open(os.path.join(log_dir, f"{name}.log"), "w")
            follow = MetricsFollower(out_of(argv), steps_of(argv))  # before the run: it clears the old log
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=thread_env(threads))
            running[name] = (proc, log, time.time(), follow)
        time.sleep(0.2)
        for name, (proc, log, start, _) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                tail = open(log.name).read().strip().splitlines()[-3:]
                raise SystemExit(f"error: run {name} failed (exit {proc.returncode}); log {log.name}:\n  "
                                 + "\n  ".join(tail))
            done[name] = time.time() - start
            eta = runs_eta(done, len(pending) + len(running), n_parallel)
            print(f"  [{len(done)}/{len(jobs)}] {name:<24} {done[name]:5.1f}s   "
                  f"(runs {time.time() - t0:5.0f}s{eta})", flush=True)
        if running and time.time() - shown >= PROGRESS_EVERY:
            states = [st for name, (*_, follow) in running.items() if (st := follow.status(name))]
            if states:  # one line for all running jobs: parallel runs do not interleave half lines
                print("  ... " + " | ".join(states), flush=True)
                shown = time.time()
    return done


def wait_showing(proc, follow, label):
    """Wait for proc; every PROGRESS_EVERY seconds print 'label: step s/N loss L, ETA t' from its metrics
    (if follow is a MetricsFollower and a new record came)."""
    shown = time.time()
    while proc.poll() is None:
        time.sleep(0.2)
        state = follow.status(label) if follow and time.time() - shown >= PROGRESS_EVERY else None
        if state:
            print(state, flush=True)
            shown = time.time()


def runs_eta(done: dict, left: int, n_parallel: int) -> str:
    """', ETA 2m' for the jobs not finished yet, at the mean time of the finished ones."""
    if not left:
        return ""
    return f", ETA {duration(sum(done.values()) / len(done) * math.ceil(left / n_parallel))}"


def selection_flags(tgl=None) -> list:
    """SELECTION as trace.py / train.py flags (--rank-units blocks ...); --control is set per run. For a
    train.py run with --tgl `tgl`, only those its mode uses (train.Config.NEEDS: train.py refuses others)."""
    mode = argparse.Namespace(NEEDS=Config.NEEDS, tgl=tgl)
    fields = [(k, v) for k, v in asdict(SELECTION).items() if k != "control" and not (tgl and unused_flag(mode, {k}))]
    return [a for k, v in fields for a in ("--" + k.replace("_", "-"), v)]


def mean_alr_scale(trace_path, base_dir):
    """The parameter-weighted mean of ALR's per-unit LR scales: the `full` run at lr * this is the
    control that tells ALR's gain from a plain lower learning rate. SELECTION is what the ALR runs get as
    flags, so the control follows any change of it."""
    model = load_model(base_dir)
    scales = tgl_trace.tgl_plan(tgl_trace.load_trace(trace_path), "alr", replace(SELECTION, control="none"),
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
        built = os.path.exists(os.path.join(world_dir, "world.json"))
        why = "parameters changed, rebuilding" if built else "building"
        print(f"[seed {seed}] world: {why}:\n  python -m experiments.world --out {world_dir} --seed {seed} "
              f"--n-entities {cfg['entities']} --heldout-words {cfg['heldout_words']}", flush=True)
        with input_errors("demo.py"):  # a folder of someone else's files of the world's names: one line
            meta = tgl_world.make_world(world_dir, wcfg)
    c = meta["counts"]
    words = c["words"]
    print(f"[seed {seed}] world: {words['t0.txt']:,} words at T0 ({words['t0_facts.txt']:,} in fact "
          f"documents), {c['facts_updated']} updated facts, {c['things_new']} new entities; "
          f"probes {c['probes']}", flush=True)
    return meta


def pretrain(args, cfg, seed, world_dir, base, meta):
    """The base model, pretrained from scratch on T0; cached by its exact command and world config.
    It runs alone, so it gets every core the parallel runs share."""
    threads = args.threads * args.jobs
    pre = script("train.py", "--init", "scratch", "--tokenizer", "word",
                 "--data", os.path.join(world_dir, "t0.txt"), "--out", base,
                 "--n-layer", cfg["n_layer"], "--n-head", cfg["n_head"], "--n-embd", cfg["n_embd"],
                 "--block-size", cfg["block"], "--steps", cfg["pre_steps"], "--batch-size", cfg["pre_batch"],
                 "--lr", cfg["pre_lr"], "--warmup", max(1, cfg["pre_steps"] // 20),
                 "--min-lr", cfg["pre_lr"] / 10, "--weight-decay", 0.1, "--seed", seed, "--threads", threads)
    key = sh(pre[1:]) + "\nworld " + json.dumps(meta["config"], sort_keys=True)
    # Not part of the cache key: a stale or partial base is replaced, and the log's cadence (a record every
    # 1% of the steps, for the progress lines) changes no weight.
    pre += ["--log-every", str(max(1, cfg["pre_steps"] // 100)), "--overwrite"]
    key_file = os.path.join(base, "demo_command.txt")
    cached = os.path.exists(os.path.join(base, "ckpt.pt")) and os.path.exists(key_file)
    if cached and open(key_file).read() == key:
        print(f"[seed {seed}] base model: cached in {base}", flush=True)
        return
    print(f"[seed {seed}] pretraining the base model on T0 ({cfg['pre_steps']} steps):\n"
          f"  python {sh(pre[1:])}", flush=True)
    t = time.time()
    follow = MetricsFollower(base, cfg["pre_steps"])  # before the run: it clears a replaced base's log
    proc = subprocess.Popen(pre, env=thread_env(threads), stdout=None if args.verbose else subprocess.DEVNULL)
    wait_showing(proc, None if args.verbose else follow, f"[seed {seed}] base")  # --verbose: train.py's log
    if proc.returncode != 0:
        raise SystemExit("error: pretraining failed (run the command above to see why)")
    write_text(key_file, key)
    print(f"[seed {seed}] pretrained in {time.time() - t:.0f}s", flush=True)


def run_trace(args, cfg, seed, root, lm_text, name):
    """trace.py on the diagnostic probes against the world's lm_text; returns the trace dict."""
    world_dir, base = os.path.join(root, "world"), os.path.join(root, "base")
    diag = [os.path.join(world_dir, "probes", f"diag_{s}.jsonl") for s in ("updated", "new")]
    path = os.path.join(root, f"{name}.json")
    targv = ["--init", base, "--probes", *diag, "--text", os.path.join(world_dir, lm_text), "--out", path,
             "--n-span", cfg["n_span"], "--n-lm", cfg["n_lm"], "--seed", seed, *selection_flags()]
    print(f"[seed {seed}] tracing against {lm_text}:\n  {sh(['python', 'trace.py', *map(str, targv)])}",
          flush=True)
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
        out[s] = dict(rgn=d["rgn"], min=min(v), max=max(v),
                      max_over_min=max(v) / min(v) if min(v) > 0 else None,
                      peak=max((u for u in d["units"] if u.startswith("h.")), key=lambda u: d["rgn"][u]))
    return out


def trace_lines(per_seed: list) -> str:
    """Per seed and trace: the level and spread of rgn over the blocks' units, each split's peak, and
    how differently updated and new probes spread over units (max/min over units of their rgn ratio)."""
    lines = ["| seed | LM text | rgn over blocks (all probes) | max/min | peak: updated | peak: new "
             "| updated/new spread |",
             "|---|---|---|---|---|---|---|"]
    for r in per_seed:
        seed = r["seed"]
        for name, t in r["traces"].items():
            a, u, n = t["all"], t.get("diag_updated"), t.get("diag_new")
            spread = "-"
            if u and n:
                ratio = [u["rgn"][k] / n["rgn"][k] for k in u["rgn"]
                         if k.startswith("h.") and n["rgn"][k] > 0]
                spread = f"{max(ratio) / min(ratio):.2f}"
            lines.append(f"| {seed} | {'held-out general text' if name == 'general' else 'own fact text'} | "
                         f"{a['min']:.1f}–{a['max']:.1f} | {a['max_over_min']:.2f} | "
                         f"{u['peak'] if u else '-'} | "
                         f"{n['peak'] if n else '-'} | {spread} |")
    return "\n".join(lines)


def run_specs(cfg, controls="all", seed=0):
    """[(run name, method, extra train.py flags)]: every method x TGL arm, then its controls. Draw d of
    demo seed s uses --control random:(1000 s + d): a random selection depends only on its seed and
    size, so the same d in every demo seed would repeat the same units whenever FP picks as many."""
    specs = []
    for m in METHODS:
        specs += [(f"{m}+{t}", m, ["--tgl", t]) for t in TGL_MODES]
        if controls == "all" or controls == m:
            specs += [(f"{m}+fp:random{d}", m, ["--tgl", "fp", "--control", f"random:{1000 * seed + d}"])
                      for d in range(cfg["draws"])]
            specs.append((f"{m}+fp:complement", m, ["--tgl", "fp", "--control", "complement"]))
    return specs


def continual_jobs(args, cfg, seed, root):
    """[(name, argv)] of the continual runs of one seed (world, base and trace.json under root)."""
    world_dir, base = os.path.join(root, "world"), os.path.join(root, "base")
    trace_path = os.path.join(root, "trace.json")
    probes = [os.path.join(world_dir, "probes", f"{s}.jsonl") for s in SPLITS]
    common = ["--init", base, "--data", os.path.join(world_dir, "diff.txt"), "--probes", *probes,
              "--steps", cfg["steps"], "--batch-size", cfg["batch"], "--block-size", cfg["block"],
              "--warmup", max(1, cfg["steps"] // 10), "--seed", seed,
              "--log-every", max(1, cfg["steps"] // 10),
              "--eval-every", max(1, cfg["steps"] // 5), "--threads", args.threads,
              "--overwrite"]  # the demo re-runs its arms
    extra = {"mixreview": ["--replay-data", os.path.join(world_dir, "t0.txt")], "recadam": [],
             "lora": ["--lora-rank", args.lora_rank], "full": []}
    lr_for = {"lora": args.lora_lr or 10 * cfg["lr"]}  # adapters start at zero and need a larger step
    jobs = []
    controls = "all" if args.only else args.controls  # --only may name any run
    for name, m, flags in run_specs(cfg, controls, seed):
        argv = script("train.py", *common, "--method", m, "--lr", lr_for.get(m, cfg["lr"]), *extra[m], *flags,
                      *selection_flags(flags[1]), "--out", os.path.join(root, "runs", name))
        jobs.append((name, argv + (["--trace", trace_path] if "none" not in flags else [])))
    alr_lr = cfg["lr"] * mean_alr_scale(trace_path, base)
    jobs.append(("full@alr-lr", script("train.py", *common, "--method", "full", "--tgl", "none",
                                       "--lr", alr_lr, "--out", os.path.join(root, "runs", "full@alr-lr"))))
    return [j for j in jobs if not args.only or j[0] in args.only]


def one_seed(args, cfg, seed):
    root = os.path.join(args.out, f"seed{seed}")
    world_dir, base = os.path.join(root, "world"), os.path.join(root, "base")
    logs = os.path.join(root, "logs")
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
    probes = [p for s in SPLITS for p in probe_files.read_probes(os.path.join(world_dir, "probes", f"{s}.jsonl"))]
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


COLUMNS = [(s, k) for s in SPLITS for k in ("ppl", "em")]  # the table's number cells, left to right
PLACES = {"ppl": 2, "em": 1}  # decimals printed


def column_values(per_seed: list, names: list, split: str, kind: str) -> list:
    """One cell's values over seeds (and random draws): perplexity, or EM in %."""
    runs = [r["runs"][n] for r in per_seed for n in names]
    return [(1 if kind == "ppl" else 100) * r["probes"][split][kind] for r in runs]


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
        cells = [cell(column_values(per_seed, names, s, k), f"{{:.{PLACES[k]}f}}") for s, k in COLUMNS]
        cells.append(cell([r["runs"][n]["time"] for r in per_seed for n in names], "{:.0f}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----- --check: this run against the stored seeds of a results file (assets/results.json)

def load_check(path, cfg) -> dict:
    """The results JSON that --results writes, refused before any work if its runs had other sizes: a
    quick demo against the full demo's numbers says nothing."""
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except OSError as e:
        raise ValueError(f"--check {path}: cannot read it ({e.strerror})") from None
    except ValueError:  # not JSON (or not UTF-8): the line below says what is wanted
        stored = None
    if not (isinstance(stored, dict) and isinstance(stored.get("per_seed"), list) and stored["per_seed"]
            and all(isinstance(r, dict) and "runs" in r and "traces" in r for r in stored["per_seed"])):
        raise ValueError(f"--check {path}: not a demo results file (the .json that --results writes)")
    differ = [k for k in cfg if stored.get("config", {}).get(k) != cfg[k]]
    if differ:
        k = differ[0]
        raise ValueError(f"--check {path}: its runs used {k} {stored.get('config', {}).get(k)}, this demo "
                         f"{cfg[k]}; compare runs of the same sizes (the file's: make demo, no --quick)")
    return stored


def in_range(value, lo, hi, places):
    """lo..hi widened by half a unit of the printed precision: a cell that prints as a bound is inside."""
    return lo - 0.5 * 10 ** -places <= value <= hi + 0.5 * 10 ** -places


def check_table(per_seed: list, stored: dict) -> str:
    """This run's table with, per cell, the range (min–max) of that cell over the stored seeds, OUT where
    it lies outside, a summary line, and the same for each trace's max/min of the blocks' rgn."""
    def mean(v):
        return sum(v) / len(v)

    lines = ["| run | " + " | ".join(f"{s} {'ppl' if k == 'ppl' else 'EM %'}" for s, k in COLUMNS) + " |",
             "|" + "---|" * (1 + len(COLUMNS))]
    stored_rows = [dict(table_rows(list(r["runs"]))) for r in stored["per_seed"]]
    inside = total = 0
    for label, names in table_rows(list(per_seed[0]["runs"])):
        cells = []
        for s, k in COLUMNS:
            value, fmt = mean(column_values(per_seed, names, s, k)), f"{{:.{PLACES[k]}f}}"
            there = [mean(column_values([r], rows[label], s, k))
                     for r, rows in zip(stored["per_seed"], stored_rows) if label in rows]
            if not there:
                cells.append(fmt.format(value) + " (not stored)")
                continue
            lo, hi, total = min(there), max(there), total + 1
            ok = in_range(value, lo, hi, PLACES[k])
            inside += ok
            cells.append(f"{fmt.format(value)}{'' if ok else ' OUT'} ({fmt.format(lo)}–{fmt.format(hi)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    seeds = " ".join(str(r["seed"]) for r in stored["per_seed"])
    lines.append(f"\n{inside} of {total} cells inside the stored seeds' range (seeds {seeds}; "
                 "± half the printed precision)")
    for name, text in (("general", "held-out general text"), ("facts", "own fact text")):
        there = [r["traces"][name]["all"]["max_over_min"] for r in stored["per_seed"] if name in r["traces"]]
        mine = [r["traces"][name]["all"]["max_over_min"] for r in per_seed if name in r["traces"]]
        if there and mine:
            ok = in_range(mean(mine), min(there), max(there), 2)
            lines.append(f"trace against {text}: the blocks' rgn max/min {mean(mine):.2f}"
                         f"{'' if ok else ' OUT'} (stored seeds {min(there):.2f}–{max(there):.2f})")
    return "\n".join(lines)


# ----- what the models say: greedy answers to a few updated facts

@torch.inference_mode()
def samples(root, names, n_facts=3) -> str:
    """For the first n_facts updated facts: the gold (new) answer and what the base model and each `full`
    arm (else the first runs) say: greedy GPT.generate from the probe's prompt, as many tokens as the
    gold answer has, so a match is the probe's exact match."""
    world_dir, tok = os.path.join(root, "world"), data.load_tokenizer(os.path.join(root, "base"))
    arms = [n for n in names if n in {f"full+{t}" for t in TGL_MODES}] or list(names)[:3]
    models = {"base": load_model(os.path.join(root, "base"))}
    models.update((n, load_model(os.path.join(root, "runs", n))) for n in arms)
    lines = ["| prompt | gold | " + " | ".join(f"{n} says" for n in models) + " |",
             "|---" * (2 + len(models)) + "|"]
    for pr in probe_files.read_probes(os.path.join(world_dir, "probes", "updated.jsonl"))[:n_facts]:
        idx, targets = data.span_example(tok, pr.prompt, pr.answers[0])  # the tokens the scorer reads
        n_answer = sum(t != -1 for t in targets)
        prompt = torch.tensor([idx[:len(idx) - n_answer + 1]])  # (1, T): the prompt, without the answer
        said = [decode(tok, m.generate(prompt, n_answer)[0, prompt.size(1):].tolist()).strip()
                for m in models.values()]
        lines.append(f"| {pr.prompt.strip()} | {pr.answers[0]} | " + " | ".join(said) + " |")
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
    a("--world", choices=["synthetic", "twiki"], default="synthetic",
      help="synthetic: this demo; twiki: the paper's TemporalWiki protocol on real data (every other flag "
           "then goes to twiki.py: see python -m experiments.twiki --help)")
    a("--out", help="folder for worlds, base models, traces and runs "
                    "(default: out/demo, quick: out/demo-quick)")
    a("--seeds", type=SEED, nargs="+", default=[0],
      help="one full replicate (world, base, runs) per seed (>= 0)")
    a("--quick", action="store_true", help="tiny world and model: the whole pipeline in seconds (tests)")
    a("--jobs", type=POS, default=2, help="continual runs at a time")
    a("--threads", type=POS, help="threads per run (default: cores / jobs)")
    a("--controls", choices=["all", "full", "none"], default="full",
      help="FP on random selections of FP's size and on the complement: for every method "
           "(all: make results), "
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
    a("--check", help="also mark each cell outside the range of the stored seeds in this results JSON "
      "(e.g. assets/results.json; it must have this run's sizes)")
    args = ap.parse_args(argv)
    if args.world != "synthetic":  # main() takes --world out; an abbreviation (--wor) would reach here
        ap.error(f"--world {args.world}: spell the flag out: --world {args.world}")
    if len(set(args.seeds)) < len(args.seeds):  # a repeated seed is the same replicate: a false "± 0.00"
        ap.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed given twice; give each seed once")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.out = args.out or ("out/demo-quick" if args.quick else "out/demo")
    names = {n for n, _, _ in run_specs(FULL)} | {"full@alr-lr"}
    if args.only and not set(args.only) <= names:
        unknown = sorted(set(args.only) - names)[0]
        ap.error(f"--only: unknown run {unknown!r}; runs are {' '.join(sorted(names))}")
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
    with input_errors("demo.py"):  # before the world and the base model, not after them
        stored = load_check(args.check, cfg) if args.check else None
    t0 = time.time()
    per_seed = [one_seed(args, cfg, s) for s in args.seeds]
    text = table(per_seed)
    print("\nanswer-span perplexity (lower is better) and exact match (%) after continual pretraining on "
          "the diff"
          f"{'; mean ± sd over seeds ' + ' '.join(map(str, args.seeds)) if len(args.seeds) > 1 else ''}"
          f"{' (random rows: over draws too)' if args.controls != 'none' else ''}:\n")
    print(text)
    traces = trace_lines(per_seed)
    print(f"\nthe traces (relative gradient norm = span / LM gradient norm, per unit):\n\n{traces}")
    if stored:
        print(f"\nthis run against {args.check}: each cell with the range (min–max) of that cell over "
              f"its seeds, OUT outside it:\n\n{check_table(per_seed, stored)}")
    root = os.path.join(args.out, f"seed{args.seeds[0]}")
    print(f"\nwhat the models say (seed {args.seeds[0]}): greedy answers to updated facts, as many tokens as "
          f"the gold answer\n\n{samples(root, [n for n in per_seed[0]['runs'] if n != 'base (no update)'])}")
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
