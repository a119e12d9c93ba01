"""The whole method in one command, on the synthetic temporal world.

  world -> pretrain a small base model on snapshot T0 (cached) -> trace relative gradient norms
  on the diagnostic probes -> continual pretraining on the diff with full / mixreview / recadam /
  lora, each with --tgl none / fp / alr, plus a `full` run at ALR's mean effective learning rate
  -> one table: answer-span perplexity and exact match on updated, new and unchanged probes.

Every step is a plain call of data.py, train.py, trace.py and probe.py with the flags printed,
so any line of the table can be re-run (or ablated) by hand.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import data
import probe
import trace as tgl_trace
from common import write_text
from model import load_model, unit_names, unit_of

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("full", "mixreview", "recadam", "lora")
TGLS = ("none", "fp", "alr")
SPLITS = ("updated", "new", "unchanged")

# Sizes of the demo. --quick shrinks everything so the tests run the whole pipeline in seconds.
FULL = dict(entities=300, n_layer=4, n_head=4, n_embd=128, block=64, pre_steps=1000, pre_batch=32, pre_lr=3e-3,
            steps=150, batch=16, lr=1e-3, n_span=100, n_lm=100)
QUICK = dict(entities=24, n_layer=2, n_head=2, n_embd=32, block=32, pre_steps=30, pre_batch=8, pre_lr=3e-3,
             steps=6, batch=8, lr=1e-3, n_span=8, n_lm=8)


def sh(argv):
    return " ".join(a if a and " " not in a else repr(a) for a in argv)


def python(script, *args):
    return [sys.executable, os.path.join(HERE, script), *map(str, args)]


def run_jobs(jobs, n_parallel, log_dir):
    """Run (name, argv) jobs, n_parallel at a time, each with its log in log_dir; print a line as
    each finishes. A failed job stops the demo with its log's last lines."""
    pending, running, done, t0 = list(jobs), {}, {}, time.time()
    while pending or running:
        while pending and len(running) < n_parallel:
            name, argv = pending.pop(0)
            log = open(os.path.join(log_dir, f"{name}.log"), "w")
            running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log, time.time())
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
            print(f"  [{len(done)}/{len(jobs)}] {name:<18} {done[name]:5.1f}s   (demo {time.time() - t0:5.0f}s)", flush=True)
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


