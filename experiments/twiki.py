"""The paper's experiment on TemporalWiki in one command: staged continual pretraining, month pair
by month pair, with every method x TGL mode, and one table at the end.

    python -m experiments.twiki --init gpt2 --out runs/twiki --methods full mixreview --tgl none fp
    python -m experiments.twiki --init gpt2 --out runs/smoke --max-train-tokens 5M --snapshot-mb 50   # smoke test: every step, small
    python -m experiments.twiki --init gpt2-large --out runs/large --plan --assume-tok-s 50000   # commands, sizes, time; runs nothing

For each stage (month pair 0801-0901, 0901-1001, 1001-1101, 1101-1201), in order:
  fetch what is missing -> split the stage's diff set into training text and a held-out slice ->
  score the untouched --init model on the stage's probes (the "init" row) -> trace each TGL arm's
  current model on the stage's diagnostic probes against the old snapshot -> continually pretrain
  each arm (method x TGL mode) on the diff set -> train.py scores the probes and the held-out text
  -> each arm's run folder is its --init in the next stage.
Every step is a plain experiments.realdata / trace.py / train.py / probe.py command, printed as it runs (and
by --plan), so any cell of the table can be re-run by hand. A finished step is never re-run: run
the same command again after an interruption and it goes on where it stopped.
"""
import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import data
from experiments import fetch, realdata
from common import Parser, atomic_path, check_output, input_errors, read_json, write_text
from experiments.compare import ordered
from experiments.tools import check_number, script
from model import HUB_NAMES

HERE = Path(__file__).resolve().parents[1]  # the repository root, as common.script builds paths
PROG = "twiki.py"
METHODS = ("full", "mixreview", "recadam", "lora")
TGLS = ("none", "fp", "alr")
# (probe month pair, old snapshot month, new month): TemporalWiki's four consecutive updates. The diff
# set of a stage is TWiki_Diffsets/wikipedia_{old}{new}_gpt2.csv, its old text Wikipedia_Full/wikipedia_{old}_gpt2/.
STAGES = (("0801-0901", "08", "09"), ("0901-1001", "09", "10"), ("1001-1101", "10", "11"), ("1101-1201", "11", "12"))
# Parameters of the hub models, for the plan's checkpoint sizes (no model is loaded by --plan).
HUB_PARAMS = {"gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6,
              "EleutherAI/gpt-neo-125m": 125e6, "EleutherAI/gpt-neo-1.3B": 1316e6}
# Flags that decide what the runs in --out compute: continuing a run folder with any of them changed
# would mix two experiments in one table, so it is refused (protocol.json). --methods, --tgl and
# --stages are not among them: each arm and stage is its own folder, so adding one just runs it.
RUN_KEYS = ("init", "max_train_tokens", "batch_size", "block_size", "grad_accum", "lr", "warmup", "snapshot_mb",
            "val_every", "val_tokens", "metric", "templama", "ecbd", "train_args", "trace_args", "seed")
# Flags the driver sets itself in every train.py / trace.py command: --train-args / --trace-args must not.
OWN_FLAGS = {"--init", "--out", "--data", "--replay-data", "--method", "--tgl", "--trace", "--probes", "--steps",
             "--resume", "--overwrite", "--metric", "--text", "--batch-size",
             "--block-size", "--grad-accum", "--lr", "--warmup", "--seed", "--device", "--threads"}


@dataclass
class Config:
    init: str
    out: str
    methods: list = field(default_factory=lambda: ["full"])
    tgl: list = field(default_factory=lambda: ["none", "fp"])
    stages: list = field(default_factory=lambda: [1, 2, 3, 4])
    max_train_tokens: int | None = None
    batch_size: int = 8
    block_size: int = 1024
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 0
    snapshot_mb: float = 500.0
    val_every: int = 100
    val_tokens: int = 65536
    metric: str = "span"
    templama: list = field(default_factory=list)
    ecbd: list = field(default_factory=list)
    train_args: str = ""
    trace_args: str = ""
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    compile: bool = False
    nproc: int = 1
    plan: bool = False
    assume_tok_s: float | None = None
    overwrite: bool = False

    @property
    def arms(self):
        return [f"{m}-{t}" for m in self.methods for t in self.tgl]