def one_seed(args, cfg, seed):
    root = os.path.join(args.out, f"seed{seed}")
    world, base = os.path.join(root, "world"), os.path.join(root, "base")
    logs = os.path.join(root, "logs")
    os.makedirs(logs, exist_ok=True)
    probes = {s: os.path.join(world, "probes", f"{s}.jsonl") for s in SPLITS}
    diag = [os.path.join(world, "probes", f"diag_{s}.jsonl") for s in ("updated", "new")]

    # 1. the world: T0 text, the diff, probes in TempLAMA / ECBD formats
    if not os.path.exists(os.path.join(world, "world.json")):
        data.make_world(world, seed=seed, n_entities=cfg["entities"])
    counts = json.load(open(os.path.join(world, "world.json")))["counts"]
    print(f"[seed {seed}] world: {counts['facts_t0']} facts at T0, {counts['facts_updated']} updated, "
          f"{counts['facts_new']} about new entities; probes {counts['probes']}", flush=True)

    # 2. the base model: pretrained from scratch on T0, cached by its exact command
    pre = python("train.py", "--init", "scratch", "--tokenizer", "word", "--data", os.path.join(world, "t0.txt"),
                 "--out", base, "--n-layer", cfg["n_layer"], "--n-head", cfg["n_head"], "--n-embd", cfg["n_embd"],
                 "--block-size", cfg["block"], "--steps", cfg["pre_steps"], "--batch-size", cfg["pre_batch"],
                 "--lr", cfg["pre_lr"], "--warmup", max(1, cfg["pre_steps"] // 20), "--min-lr", cfg["pre_lr"] / 10,
                 "--weight-decay", 0.1, "--seed", seed, "--log-every", max(1, cfg["pre_steps"] // 10), "--overwrite")
    key_file = os.path.join(base, "demo_command.txt")
    if os.path.exists(os.path.join(base, "ckpt.pt")) and os.path.exists(key_file) and open(key_file).read() == sh(pre[1:]):
        print(f"[seed {seed}] base model: cached in {base}", flush=True)
    else:
        print(f"[seed {seed}] pretraining the base model on T0 ({cfg['pre_steps']} steps):\n  {sh(pre[1:])}", flush=True)
        t = time.time()
        if subprocess.run(pre).returncode != 0:
            raise SystemExit("error: pretraining failed (see above)")
        write_text(key_file, sh(pre[1:]))
        print(f"[seed {seed}] pretrained in {time.time() - t:.0f}s", flush=True)

    # 3. trace: where do the diagnostic probes' gradients go, relative to ordinary LM gradients?
    trace_path = os.path.join(root, "trace.json")
    targv = ["--init", base, "--probes", *diag, "--text", os.path.join(world, "t0.txt"), "--out", trace_path,
             "--n-span", cfg["n_span"], "--n-lm", cfg["n_lm"], "--seed", seed]
    if args.plot:
        targv += ["--plot", os.path.join(root, "trace.png")]
    print(f"[seed {seed}] tracing:\n  {sh(['trace.py', *map(str, targv)])}", flush=True)
    tgl_trace.main([str(a) for a in targv])

    # 4. continual pretraining on the diff: 4 methods x 3 TGL modes, and the matched-LR control
    common = ["--init", base, "--data", os.path.join(world, "diff.txt"), "--probes", *probes.values(),
              "--steps", cfg["steps"], "--batch-size", cfg["batch"], "--block-size", cfg["block"],
              "--warmup", max(1, cfg["steps"] // 10), "--seed", seed, "--log-every", max(1, cfg["steps"] // 5),
              "--threads", max(1, (os.cpu_count() or 1) // args.jobs), "--overwrite"]  # the demo re-runs its arms
    extra = {"mixreview": ["--replay-data", os.path.join(world, "t0.txt"), "--replay-ratio", args.replay_ratio],
             "recadam": [], "lora": ["--lora-rank", args.lora_rank], "full": []}
    lr_for = {"lora": args.lora_lr or 10 * cfg["lr"]}  # adapters start at zero and need a larger step
    jobs = []
    for m in METHODS:
        for t in TGLS:
            lr = lr_for.get(m, cfg["lr"])
            argv = python("train.py", *common, "--method", m, "--tgl", t, "--lr", lr, *extra[m],
                          "--out", os.path.join(root, "runs", f"{m}+{t}"))
            jobs.append((f"{m}+{t}", argv + (["--trace", trace_path] if t != "none" else [])))
    alr_lr = cfg["lr"] * mean_alr_scale(trace_path, base)
    jobs.append(("full@alr-lr", python("train.py", *common, "--method", "full", "--tgl", "none", "--lr", alr_lr,
                                       "--out", os.path.join(root, "runs", "full@alr-lr"))))
    if args.only:
        jobs = [j for j in jobs if j[0] in args.only]
    print(f"[seed {seed}] {len(jobs)} continual runs, {args.jobs} at a time (logs in {logs}); e.g.\n  {sh(jobs[0][1][1:])}",
          flush=True)
    times = run_jobs(jobs, args.jobs, logs)

    # 5. results: the base model before any update, then every run
    rows = {"base (no update)": dict(probes=base_scores(base, probes), time=0.0)}
    for name, _ in jobs:
        s = json.load(open(os.path.join(root, "runs", name, "summary.json")))
        rows[name] = dict(probes=s["probes"], time=times[name], lr=s.get("lr"))
    return rows


def base_scores(base, probe_files):
    model, tok = load_model(base), data.load_tokenizer(base)
    return probe.evaluate(model, tok, [p for f in probe_files.values() for p in data.read_probes(f)])


def table(per_seed: list) -> str:
    """Markdown table; with several seeds each cell is mean ± standard deviation."""
    def cell(vals, fmt):
        m = sum(vals) / len(vals)
        if len(vals) == 1:
            return fmt.format(m)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        return fmt.format(m) + " ± " + fmt.format(sd)

    head = "| run | " + " | ".join(f"{s} ppl | {s} EM" for s in SPLITS) + " | time (s) |"
    lines = [head, "|" + "---|" * (2 + 2 * len(SPLITS))]
    for name in per_seed[0]:
        cells = []
        for s in SPLITS:
            cells.append(cell([r[name]["probes"][s]["ppl"] for r in per_seed], "{:.2f}"))
            cells.append(cell([100 * r[name]["probes"][s]["em"] for r in per_seed], "{:.1f}"))
        cells.append(cell([r[name]["time"] for r in per_seed], "{:.0f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/demo", help="folder for worlds, base models, traces and runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full replicate (world, base, runs) per seed")
    ap.add_argument("--quick", action="store_true", help="tiny world and model: the whole pipeline in seconds (tests)")
    ap.add_argument("--jobs", type=int, default=2, help="continual runs at a time (each gets cores / jobs threads)")
    ap.add_argument("--steps", type=int, help="continual-pretraining steps per run (default: 150, quick 6)")
    ap.add_argument("--lr", type=float, help="continual-pretraining learning rate (default 1e-3)")
    ap.add_argument("--lora-lr", type=float, help="learning rate of the lora runs (default: 10x --lr)")
    ap.add_argument("--lora-rank", type=int, default=8, help="rank of the lora runs")
    ap.add_argument("--replay-ratio", type=float, default=0.25, help="mixreview: share of replayed T0 text per batch")
    ap.add_argument("--pretrain-steps", type=int, help="base-model pretraining steps (default 1000, quick 30)")
    ap.add_argument("--only", nargs="+", help="run only these runs (e.g. full+none lora+fp full@alr-lr)")
    ap.add_argument("--plot", action="store_true", help="also write trace.png (needs matplotlib)")
    ap.add_argument("--results", help="also write the table (Markdown) and the raw numbers (JSON beside it) here")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    names = {f"{m}+{t}" for m in METHODS for t in TGLS} | {"full@alr-lr"}
    if args.only and not set(args.only) <= names:
        ap.error(f"--only: unknown run {sorted(set(args.only) - names)[0]!r}; runs are {' '.join(sorted(names))}")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key, val in (("steps", args.steps), ("lr", args.lr), ("pre_steps", args.pretrain_steps)):
        if val is not None:
            cfg[key] = val
    t0 = time.time()
    per_seed = [one_seed(args, cfg, s) for s in args.seeds]
    text = table(per_seed)
    print(f"\nanswer-span perplexity (lower is better) and exact match (%) after continual pretraining on the diff"
          f"{'; mean ± sd over seeds ' + ' '.join(map(str, args.seeds)) if len(args.seeds) > 1 else ''}:\n")
    print(text)
    print(f"\ndemo done in {time.time() - t0:.0f}s", flush=True)
    if args.results:
        write_text(args.results, text + "\n")
        write_text(os.path.splitext(args.results)[0] + ".json", json.dumps(dict(seeds=args.seeds, config=cfg, runs=per_seed), indent=1))
    return per_seed


if __name__ == "__main__":
    main()