# ----------------------------------------------------------------------------- CLI

def count(text: str) -> int:
    """'5M' -> 5_000_000; also k and G, and plain integers (argparse type of the token flags)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kMG]?)", text.strip())
    if not m:
        raise ValueError(f"not a token count: {text!r} (e.g. 5M, 200k, 1000000)")
    return int(float(m.group(1)) * {"": 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}[m.group(2)])


def stage_number(text: str) -> int:
    """'2' or '0901-1001' -> 2."""
    pairs = [s[0] for s in STAGES]
    if text in pairs:
        return pairs.index(text) + 1
    if text.isdigit() and 1 <= int(text) <= len(STAGES):
        return int(text)
    raise ValueError(f"unknown stage {text!r}: 1-{len(STAGES)} or a month pair ({', '.join(pairs)})")


def parse_args(argv=None) -> Config:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a, d = p.add_argument, Config(init="", out="")
    a("--init", required=True,
      help="stage 1's model: gpt2, gpt2-large, EleutherAI/gpt-neo-1.3B, ..., a local HF folder or a run folder")
    a("--out", required=True, help="the protocol's folder: protocol.json, probes/, stageK/ARM run folders, results.md/.json")
    a("--methods", nargs="+", choices=METHODS, default=d.methods, help="continual-learning methods (arms = methods x --tgl)")
    a("--tgl", nargs="+", choices=TGLS, default=d.tgl, help="TGL modes stacked on each method")
    a("--stages", nargs="+", default=["1", "2", "3", "4"], help="stages to run: numbers 1-4 or month pairs like 0901-1001")
    a("--max-train-tokens", type=count,
      help="cap each stage's training at N tokens (5M, 200k); default one pass over the diff set")
    a("--batch-size", type=int, default=d.batch_size, help="train.py --batch-size (the global batch, in windows)")
    a("--block-size", type=int, default=d.block_size, help="tokens per training window")
    a("--grad-accum", type=int, default=d.grad_accum, help="train.py --grad-accum (micro-steps per update)")
    a("--lr", type=float, default=d.lr, help="peak learning rate")
    a("--warmup", type=int, default=d.warmup, help="linear warmup updates per stage")
    a("--snapshot-mb", type=float, default=d.snapshot_mb, help="MB of text taken from each old snapshot (tracing, replay)")
    a("--val-every", type=int, default=d.val_every,
      help="every Nth document of a diff set is held out for val ppl, never trained on")
    a("--val-tokens", type=count, default=d.val_tokens, help="tokens of the held-out slice scored for val ppl")
    a("--metric", choices=["span", "sentence"], default=d.metric,
      help="probe perplexity over the answer span (the paper's) or the whole sentence (TemporalWiki's scorer)")
    a("--templama", nargs="+", default=[], help="extra probe files scored at every stage (e.g. TempLAMA splits)")
    a("--ecbd", nargs="+", default=[], help="extra ECBD probe files scored at every stage")
    a("--train-args", default="", help="more train.py flags for every run, quoted (e.g. '--recadam-gamma 50 --eval-every 500'; "
      "one flag alone: --train-args=--flag)")
    a("--trace-args", default="", help="more trace.py flags, quoted (e.g. '--n-span 200 --select topk:8')")
    a("--seed", type=int, default=d.seed, help="seed of the probe splits and of training")
    a("--device", default=d.device, help="auto | cpu | cuda | mps, for every step")
    a("--threads", type=int, help="CPU threads per step")
    a("--compile", action="store_true", help="train.py --compile (torch.compile, CUDA)")
    a("--nproc", type=int, default=d.nproc,
      help="processes per training step: >1 runs train.py under torchrun --nproc_per_node N")
    a("--plan", action="store_true", help="print every command, download and disk sizes and a time estimate; run nothing")
    a("--assume-tok-s", type=float, help="--plan: ASSUMED training tokens/s per run, for the time estimate (not a measurement)")
    a("--overwrite", action="store_true", help="start over in --out when its protocol.json has other flags")
    args = p.parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(args).items() if k != "stages"})
    with input_errors(PROG):
        cfg.stages = sorted({stage_number(s) for s in args.stages})
    return cfg


def check_config(cfg: Config):
    """Every flag and path, before anything slow (no network, no model load)."""
    check_output(cfg.out, "--out", "dir")
    if cfg.init not in HUB_NAMES and not os.path.exists(cfg.init):
        raise ValueError(f"--init {cfg.init}: not a known model ({', '.join(HUB_NAMES)}) nor a local folder")
    for f in cfg.templama + cfg.ecbd:
        if not os.path.isfile(f):
            raise ValueError(f"no such probe file: {f}")
    for flag in ("batch_size", "block_size", "grad_accum", "val_every", "val_tokens", "max_train_tokens", "threads", "nproc"):
        check_number("--" + flag.replace("_", "-"), getattr(cfg, flag), low=1, integer=True)
    check_number("--warmup", cfg.warmup, low=0, integer=True)
    check_number("--lr", cfg.lr, low=0, low_open=True)
    check_number("--snapshot-mb", cfg.snapshot_mb, low=0, low_open=True)
    check_number("--assume-tok-s", cfg.assume_tok_s, low=0, low_open=True)
    for flag, extra in (("--train-args", cfg.train_args), ("--trace-args", cfg.trace_args)):
        taken = [t.split("=")[0] for t in shlex.split(extra) if t.split("=")[0] in OWN_FLAGS]
        if taken:
            raise ValueError(f"{flag}: {taken[0]} is set by twiki.py itself; use twiki.py's own flag for it")
    check_protocol(cfg)
    for k in cfg.stages:  # a stage trains on from the previous stage's runs, which must exist
        ready = not cfg.overwrite and all(finished(run_dir(cfg, k - 1, arm)) for arm in cfg.arms)  # --overwrite removes them
        if k > 1 and k - 1 not in cfg.stages and not ready:
            raise ValueError(f"stage {k} trains on from stage {k - 1}'s runs, which are not finished in {cfg.out}; "
                             f"add stage {k - 1} to --stages")


def check_protocol(cfg: Config):
    """OUT/protocol.json records the run-defining flags; continuing with others is refused, naming them."""
    path = Path(cfg.out) / "protocol.json"
    if not path.is_file() or cfg.overwrite:
        return
    saved, now = read_json(path).get("flags", {}), protocol_flags(cfg)
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in RUN_KEYS if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path}: this protocol ran with other flags ({'; '.join(diff)}); "
                         "use the same flags, another --out, or --overwrite to start over")


def protocol_flags(cfg: Config) -> dict:
    return json.loads(json.dumps({k: getattr(cfg, k) for k in RUN_KEYS}))  # as it reads back from JSON


# ----------------------------------------------------------------------------- where things are

def stage_dir(cfg, k) -> Path:
    return Path(cfg.out) / f"stage{k}"


def run_dir(cfg, k, arm) -> Path:
    return stage_dir(cfg, k) / arm


def probe_dir(cfg, k) -> Path:
    return Path(cfg.out) / "probes" / STAGES[k - 1][0]


def old_text(cfg, k) -> Path:
    """The stage's old text: a prefix of the first month's snapshot, in a folder per size, so another
    --snapshot-mb never reuses a prefix of the wrong size."""
    folder = fetch.cache_root() / "twiki-snapshot" / f"prefix-{cfg.snapshot_mb:g}MB"
    return folder / f"wikipedia_{STAGES[k - 1][1]}_gpt2_prefix.csv"


def diff_name(k) -> str:
    _, old, new = STAGES[k - 1]
    return f"wikipedia_{old}{new}_gpt2.csv"


def find_file(folder: Path, name: str):
    """The one file `name` anywhere under folder (archives may or may not have a top folder), or None."""
    found = sorted(folder.rglob(name)) if folder.is_dir() else []
    return found[0] if found else None


def init_of(cfg, k, arm) -> str:
    """Chaining: stage 1 starts from --init, stage k from the same arm's stage k-1 run folder (LoRA
    arms too: model.load_model merges a run's adapters into the weights it loads)."""
    return cfg.init if k == 1 else str(run_dir(cfg, k - 1, arm))


def trace_file(cfg, k, arm) -> Path:
    """Stage 1's TGL arms all start from --init, so they share one trace; later each arm traces its own model."""
    return stage_dir(cfg, k) / ("trace-init.json" if k == 1 else f"trace-{arm}.json")


def finished(run: Path) -> bool:
    """A run is done when train.py wrote summary.json with its probe scores."""
    try:
        return bool(read_json(run / "summary.json").get("probes"))
    except (OSError, ValueError):
        return False


def probe_files(cfg, k) -> list:
    return [str(probe_dir(cfg, k) / "changed.csv"), str(probe_dir(cfg, k) / "unchanged.csv")] + cfg.templama + cfg.ecbd


# ----------------------------------------------------------------------------- commands

def common_flags(cfg) -> list:
    return ["--device", cfg.device] + (["--threads", cfg.threads] if cfg.threads else [])  # train.py's


def train_steps(cfg, n_tokens) -> int:
    """Updates for one stage: --max-train-tokens, else one pass over the stage's training text."""
    per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    return max(1, math.ceil((cfg.max_train_tokens or n_tokens) / per_step))


def train_argv(cfg, k, arm, steps) -> list:
    """The train.py command of one arm in one stage; under torchrun when --nproc > 1 (DDP: --batch-size
    stays the global batch, so the numbers do not depend on the number of GPUs)."""
    method, tgl = arm.split("-")
    sd = stage_dir(cfg, k)
    args = ["--init", init_of(cfg, k, arm), "--data", sd / "data" / "train.csv", "--method", method, "--tgl", tgl,
            "--probes", *probe_files(cfg, k), "--steps", steps, "--batch-size", cfg.batch_size,
            "--block-size", cfg.block_size, "--grad-accum", cfg.grad_accum, "--lr", cfg.lr, "--warmup", cfg.warmup,
            "--seed", cfg.seed, "--metric", cfg.metric,
            "--out", run_dir(cfg, k, arm), "--resume", *common_flags(cfg)]
    if tgl != "none":
        args += ["--trace", trace_file(cfg, k, arm)]
    if method == "mixreview":
        args += ["--replay-data", old_text(cfg, k)]  # Mix-Review replays the old snapshot
    args += (["--compile"] if cfg.compile else []) + shlex.split(cfg.train_args)
    if cfg.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
                str(HERE / "train.py"), *map(str, args)]
    return script("train.py", *args)


def trace_argv(cfg, k, arm) -> list:
    """Trace the arm's current model on the stage's diagnostic changed facts against the old snapshot."""
    return script("trace.py", "--init", init_of(cfg, k, arm), "--probes", probe_dir(cfg, k) / "diag_changed.csv",
                  "--text", old_text(cfg, k), "--out", trace_file(cfg, k, arm), "--seed", cfg.seed,
                  "--device", cfg.device, *shlex.split(cfg.trace_args))


def val_argv(cfg, k, arm) -> list:
    """The perplexity of the stage's held-out slice under an arm's final model (probe.py --text)."""
    run_ = run_dir(cfg, k, arm)
    return script("probe.py", "--init", run_, "--text", stage_dir(cfg, k) / "data" / "val.csv", "--text-tokens",
                  cfg.val_tokens, "--json", run_ / "val.json", "--device", cfg.device)


def init_probe_argv(cfg, k) -> list:
    """The untouched --init model on the stage's probes (and held-out text): the table's "init" row."""
    sd = stage_dir(cfg, k)
    return script("probe.py", "--init", cfg.init, "--probes", *probe_files(cfg, k), "--text", sd / "data" / "val.csv",
                  "--text-tokens", cfg.val_tokens, "--metric", cfg.metric, "--json", sd / "init.json", "--device", cfg.device)


def sh(argv) -> str:
    """A command as a user would type it: `python train.py ...`, paths relative to here when inside."""
    def show(a):
        a = str(a)
        a = "python" if a == sys.executable else os.path.relpath(a) if a.startswith(str(HERE)) else a
        return shlex.quote(a)
    return " ".join(show(a) for a in argv)


def run(argv, log: Path, threads=None):
    """Run one step, its output both on our stdout and in `log`; a failed step stops the protocol in
    one line that names its log (the lines before it show why). --threads reaches trace.py and probe.py,
    which have no such flag, as OMP_NUM_THREADS."""
    print(f"$ {sh(argv)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    with open(log, "a", encoding="utf-8") as f, subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, env=env,
                                                                 stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        f.write(f"$ {sh(argv)}\n")
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
    if proc.returncode != 0:
        raise ValueError(f"step failed (exit {proc.returncode}): {sh(argv)[:200]}; its output is in {log}")


# ----------------------------------------------------------------------------- data

def fetch_shared(cfg):
    """Probes and diff sets (all stages in one archive each), then the probe splits of every stage.
    Each is skipped when its files are already there, so a continued run makes no request."""
    root = fetch.cache_root()
    pairs = [STAGES[k - 1][0] for k in cfg.stages]
    if not all(find_file(root / "twiki-probes", f"{p}_{s}.csv") for p in pairs for s in ("changed", "unchanged")):
        print(f"$ {sh(script('experiments.realdata', 'fetch', 'twiki-probes'))}", flush=True)
        fetch.fetch("twiki-probes")
    if not all(find_file(root / "twiki-diffsets", diff_name(k)) for k in cfg.stages):
        print(f"$ {sh(script('experiments.realdata', 'fetch', 'twiki-diffsets'))}", flush=True)
        fetch.fetch("twiki-diffsets")
    wanted = ("changed.csv", "unchanged.csv", "diag_changed.csv")
    if not all((probe_dir(cfg, k) / f).is_file() for k in cfg.stages for f in wanted):
        # every pair at once: realdata's splits write each pair's eval and disjoint diag_* files (seeded)
        print(f"$ {sh(splits_argv(cfg))}")
        realdata.make_splits("twiki", [root / "twiki-probes"], Path(cfg.out) / "probes", seed=cfg.seed)


def fetch_stage(cfg, k):
    """The stage's old text (a snapshot prefix) and its diff set split into train.csv / val.csv."""
    old = old_text(cfg, k)
    if not old.is_file():
        print(f"$ {sh(snapshot_argv(cfg, k))}", flush=True)
        fetch.fetch("twiki-snapshot", old.parent, max_mb=cfg.snapshot_mb, month=STAGES[k - 1][1])
    folder = stage_dir(cfg, k) / "data"
    if not (folder / "val.csv").is_file():
        diff = find_file(fetch.cache_root() / "twiki-diffsets", diff_name(k))
        if diff is None:
            raise ValueError(f"{fetch.cache_root() / 'twiki-diffsets'}: no {diff_name(k)} after fetching the diff sets")
        print(f"# held out: one document in {cfg.val_every} of {diff} -> {folder}/val.csv, the rest -> train.csv")
        split_diff(diff, folder, cfg.val_every)


def splits_argv(cfg) -> list:
    return script("experiments.realdata", "splits", "twiki", "--input", fetch.cache_root() / "twiki-probes",
                  "--out", Path(cfg.out) / "probes", "--seed", cfg.seed)


def snapshot_argv(cfg, k) -> list:
    return script("experiments.realdata", "fetch", "twiki-snapshot", "--max-mb", f"{cfg.snapshot_mb:g}", "--month",
                  STAGES[k - 1][1], "--out", old_text(cfg, k).parent)


def split_diff(diff: Path, folder: Path, every: int):
    """Held-out text for val ppl: every `every`-th document of the diff set goes to val.csv, the rest to
    train.csv. A slice of the *new* text, because what a stage should learn is the new month; forgetting
    is what the unchanged probes measure. Documents, not windows, are held out (no shared text across
    the cut), and spread over the whole file (a prefix would hold only the articles that happen to come
    first). val.csv is written last: its presence means both files are complete."""
    folder.mkdir(parents=True, exist_ok=True)
    n = [0, 0]
    with atomic_path(folder / "train.csv") as t_tmp, atomic_path(folder / "val.csv.tmp") as v_tmp:
        with open(t_tmp, "w", encoding="utf-8", newline="") as ft, open(v_tmp, "w", encoding="utf-8", newline="") as fv:
            writers = [csv.writer(ft), csv.writer(fv)]
            for w in writers:
                w.writerow(["text"])
            for i, doc in enumerate(data.iter_documents(diff)):
                held = (i % every == every - 1)
                writers[held].writerow([doc])
                n[held] += 1
    if not n[0] or not n[1]:
        raise ValueError(f"{diff}: {sum(n)} documents leave {n[0]} to train on and {n[1]} held out; lower --val-every")
    os.replace(folder / "val.csv.tmp", folder / "val.csv")
    print(f"  {n[0]:,} documents to train on, {n[1]:,} held out")


def text_tokens(cfg, path) -> int:
    """Tokens of a text file, tokenized into train.py's own cache (the same file train.py then reads)."""
    return len(data.load_tokens(str(path), data.load_tokenizer(cfg.init)))


# ----------------------------------------------------------------------------- the protocol

def run_stage(cfg, k):
    """One stage: data, the init row, traces, then every arm's training (which scores the probes)."""
    pair, old, new = STAGES[k - 1]
    print(f"\n== stage {k}: {pair} (old snapshot {old}, diff {old}->{new}) ==", flush=True)
    fetch_stage(cfg, k)
    sd, logs = stage_dir(cfg, k), stage_dir(cfg, k) / "logs"
    todo = [arm for arm in cfg.arms if not finished(run_dir(cfg, k, arm))]
    if not (sd / "init.json").is_file():
        run(init_probe_argv(cfg, k), logs / "init.log", cfg.threads)
    if not todo and all((run_dir(cfg, k, arm) / "val.json").is_file() for arm in cfg.arms):
        print(f"stage {k}: every arm finished, nothing to run")
        return
    for arm in todo:
        if not arm.endswith("-none") and not trace_file(cfg, k, arm).is_file():
            run(trace_argv(cfg, k, arm), logs / f"trace-{'init' if k == 1 else arm}.log", cfg.threads)
    steps = train_steps(cfg, 0 if cfg.max_train_tokens else text_tokens(cfg, sd / "data" / "train.csv"))
    for arm in todo:
        run(train_argv(cfg, k, arm, steps), logs / f"{arm}.log", cfg.threads)
    for arm in cfg.arms:  # held-out perplexity of each final model
        if not (run_dir(cfg, k, arm) / "val.json").is_file():
            run(val_argv(cfg, k, arm), logs / f"{arm}-val.log", cfg.threads)


def start(cfg):
    """protocol.json: written first, so a continued run is checked against it (--overwrite: start over)."""
    out = Path(cfg.out)
    if cfg.overwrite:  # only what this driver wrote; fetched data in $TGL_CACHE stays
        for p in [out / "probes", out / "results.md", out / "results.json"] + sorted(out.glob("stage[0-9]")):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_new(out / "protocol.json", json.dumps({"flags": protocol_flags(cfg), "stages": STAGES}, indent=1))


def write_new(path: Path, text: str):
    """Write only what changed: a continued run that did nothing leaves every file as it was."""
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        write_text(path, text)


# ----------------------------------------------------------------------------- the table

def arm_row(cfg, k, arm) -> dict | None:
    """One finished run's numbers: summary.json (probes, val ppl, time) and metrics.jsonl (tokens/s:
    the median of the logged rates, so a first step slowed by compilation does not count)."""
    run = run_dir(cfg, k, arm)
    if not finished(run):
        return None
    s = read_json(run / "summary.json")
    val = read_json(run / "val.json").get("text_ppl") if (run / "val.json").is_file() else None
    rates = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                rates.append(json.loads(line)["tok_per_s"])
            except (ValueError, KeyError, TypeError):
                pass
    return dict(stage=k, pair=STAGES[k - 1][0], arm=arm, run=str(run), init=init_of(cfg, k, arm), steps=s.get("steps"),
                probes=s["probes"], val_ppl=val, time=s.get("time"), tok_per_s=statistics.median(rates) if rates else None)


def init_row(cfg, k) -> dict | None:
    path = stage_dir(cfg, k) / "init.json"
    if not path.is_file():
        return None
    d = read_json(path)
    return dict(stage=k, pair=STAGES[k - 1][0], arm="init", run=str(path), init=cfg.init, steps=0,
                probes=d["summary"], val_ppl=d.get("text_ppl"), time=None, tok_per_s=None)


def collect(cfg) -> list:
    """Every finished row of every stage, not only those run now (arms of earlier invocations with other
    --methods / --tgl too, after this one's): one table across stages and arms."""
    rows = []
    for k in range(1, len(STAGES) + 1):
        found = sorted(p.name for p in stage_dir(cfg, k).glob("*-*") if p.name.split("-")[0] in METHODS)
        arms = cfg.arms + [arm for arm in found if arm not in cfg.arms]
        rows += [r for r in [init_row(cfg, k)] + [arm_row(cfg, k, arm) for arm in arms] if r]
    return rows


def table(rows) -> str:
    """Markdown: a row per stage x arm; per split perplexity and EM (%), held-out ppl, time, tokens/s."""
    splits = ordered(s for r in rows for s in r["probes"])
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    head = ["stage", "arm"] + [f"{s} {m}" for s in splits for m in ("ppl", "EM")] + ["val ppl", "time (s)", "tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['stage']} ({r['pair']})", r["arm"]]
        for s in splits:
            p = r["probes"].get(s)
            cells += [fmt(p and p["ppl"], ".2f"), fmt(p and 100 * p["em"], ".1f")]
        cells += [fmt(r["val_ppl"], ".2f"), fmt(r["time"], ".1f"), fmt(r["tok_per_s"], ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(cfg, rows):
    out = Path(cfg.out)
    metric = "answer-span" if cfg.metric == "span" else "whole-sentence"
    note = (f"\n{metric} perplexity and greedy exact match (%) per probe split; val ppl: perplexity of the "
            f"held-out slice of the stage's diff set ({cfg.val_tokens:,} tokens); time: train.py's training "
            "time; tok/s: median logged training throughput. Rows 'init': the untouched --init model.\n")
    write_new(out / "results.md", table(rows) + note)
    write_new(out / "results.json", json.dumps({"protocol": protocol_flags(cfg), "rows": rows}, indent=1))
    print(f"\n{table(rows)}\nwrote {out / 'results.md'} and {out / 'results.json'}")


# ----------------------------------------------------------------------------- --plan

def gb(n_bytes) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def planned_tokens(cfg, k):
    """Training tokens of one arm in stage k: the cap, else the diff set's size / 4 bytes per GPT-2 token
    when it is on disk already (an approximation), else None (unknown before the download)."""
    steps = None
    if cfg.max_train_tokens:
        steps = train_steps(cfg, 0)
    else:
        diff = find_file(fetch.cache_root() / "twiki-diffsets", diff_name(k))
        if diff is not None:
            steps = train_steps(cfg, diff.stat().st_size / 4)
    return steps and steps * cfg.batch_size * cfg.block_size * cfg.grad_accum, steps


def plan_stage(cfg, k) -> tuple[list, int]:
    """The commands of stage k, those already done marked; and the training tokens of the stage (all arms)."""
    done = lambda ok, argv: ("# done: " if ok and not cfg.overwrite else "") + sh(argv)  # noqa: E731
    tokens, steps = planned_tokens(cfg, k)
    lines = [f"\n# stage {k}: {STAGES[k - 1][0]} (old snapshot {STAGES[k - 1][1]}, diff {diff_name(k)})",
             done(old_text(cfg, k).is_file(), snapshot_argv(cfg, k)),
             f"# then one document in {cfg.val_every} of {diff_name(k)} -> {stage_dir(cfg, k)}/data/val.csv "
             "(held out), the rest -> train.csv",
             done((stage_dir(cfg, k) / "init.json").is_file(), init_probe_argv(cfg, k))]
    traced = set()
    for arm in cfg.arms:
        if not arm.endswith("-none") and trace_file(cfg, k, arm) not in traced:
            traced.add(trace_file(cfg, k, arm))
            lines.append(done(trace_file(cfg, k, arm).is_file(), trace_argv(cfg, k, arm)))
    for arm in cfg.arms:
        lines.append(done(finished(run_dir(cfg, k, arm)), train_argv(cfg, k, arm, steps or "STEPS")))
        lines.append(done((run_dir(cfg, k, arm) / "val.json").is_file(), val_argv(cfg, k, arm)))
    if steps is None:
        lines.append("# STEPS: one pass over the stage's train.csv, known once the diff sets are fetched "
                     "(or pass --max-train-tokens)")
    else:
        lines.append(f"# {steps:,} updates x {cfg.batch_size * cfg.block_size * cfg.grad_accum:,} tokens = "
                     f"{tokens:,} training tokens per arm" +
                     ("" if cfg.max_train_tokens else " (diff size / 4 bytes per token: approximate)"))
    return lines, tokens and tokens * len(cfg.arms)


def plan(cfg) -> str:
    """Every command, the downloads and disk, and a time from an ASSUMED throughput. No network, no model."""
    root, months = fetch.cache_root(), sorted({STAGES[k - 1][1] for k in cfg.stages})
    out = [f"# twiki.py --plan: init {cfg.init}, arms {' '.join(cfg.arms)}, stages {' '.join(map(str, cfg.stages))}",
           f"# downloads into {root} (TGL_CACHE); HF_ENDPOINT is honoured:",
           f"#   twiki-probes    TWiki_Probes.zip: {fetch.DATASETS['twiki-probes'].disk}",
           f"#   twiki-diffsets  TWiki_Diffsets.zip: {fetch.DATASETS['twiki-diffsets'].disk}",
           f"#   twiki-snapshot  the first {cfg.snapshot_mb:g} MB of text of month(s) {', '.join(months)} "
           f"(ranged reads of Wikipedia_Full.zip): about {gb(len(months) * cfg.snapshot_mb * 1e6)} downloaded and on disk",
           sh(script("experiments.realdata", "fetch", "twiki-probes")),
           sh(script("experiments.realdata", "fetch", "twiki-diffsets")),
           sh(splits_argv(cfg))]
    total = 0
    for k in cfg.stages:
        lines, tokens = plan_stage(cfg, k)
        out += lines
        total = None if tokens is None or total is None else total + tokens
    params = HUB_PARAMS.get(cfg.init)
    out += ["\n# disk in --out, per stage: train.csv + val.csv (a copy of the diff set) and its token cache "
            "(2 bytes per token, about half the CSV);",
            "#   per arm and stage a checkpoint of up to 12 bytes per parameter (fp32 weights + Adam moments)"
            + (f": about {gb(12 * params)} for {cfg.init}, {gb(12 * params * len(cfg.arms) * len(cfg.stages))} in all"
               if params else "") + "; token caches of the snapshot prefixes: about half their size"]
    if total is None:
        out.append("# time: unknown until the diff sets are on disk; pass --max-train-tokens for an estimate")
    elif cfg.assume_tok_s:
        out.append(f"# time: {total:,} training tokens in all at an ASSUMED {cfg.assume_tok_s:,.0f} tokens/s (--assume-tok-s, "
                   f"not a measurement) = {total / cfg.assume_tok_s / 3600:.2f} h of training, plus tracing and probe scoring")
    else:
        out.append(f"# time: {total:,} training tokens in all; pass --assume-tok-s N (your GPU's tokens/s, e.g. from "
                   "`python -m experiments.bench train --device cuda ...`) for an estimate")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg = parse_args(argv)
    with input_errors(PROG):  # the one error path: bad input is one line, bugs keep their traceback
        check_config(cfg)
        if cfg.plan:
            print(plan(cfg))
            return None
        start(cfg)
        fetch_shared(cfg)
        for k in cfg.stages:
            run_stage(cfg, k)
        rows = collect(cfg)
        write_results(cfg, rows)
    return rows


if __name__ == "__main__":
    main()
