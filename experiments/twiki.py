"""The paper's experiment on TemporalWiki in one command: staged continual pretraining, month pair
by month pair, with every method x TGL mode, and one table at the end.

    python -m experiments.twiki --init gpt2 --out runs/twiki --methods full mixreview --tgl none fp
    python -m experiments.twiki --init gpt2 --out runs/smoke --max-train-tokens 5M --snapshot-mb 50   # smoke test
    python -m experiments.twiki --init gpt2-large --out runs/large --plan   # commands, hours and GB (ESTIMATE)
    python -m experiments.twiki --init gpt2-large --out runs/twiki --methods full mixreview --tgl none fp \\
        --templama dynamic-templama --templama-dates 2020-Q4 2021-Q1 2021-Q2 2021-Q3 2021-Q4 --ecbd ecbd \\
        --export-hf runs/hf   # and the paper's TempLAMA updated/unchanged and ECBD new, HF exports

For each stage (month pair 0801-0901, 0901-1001, 1001-1101, 1101-1201), in order:
  fetch what is missing -> probe splits (TemporalWiki's changed/unchanged, TempLAMA's updated/unchanged
  between the stage's two dates, ECBD's new) -> split the stage's diff set into training text and a
  held-out slice -> score the untouched --init model (the "init" row, both metrics) -> trace each TGL
  arm's current model on probes the stage does not evaluate -> continually pretrain each arm (method x
  TGL mode) on the diff set, with a checkpoint every --save-minutes -> score the probes under both
  metrics and the held-out text -> each arm's run folder is its --init in the next stage (the old
  stage's optimizer state is then dropped) -> --export-hf: each arm's final model in Hugging Face layout.
Every step is a plain experiments.realdata / trace.py / train.py / probe.py / experiments.export command,
printed as it runs (and by --plan), so any cell of the table can be re-run by hand. A finished step is
never re-run: run the same command again after an interruption and it goes on where it stopped, a
killed training step from its last checkpoint.
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
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import data
from experiments.probe_files import probe_records
import train
from checkpoint import CKPT_NAME, load_checkpoint, save_checkpoint
from common import Parser, add_flags, atomic_path, check_output, duration, input_errors, read_json
from common import unused_flag, write_text
from experiments import export, fetch, realdata
from experiments.hf import HUB_NAMES, config_from_hf, is_hub_name
from experiments.tools import check_number, folder_lock, script

HERE = Path(__file__).resolve().parents[1]  # the repository root, as common.script builds paths
PROG = "twiki.py"
# (probe month pair, old snapshot month, new month): TemporalWiki's four consecutive updates (2021). The diff
# set of a stage is TWiki_Diffsets/wikipedia_{old}{new}_gpt2.csv, its old text Wikipedia_Full/wikipedia_{old}_gpt2/.
STAGES = (("0801-0901", "08", "09"), ("0901-1001", "09", "10"), ("1001-1101", "10", "11"), ("1101-1201", "11", "12"))
# Parameters of the hub models, for the plan's sizes and default throughput (no model is loaded by --plan).
HUB_PARAMS = {"gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6,
              "EleutherAI/gpt-neo-125m": 125e6, "EleutherAI/gpt-neo-1.3B": 1316e6}
# TemporalWiki's Table 1 (Jang et al. 2022) gives about 346M-376M GPT-2 tokens per diff set (month pair), as
# quoted in issue 17; the exact per-pair figures could not be checked here (no access to the paper), so the
# plan uses the upper end for every pair: an approximate, slightly pessimistic size.
DIFF_TOKENS = 376e6
BYTES_PER_TOKEN = 4.5  # English Wikipedia text in CSV per GPT-2 token (approximate): sizes of text files
# The default --assume-tok-s, an ASSUMPTION (no GPU was available to measure it): 6 x parameters FLOPs per
# training token at 25% model FLOPs utilization of one H100 SXM (989 dense bf16 TFLOP/s). 25% is about what
# experiments.bench measured for GPT-2 large on an H100 at commit a5e8f05 (50,912 tok/s, docs/temporalwiki.md).
GPU_FLOPS, MFU = 989e12, 0.25
GPU_GB = 80  # an H100's memory: the plan says when a model's training state does not fit it
# Probe splits: the driver names each file's split, so a column says its data set and keeps its name over stages.
SPLITS = ("twiki/changed", "twiki/unchanged", "templama/updated", "templama/unchanged", "ecbd/new")
OTHER = {"span": "sentence", "sentence": "span"}  # the second metric every row is also scored with
TEMPLAMA_SETS = ("templama", "dynamic-templama")  # --templama NAME: fetched by the driver
# Flags that decide what the runs in --out compute: continuing a run folder with any of them changed
# would mix two experiments in one table, so it is refused (protocol.json). --methods, --tgl and
# --stages are not among them: each arm and stage is its own folder, so adding one just runs it.
RUN_KEYS = ("init", "max_train_tokens", "batch_size", "block_size", "grad_accum", "lr", "warmup", "snapshot_mb",
            "val_every", "val_tokens", "metric", "diag_frac", "trace_probes", "templama", "templama_dates", "ecbd",
            "train_args", "trace_args", "seed")
# Flags the driver sets itself in every train.py / trace.py command: --train-args / --trace-args must not.
OWN_FLAGS = {"--init", "--out", "--data", "--replay-data", "--method", "--tgl", "--trace", "--probes", "--steps",
             "--resume", "--overwrite", "--metric", "--text", "--batch-size",
             "--block-size", "--grad-accum", "--lr", "--warmup", "--seed", "--device", "--threads"}
# What a dropped optimizer state says if someone resumes the checkpoint by hand (train.py prints it in one line).
DROPPED = "none: twiki.py dropped this optimizer state once the next stage finished (--keep-optimizer keeps it)"


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
    diag_frac: float = 0.25
    trace_probes: str | None = None
    templama: list = field(default_factory=list)
    templama_dates: list = field(default_factory=list)
    ecbd: str | None = None
    train_args: str = ""
    trace_args: str = ""
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    compile: bool = False
    nproc: int = 1
    fsdp: bool = False
    save_minutes: float = 30.0
    keep_optimizer: bool = False
    export_hf: str | None = None
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


def add_run_flags(a, d):
    """The flags that define the runs (protocol.json)."""
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
      help="the main probe metric (train.py's): answer span (the paper's) or whole sentence (TemporalWiki's); "
           "every row is scored with the other one too")
    a("--diag-frac", type=float, default=d.diag_frac,
      help="share of each probe split kept apart for tracing (disjoint by subject+relation); 0: evaluate on every "
           "probe and trace on probes not evaluated in the stage (the previous month pair's; stage 1: --trace-probes)")
    a("--trace-probes",
      help="stage 1 traces on this probe file instead of its diag_changed.csv (needed with --diag-frac 0)")
    a("--templama", nargs="+", default=[], help="TempLAMA / Dynamic TempLAMA data: 'templama' or 'dynamic-templama' "
      "(fetched into $TGL_CACHE/data), or .json/.jsonl files or folders; updated/unchanged splits built per stage")
    a("--templama-dates", nargs="+", default=[], help=f"with --templama: {len(STAGES) + 1} increasing dates, one per "
      "snapshot (e.g. Dynamic TempLAMA's quarters 2020-Q4 2021-Q1 2021-Q2 2021-Q3 2021-Q4, or years); "
      "stage K compares date K with date K+1")
    a("--ecbd", help="ECBD's unpacked folder (year folders of np_spans_test.json), or 'ecbd' for the one registered "
      "with `python -m experiments.realdata fetch ecbd --folder PATH`; scored as ecbd/new at every stage")
    a("--train-args", default="", help="more train.py flags, quoted (e.g. '--recadam-gamma 50 --eval-every 500'; "
      "one flag alone: --train-args=--flag); each run gets those its method and TGL mode use (--recadam-gamma: "
      "the recadam arms), a flag no arm uses is refused")
    a("--trace-args", default="", help="more trace.py flags, quoted (e.g. '--n-span 200 --select topk:8')")
    a("--seed", type=int, default=d.seed, help="seed of the probe splits and of training")


def parse_args(argv=None) -> Config:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a, d = p.add_argument, Config(init="", out="")
    a("--init", required=True,
      help="stage 1's model: gpt2, gpt2-large, EleutherAI/gpt-neo-1.3B, ..., a local HF folder or a run folder")
    a("--out", required=True, help="the protocol's folder: protocol.json, probes/, stageK/ARM run folders, results.md/.json")
    a("--methods", nargs="+", choices=train.METHODS, default=d.methods,
      help="continual-learning methods (arms = methods x --tgl)")
    a("--tgl", nargs="+", choices=train.TGL_MODES, default=d.tgl, help="TGL modes stacked on each method")
    a("--stages", nargs="+", default=["1", "2", "3", "4"], help="stages to run: numbers 1-4 or month pairs like 0901-1001")
    add_run_flags(a, d)
    a("--device", default=d.device, help="auto | cpu | cuda | mps, for every step")
    a("--threads", type=int, help="CPU threads per step")
    a("--compile", action="store_true", help="train.py --compile (torch.compile, CUDA)")
    a("--nproc", type=int, default=d.nproc,
      help="processes per training step: >1 runs train.py under torchrun --nproc_per_node N")
    a("--fsdp", action="store_true", help="with --nproc N > 1: train.py and trace.py shard the model over the N "
      "processes (FSDP2, docs/fsdp.md), for a model whose training state does not fit one GPU (see --plan)")
    a("--save-minutes", type=float, default=d.save_minutes,
      help="checkpoint every training step every N minutes of its training time, as measured on the device in use "
           "(train.py --save-minutes); 0: only at the end. A --save-every or --save-minutes in --train-args wins")
    a("--keep-optimizer", action="store_true", help="keep every stage's optimizer state (AdamW moments: 2/3 of a "
      "checkpoint); by default it is dropped once the same arm's next stage has finished")
    a("--export-hf", help="write each arm's final model (its last stage run now) in Hugging Face layout to "
      "DIR/stageK/ARM (python -m experiments.export); a folder there holding another model is refused at the "
      "start, unless --overwrite")
    a("--plan", action="store_true", help="print every command, the time and disk it takes (an estimate); run nothing")
    a("--assume-tok-s", type=float,
      help="ASSUMED training tokens/s of one training step (all its GPUs), for the plan's "
      "time; default: derived from the model size (see --plan)")
    a("--overwrite", action="store_true", help="start over in --out when its protocol.json has other flags; "
      "also replace another model in --export-hf's folders")
    args = p.parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(args).items() if k != "stages"})
    with input_errors(PROG):
        cfg.stages = sorted({stage_number(s) for s in args.stages})
    return cfg


def check_passed(flag: str, text: str, config, required: list):
    """--train-args / --trace-args through train.py's / trace.py's own parser, before anything slow: an
    unknown flag or a bad value is one line now, not after the downloads and the first stages."""
    try:
        extra = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"{flag} {text!r}: {e}") from None
    taken = [t.split("=")[0] for t in extra if t.split("=")[0] in OWN_FLAGS]
    if taken:
        raise ValueError(f"{flag}: {taken[0]} is set by twiki.py itself; use twiki.py's own flag for it")
    flag_parser(flag, config).parse_args(required + extra)  # Parser.error: one line, exit 2


def flag_parser(flag: str, config) -> Parser:
    """train.py's / trace.py's own flags (its Config's): what --train-args / --trace-args may pass."""
    parser = Parser(prog=f"{PROG} {flag}", add_help=False)
    add_flags(parser, config)
    return parser


def passed_train_args(cfg) -> dict:
    """{dest: value} of the flags --train-args gives, as train.py's parser reads them (the last one, or an
    abbreviation)."""
    parser = flag_parser("--train-args", train.Config)  # add_flags: a flag not given is not set
    return vars(parser.parse_args(["--data", "-"] + shlex.split(cfg.train_args)))


def passed_save(cfg) -> dict:
    """The --save-every / --save-minutes that --train-args gives: then the driver adds no --save-minutes."""
    return {k: v for k, v in passed_train_args(cfg).items() if k in ("save_every", "save_minutes")}


def arm_modes(arm: str):  # what train.Config.NEEDS reads of an arm's train.py command
    method, tgl = arm.split("-")
    return argparse.Namespace(NEEDS=train.Config.NEEDS, method=method, tgl=tgl)


def arm_train_args(cfg, arm) -> list:
    """--train-args for one arm, less the flags its method and TGL mode do not use (train.Config.NEEDS:
    train.py refuses them): --recadam-gamma reaches the recadam arms only, --select the TGL arms.
    check_config refuses a flag that no arm uses."""
    extra = []
    for dest, v in passed_train_args(cfg).items():
        if dest == "data" or unused_flag(arm_modes(arm), {dest}):
            continue
        flag = "--" + dest.replace("_", "-")
        extra += [flag] if v is True else [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    return extra


def check_config(cfg: Config):
    """Every flag and path, before anything slow (no network, no model load)."""
    check_output(cfg.out, "--out", "dir")
    if not is_hub_name(cfg.init) and not os.path.exists(cfg.init):
        raise ValueError(f"--init {cfg.init}: not a local folder, nor a hub name (ORG/NAME or one of "
                         f"{', '.join(HUB_NAMES)})")
    for flag in ("batch_size", "block_size", "grad_accum", "val_tokens", "max_train_tokens", "threads", "nproc"):
        check_number("--" + flag.replace("_", "-"), getattr(cfg, flag), low=1, integer=True)
    if cfg.fsdp and cfg.nproc < 2:
        raise ValueError("--fsdp shards over processes: give --nproc 2 or more")
    check_number("--val-every", cfg.val_every, low=2, integer=True)  # 1 would hold out every document
    check_number("--warmup", cfg.warmup, low=0, integer=True)
    check_number("--lr", cfg.lr, low=0, low_open=True)
    check_number("--snapshot-mb", cfg.snapshot_mb, low=0, low_open=True)
    check_number("--assume-tok-s", cfg.assume_tok_s, low=0, low_open=True)
    check_number("--save-minutes", cfg.save_minutes, low=0)
    check_number("--diag-frac", cfg.diag_frac, low=0, high=1, high_open=True)
    check_probe_sources(cfg)
    check_context(cfg)  # a hub name's config only if already fetched: main fetches it before anything slow
    if cfg.export_hf:
        check_output(cfg.export_hf, "--export-hf", "dir")
        check_exports(cfg)
    check_passed("--train-args", cfg.train_args, train.Config, ["--data", "-"])
    for dest in passed_train_args(cfg):  # a flag that no arm uses is refused, as train.py refuses it
        bad = [unused_flag(arm_modes(arm), {dest}) for arm in cfg.arms]
        if all(bad):
            raise ValueError(f"--train-args: {bad[0]} (arms here: {' '.join(cfg.arms)})")
    check_passed("--trace-args", cfg.trace_args, train.tgl_trace.TraceConfig,
                 ["--init", "-", "--probes", "-", "--text", "-", "--out", "-"])
    check_protocol(cfg)
    for k in cfg.stages:  # a stage trains on from the previous stage's runs, which must exist
        ready = not cfg.overwrite and all(finished(run_dir(cfg, k - 1, arm)) for arm in cfg.arms)  # --overwrite removes them
        if k > 1 and k - 1 not in cfg.stages and not ready:
            raise ValueError(f"stage {k} trains on from stage {k - 1}'s runs, which are not finished in {cfg.out}; "
                             f"add stage {k - 1} to --stages")


def init_context(init: str, download=False) -> int | None:
    """--init's context length, read cheaply: a run's ckpt.pt config (mapped: no weights read), a folder's
    config.json, a hub name's config.json (fetched alone when download, else only if already here). None when
    it cannot be read so: loading the model later says what is wrong."""
    path = Path(init)
    try:
        if is_hub_name(init):
            path = Path(fetch.hub_config(init, download) or "")
        elif path.suffix == ".pt" or (path / CKPT_NAME).is_file():
            return int(load_checkpoint(path / CKPT_NAME if path.is_dir() else path, mmap=True)["config"]["block_size"])
        else:
            path = path / "config.json"
        return config_from_hf(read_json(path)).block_size if path.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def check_context(cfg: Config, download=False):
    """--block-size fits --init's context: else the first training step fails, after fetch, splits and scoring."""
    n = init_context(cfg.init, download)
    if n is not None and cfg.block_size > n:
        raise ValueError(f"--block-size {cfg.block_size}: longer than the context of --init {cfg.init} "
                         f"({n} tokens); give --block-size {n} or less")


def check_probe_sources(cfg: Config):
    """--templama / --templama-dates / --ecbd / --trace-probes, and that stage 1 has probes to trace on."""
    for src in cfg.templama:
        if src not in TEMPLAMA_SETS and not os.path.exists(src):
            raise ValueError(f"--templama {src}: no such file or folder "
                             "(or 'templama' / 'dynamic-templama' to fetch it)")
    dates = cfg.templama_dates
    if cfg.templama and len(dates) != len(STAGES) + 1:
        raise ValueError(f"--templama needs --templama-dates with {len(STAGES) + 1} dates, one per snapshot "
                         f"(got {len(dates)}), e.g. --templama-dates 2020-Q4 2021-Q1 2021-Q2 2021-Q3 2021-Q4")
    if dates and not cfg.templama:
        raise ValueError("--templama-dates without --templama: give the TempLAMA data too")
    if any(a >= b for a, b in zip(dates, dates[1:])):
        raise ValueError(f"--templama-dates {' '.join(dates)}: each date must come after the one before it")
    if cfg.ecbd and not sorted(ecbd_root(cfg).glob("*/np_spans_test.json")):
        raise ValueError(f"--ecbd {cfg.ecbd}: no YEAR/np_spans_test.json in {ecbd_root(cfg)} (ECBD's unpacked "
                         "folder; 'ecbd' means the one registered with `python -m experiments.realdata fetch ecbd`)")
    if cfg.trace_probes and not os.path.isfile(cfg.trace_probes):
        raise ValueError(f"--trace-probes {cfg.trace_probes}: no such file")
    if cfg.diag_frac == 0 and 1 in cfg.stages and not cfg.trace_probes and any(t != "none" for t in cfg.tgl):
        raise ValueError("--diag-frac 0: stage 1 has no probes to trace on (no month pair before it); "
                         "give --trace-probes FILE, or --diag-frac > 0")


def check_protocol(cfg: Config):
    """OUT/protocol.json records the run-defining flags; continuing with others is refused, naming them."""
    path = Path(cfg.out) / "protocol.json"
    if not path.is_file() or cfg.overwrite:
        return
    saved, now = state(path, "flags", dict)["flags"], protocol_flags(cfg)
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in RUN_KEYS if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path}: this protocol ran with other flags ({'; '.join(diff)}); "
                         "use the same flags, another --out, or --overwrite to start over")


def protocol_flags(cfg: Config) -> dict:
    return json.loads(json.dumps({k: getattr(cfg, k) for k in RUN_KEYS}))  # as it reads back from JSON


REDO = "move it away and run again to redo that step"


def state(path, key: str, kind, fix=REDO) -> dict:
    """One of the driver's state files (protocol.json, summary.json, init.json, val.json): a JSON object
    whose `key` is a `kind`; anything else is one line naming the file and what to move (fix), never a
    traceback later."""
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get(key), kind) or isinstance(d.get(key), bool):
        raise ValueError(f"{path}: not what this driver wrote (want a JSON object with '{key}'); {fix}")
    return d


def probe_summary(path, key="summary", fix=REDO) -> dict:
    """{split: {ppl, em, n}} from a train.py summary.json ('probes') or probe.py --json ('summary'), checked."""
    s = state(path, key, dict, fix)[key]
    for split, r in s.items():
        if not (isinstance(r, dict) and all(isinstance(r.get(m), (int, float)) for m in ("ppl", "em", "n"))):
            raise ValueError(f"{path}: split {split!r} has no numbers ppl, em, n; {fix}")
    return s


# ----------------------------------------------------------------------------- where things are

def stage_dir(cfg, k) -> Path:
    return Path(cfg.out) / f"stage{k}"


def run_dir(cfg, k, arm) -> Path:
    return stage_dir(cfg, k) / arm


def probe_dir(cfg, k) -> Path:
    return Path(cfg.out) / "probes" / STAGES[k - 1][0]


def old_text(cfg, k) -> Path:
    """The stage's old text: a prefix of the first month's snapshot, where `realdata fetch twiki-snapshot
    --max-mb N` puts it too (a folder per size, so another --snapshot-mb never reuses a prefix of the wrong size)."""
    return realdata.snapshot_dir(cfg.snapshot_mb) / f"wikipedia_{STAGES[k - 1][1]}_gpt2_prefix.csv"


def ecbd_root(cfg) -> Path:
    return fetch.cache_root() / "ecbd" if cfg.ecbd == "ecbd" else Path(cfg.ecbd)


def templama_inputs(cfg) -> list:
    return [fetch.cache_root() / s if s in TEMPLAMA_SETS else Path(s) for s in cfg.templama]


def diff_name(k) -> str:
    _, old, new = STAGES[k - 1]
    return f"wikipedia_{old}{new}_gpt2.csv"


def find_file(folder: Path, name: str):
    """The one file `name` anywhere under folder (archives may or may not have a top folder), or None."""
    found = sorted(folder.rglob(name)) if folder.is_dir() else []
    return found[0] if found else None


def init_of(cfg, k, arm) -> str:
    """Chaining: stage 1 starts from --init, stage k from the same arm's stage k-1 run folder (LoRA
    arms too: checkpoint.load_model merges a run's adapters into the weights it loads)."""
    return cfg.init if k == 1 else str(run_dir(cfg, k - 1, arm))


def trace_file(cfg, k, arm) -> Path:
    """Stage 1's TGL arms all start from --init, so they share one trace; later each arm traces its own model."""
    return stage_dir(cfg, k) / ("trace-init.json" if k == 1 else f"trace-{arm}.json")


def trace_probes(cfg, k) -> Path:
    """What stage k traces on: never probes it evaluates. Its diag_changed.csv (kept apart by --diag-frac), or
    with --diag-frac 0 the previous month pair's changed facts (evaluated there, not here); stage 1:
    --trace-probes when given."""
    if k == 1 and cfg.trace_probes:
        return Path(cfg.trace_probes)
    return probe_dir(cfg, k) / "diag_changed.csv" if cfg.diag_frac > 0 else probe_dir(cfg, k - 1) / "changed.csv"


def finished(run: Path) -> bool:
    """A run is done when train.py wrote summary.json with its probe scores; a summary.json of another
    shape is one line naming it (not a run to redo silently) and what to move away: the file, which
    train.py --resume writes again from ckpt.pt; but once the next stage has finished, that checkpoint's
    optimizer state is dropped (it cannot resume), so the run and its arm's later runs, trained on from it."""
    if not (run / "summary.json").is_file():
        return False
    fix = "move it away and run again (train.py --resume writes it again from ckpt.pt)"
    if (run / "optimizer-dropped").is_file():
        k = int(run.parent.name.removeprefix("stage"))
        later = [run.parent.parent / f"stage{j}" / run.name for j in range(k + 1, len(STAGES) + 1)]
        redo = " and ".join(map(str, [run] + [p for p in later if p.exists()]))
        fix = f"{run}/{CKPT_NAME} cannot resume (its optimizer state was dropped): move away {redo} and run again"
    probe_summary(run / "summary.json", "probes", fix)
    return True


def has_probes(path: Path) -> bool:
    """A probe file to score: there and not empty (a split with no record, e.g. no TempLAMA fact updated
    between two dates, gets no column rather than a failed step)."""
    return path.is_file() and next(iter(probe_records(path)), None) is not None


def probe_files(cfg, k) -> list:
    """FILE:SPLIT specs: each split named by its data set (experiments.probe_files.read_probes' :SPLIT), the same in every stage."""
    pd = probe_dir(cfg, k)
    files = [(pd / "changed.csv", "twiki/changed"), (pd / "unchanged.csv", "twiki/unchanged")]
    files += [(pd / "templama" / f"{s}.jsonl", f"templama/{s}") for s in ("updated", "unchanged") if cfg.templama]
    ecbd = Path(cfg.out) / "probes" / "ecbd"
    if cfg.ecbd:  # every year folder's new entities in one column
        years = sorted(ecbd.glob("*/new.jsonl")) or [ecbd / "YEAR" / "new.jsonl"]
        files += [(f, "ecbd/new") for f in years]
    return [f"{f}:{split}" for f, split in files if cfg.plan or split.startswith("twiki/") or has_probes(f)]


# ----------------------------------------------------------------------------- commands

def common_flags(cfg) -> list:
    return ["--device", cfg.device] + (["--threads", cfg.threads] if cfg.threads else [])  # train.py's


def tokens_per_update(cfg) -> int:
    return cfg.batch_size * cfg.block_size * cfg.grad_accum


def train_steps(cfg, n_tokens) -> int:
    """Updates for one stage: --max-train-tokens, else one pass over the stage's training text."""
    return max(1, math.ceil((cfg.max_train_tokens or n_tokens) / tokens_per_update(cfg)))


def model_params(cfg) -> float | None:
    """Parameters of --init: the hub table, else its weights file's size (an estimate: fp32, and a run's
    ckpt.pt also holds the AdamW moments, 12 bytes per parameter in all)."""
    if cfg.init in HUB_PARAMS:
        return HUB_PARAMS[cfg.init]
    p = Path(cfg.init)
    for shards in sorted(p.glob("ckpt.dcp.*")) if p.is_dir() else []:  # train.py --fsdp's: the weights are there
        return sum(f.stat().st_size for f in shards.iterdir()) / 12
    for f, per in ((p, 12), (p / CKPT_NAME, 12), (p / "model.safetensors", 4), (p / "pytorch_model.bin", 4)):
        if f.is_file():
            return f.stat().st_size / per
    return None


def tok_s(cfg) -> float:
    """Training tokens/s of one step (all --nproc GPUs): --assume-tok-s, else the stated assumption."""
    if cfg.assume_tok_s:
        return cfg.assume_tok_s
    return cfg.nproc * GPU_FLOPS * MFU / (6 * (model_params(cfg) or HUB_PARAMS["gpt2-large"]))


def train_argv(cfg, k, arm, steps) -> list:
    """The train.py command of one arm in one stage; under torchrun when --nproc > 1 (DDP: --batch-size
    stays the global batch, so the numbers do not depend on the number of GPUs)."""
    method, tgl = arm.split("-")
    sd, extra = stage_dir(cfg, k), arm_train_args(cfg, arm)
    args = ["--init", init_of(cfg, k, arm), "--data", sd / "data" / "train.csv", "--method", method, "--tgl", tgl,
            "--probes", *probe_files(cfg, k), "--steps", steps, "--batch-size", cfg.batch_size,
            "--block-size", cfg.block_size, "--grad-accum", cfg.grad_accum, "--lr", cfg.lr, "--warmup", cfg.warmup,
            "--seed", cfg.seed, "--metric", cfg.metric,
            "--out", run_dir(cfg, k, arm), "--resume", *common_flags(cfg)]
    if cfg.save_minutes and not passed_save(cfg):  # measured on the device in use, not assumed
        args += ["--save-minutes", f"{cfg.save_minutes:g}"]  # a killed step loses at most about --save-minutes
    if tgl != "none":
        args += ["--trace", trace_file(cfg, k, arm)]
    if method == "mixreview":
        args += ["--replay-data", old_text(cfg, k)]  # Mix-Review replays the old snapshot
    args += (["--compile"] if cfg.compile else []) + (["--fsdp"] if cfg.fsdp else []) + extra
    return torchrun(cfg, "train.py", *args) if cfg.nproc > 1 else script("train.py", *args)


def torchrun(cfg, name, *args) -> list:  # name under torchrun, --nproc processes on this machine
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
            str(HERE / name), *map(str, args)]


def trace_argv(cfg, k, arm) -> list:
    """Trace the arm's current model on probes the stage does not evaluate, against the old snapshot;
    --fsdp: sharded under torchrun, as its training."""
    args = ["--init", init_of(cfg, k, arm), "--probes", trace_probes(cfg, k), "--text", old_text(cfg, k),
            "--out", trace_file(cfg, k, arm), "--seed", cfg.seed, "--device", cfg.device, *shlex.split(cfg.trace_args)]
    return torchrun(cfg, "trace.py", *args, "--fsdp") if cfg.fsdp else script("trace.py", *args)


def val_argv(cfg, k, arm) -> list:
    """An arm's final model on the probes under the other metric (train.py scored the main one)."""
    run_ = run_dir(cfg, k, arm)
    return script("probe.py", "--init", run_, "--probes", *probe_files(cfg, k), "--metric", OTHER[cfg.metric],
                  "--json", run_ / "val.json", "--device", cfg.device)


def text_argv(cfg, k, init, out: Path) -> list:
    """The held-out slice's perplexity under a model (the init, or an arm's final one): the val ppl column."""
    return script("experiments.textppl", "--init", init, "--text", stage_dir(cfg, k) / "data" / "val.csv",
                  "--text-tokens", cfg.val_tokens, "--json", out, "--device", cfg.device)


def init_probe_argv(cfg, k, metric=None) -> list:
    """The untouched --init model on the stage's probes: the table's "init" row; metric: the other
    metric's file (init-METRIC.json)."""
    sd = stage_dir(cfg, k)
    if metric:
        return script("probe.py", "--init", cfg.init, "--probes", *probe_files(cfg, k), "--metric", metric,
                      "--json", sd / f"init-{metric}.json", "--device", cfg.device)
    return script("probe.py", "--init", cfg.init, "--probes", *probe_files(cfg, k), "--metric", cfg.metric,
                  "--json", sd / "init.json", "--device", cfg.device)


def export_argv(cfg, k, arm) -> list:
    dest = Path(cfg.export_hf) / f"stage{k}" / arm
    more = ["--overwrite"] if cfg.overwrite else []  # the driver's --overwrite: replace another model there too
    return script("experiments.export", "--init", run_dir(cfg, k, arm), "--out", dest, *more)


def sh(argv) -> str:
    """A command as a user would type it: `python train.py ...`, paths relative to here when inside."""
    def show(a):
        a = str(a)
        a = "python" if a == sys.executable else os.path.relpath(a) if a.startswith(str(HERE)) else a
        return shlex.quote(a)
    return " ".join(show(a) for a in argv)


def run(argv, log: Path, threads=None):
    """Run one step, its output both on our stdout and in `log`, line by line as it comes (a killed step's
    log keeps what it printed); its wall time goes to the stage's times.json. A failed step stops the
    protocol in one line that names its log (the lines before it show why). --threads reaches trace.py
    and probe.py, which have no such flag, as OMP_NUM_THREADS."""
    print(f"$ {sh(argv)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONUNBUFFERED": "1"} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    t0 = time.time()
    with open(log, "a", encoding="utf-8", buffering=1) as f, subprocess.Popen(
            list(map(str, argv)), stdout=subprocess.PIPE, env=env, stderr=subprocess.STDOUT, text=True,
            errors="replace") as proc:
        f.write(f"$ {sh(argv)}\n")
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
    if proc.returncode != 0:
        raise ValueError(f"step failed (exit {proc.returncode}): {sh(argv)[:200]}; its output is in {log}")
    times = log.parent / "times.json"
    seen = read_json(times) if times.is_file() else {}
    seen = dict(seen if isinstance(seen, dict) else {}, **{log.stem: time.time() - t0})
    write_text(times, json.dumps(seen, indent=1))


# ----------------------------------------------------------------------------- data

def fetch_shared(cfg):
    """Probes and diff sets (all stages in one archive each), TempLAMA when asked, then the probe splits
    shared by all stages (TemporalWiki's, ECBD's). Each is skipped when done, so a continued run makes no request."""
    root = fetch.cache_root()
    pairs = [STAGES[k - 1][0] for k in cfg.stages]
    if not all(find_file(root / "twiki-probes", f"{p}_{s}.csv") for p in pairs for s in ("changed", "unchanged")):
        print(f"$ {sh(script('experiments.realdata', 'fetch', 'twiki-probes'))}", flush=True)
        fetch.fetch("twiki-probes")
    if not all(find_file(root / "twiki-diffsets", diff_name(k)) for k in cfg.stages):
        print(f"$ {sh(script('experiments.realdata', 'fetch', 'twiki-diffsets'))}", flush=True)
        fetch.fetch("twiki-diffsets")
    for name in (s for s in cfg.templama if s in TEMPLAMA_SETS):
        if not all((root / name / f).is_file() for f in fetch.DATASETS[name].files):
            print(f"$ {sh(script('experiments.realdata', 'fetch', name))}", flush=True)
            fetch.fetch(name)
    make_split(splits_argv(cfg), Path(cfg.out) / "probes", "twiki", [root / "twiki-probes"], cfg)
    if cfg.ecbd:
        make_split(ecbd_argv(cfg), Path(cfg.out) / "probes" / "ecbd", "ecbd", [ecbd_root(cfg)], cfg)


def make_split(argv, out: Path, kind, inputs, cfg, dates=(None, None)):
    """realdata.make_splits, once: a marker written last says the folder's files are complete."""
    marker = out / f".{kind}-splits.done"
    if marker.is_file():
        return
    print(f"$ {sh(argv)}", flush=True)
    counts = realdata.make_splits(kind, inputs, out, dates, diag_frac=cfg.diag_frac, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_text(marker, json.dumps(counts, indent=1))


def fetch_stage(cfg, k):
    """The stage's old text (a snapshot prefix), its diff set split into train.csv / val.csv, and its
    TempLAMA splits (the stage's two dates)."""
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
    if cfg.templama:
        make_split(templama_argv(cfg, k), probe_dir(cfg, k) / "templama", "templama", templama_inputs(cfg), cfg,
                   tuple(cfg.templama_dates[k - 1:k + 1]))


def splits_argv(cfg) -> list:
    return script("experiments.realdata", "splits", "twiki", "--input", fetch.cache_root() / "twiki-probes",
                  "--out", Path(cfg.out) / "probes", "--diag-frac", cfg.diag_frac, "--seed", cfg.seed)


def ecbd_argv(cfg) -> list:
    return script("experiments.realdata", "splits", "ecbd", "--input", ecbd_root(cfg),
                  "--out", Path(cfg.out) / "probes" / "ecbd", "--diag-frac", cfg.diag_frac, "--seed", cfg.seed)


def templama_argv(cfg, k) -> list:
    return script("experiments.realdata", "splits", "templama", "--input", *templama_inputs(cfg),
                  "--from", cfg.templama_dates[k - 1], "--to", cfg.templama_dates[k],
                  "--out", probe_dir(cfg, k) / "templama", "--diag-frac", cfg.diag_frac, "--seed", cfg.seed)


def snapshot_argv(cfg, k) -> list:
    return script("experiments.realdata", "fetch", "twiki-snapshot", "--max-mb", f"{cfg.snapshot_mb:g}", "--month",
                  STAGES[k - 1][1])


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
        fix = "lower --val-every" if n[0] else "raise --val-every"
        raise ValueError(f"{diff}: {sum(n)} documents leave {n[0]} to train on and {n[1]} held out; {fix}")
    os.replace(folder / "val.csv.tmp", folder / "val.csv")
    print(f"  {n[0]:,} documents to train on, {n[1]:,} held out")


def text_tokens(cfg, path) -> int:
    """Tokens of a text file, tokenized into train.py's own cache (the same file train.py then reads)."""
    return len(data.load_tokens(str(path), data.load_tokenizer(cfg.init)))


# ----------------------------------------------------------------------------- the protocol

def scored(cfg, k, arm) -> bool:
    """Every score of a row is on disk: init.json, init-OTHER.json and init-text.json, or the run's summary,
    val.json and text.json."""
    if arm == "init":
        names = ("init.json", f"init-{OTHER[cfg.metric]}.json", "init-text.json")
        return all((stage_dir(cfg, k) / f).is_file() for f in names)
    run_ = run_dir(cfg, k, arm)
    return finished(run_) and (run_ / "val.json").is_file() and (run_ / "text.json").is_file()


def run_stage(cfg, k, progress):
    """One stage: data, the init row, traces, then every arm's training (which scores the probes) and
    the other metric with the held-out text."""
    pair, old, new = STAGES[k - 1]
    print(f"\n== stage {k}: {pair} (old snapshot {old}, diff {old}->{new}), "
          f"{cfg.stages.index(k) + 1} of the {len(cfg.stages)} stage(s) run now ==", flush=True)
    fetch_stage(cfg, k)
    sd, logs = stage_dir(cfg, k), stage_dir(cfg, k) / "logs"
    if not (sd / "init.json").is_file():
        run(init_probe_argv(cfg, k), logs / "init.log", cfg.threads)
    if not (sd / f"init-{OTHER[cfg.metric]}.json").is_file():
        run(init_probe_argv(cfg, k, OTHER[cfg.metric]), logs / f"init-{OTHER[cfg.metric]}.log", cfg.threads)
    if not (sd / "init-text.json").is_file():
        run(text_argv(cfg, k, cfg.init, sd / "init-text.json"), logs / "init-text.log", cfg.threads)
    todo = [arm for arm in cfg.arms if not finished(run_dir(cfg, k, arm))]
    for arm in [a for a in cfg.arms if a not in todo and k > 1 and not cfg.keep_optimizer]:
        drop_optimizer(run_dir(cfg, k - 1, arm))  # done before a kill, not dropped yet
    if not todo and all(scored(cfg, k, arm) for arm in cfg.arms):
        print(f"stage {k}: every arm finished, nothing to run")
        return
    for arm in todo:
        if not arm.endswith("-none") and not trace_file(cfg, k, arm).is_file():
            progress.say(k, arm, "tracing")
            run(trace_argv(cfg, k, arm), logs / f"trace-{'init' if k == 1 else arm}.log", cfg.threads)
    steps = train_steps(cfg, 0 if cfg.max_train_tokens else text_tokens(cfg, sd / "data" / "train.csv"))
    for arm in todo:
        progress.start_training(k, arm, steps)
        run(train_argv(cfg, k, arm, steps), logs / f"{arm}.log", cfg.threads)
        progress.trained(k, arm)
        if k > 1 and not cfg.keep_optimizer:
            drop_optimizer(run_dir(cfg, k - 1, arm))
    for arm in cfg.arms:  # held-out perplexity and the other metric of each final model
        if not scored(cfg, k, arm):
            progress.say(k, arm, "scoring the other metric and the held-out text")
        if not (run_dir(cfg, k, arm) / "val.json").is_file():
            run(val_argv(cfg, k, arm), logs / f"{arm}-val.log", cfg.threads)
        if not (run_dir(cfg, k, arm) / "text.json").is_file():
            run(text_argv(cfg, k, run_dir(cfg, k, arm), run_dir(cfg, k, arm) / "text.json"), logs / f"{arm}-text.log",
                cfg.threads)


class Progress:
    """Where the protocol stands, printed before each step of an arm ("stage 1/2, arm 2/4 full-fp:
    training ..."), with an ETA of the training left: seconds per update measured on the updates this
    invocation trained (the wall time of its train.py steps, loading and probe scoring included), times
    the updates still to train. Runs finished before, and the updates a killed run had done before its
    checkpoint, cost nothing now: they count neither as work done nor as work left. Only training is
    projected (tracing and scoring are minutes where training is hours); the later stages' updates are
    estimates (their diff sets' sizes, as --plan's)."""

    def __init__(self, cfg):
        self.cfg, self.seconds, self.updates = cfg, 0.0, 0  # seconds and updates of the training timed so far
        self.start, self.t0 = 0, 0.0  # the arm in training: the update it resumed from, its start time
        self.left = {(k, arm): 0 if finished(run_dir(cfg, k, arm)) else stage_steps(cfg, k)
                     for k in cfg.stages for arm in cfg.arms}

    def say(self, k, arm, what: str):
        left = sum(self.left.values())
        if not left:
            eta = "no training left"
        elif not self.updates:
            eta = f"ETA unknown until an update is timed ({left:,} updates of training left)"
        else:
            rate = self.seconds / self.updates
            eta = (f"ETA {duration(left * rate)} of training ({left:,} updates left at {rate:.3g} s/update, "
                   f"measured over the {self.updates:,} trained now)")
        stages, arms = self.cfg.stages, self.cfg.arms
        where = f"stage {stages.index(k) + 1}/{len(stages)}, arm {arms.index(arm) + 1}/{len(arms)} {arm}"
        print(f"[{where}] {what}; {eta}", flush=True)

    def start_training(self, k, arm, steps: int):
        """Before an arm's train.py: this stage's exact updates replace the estimate; a killed run's
        checkpoint says how many of them are done already."""
        self.left.update({(k, a): steps for a in self.cfg.arms if self.left[(k, a)]})
        self.start, self.t0 = resumed_step(run_dir(self.cfg, k, arm)), time.time()
        self.left[(k, arm)] = max(0, steps - self.start)
        resumed = f"training updates {self.start + 1:,}-{steps:,}"  # a killed run, from its checkpoint
        self.say(k, arm, resumed if self.start else f"training {steps:,} updates")

    def trained(self, k, arm):
        if self.left[(k, arm)]:  # a run killed after its last update trained none now: no rate to learn
            self.seconds += time.time() - self.t0
            self.updates += self.left[(k, arm)]
        self.left[(k, arm)] = 0

    def summary(self):
        if self.updates:
            print(f"\n# trained {self.updates:,} updates in {duration(self.seconds)} "
                  f"({self.seconds / self.updates:.3g} s/update, train.py's loading and scoring included)")


def resumed_step(run: Path) -> int:
    """The update a killed training step goes on from: its checkpoint's (mmap: the weights are not read).
    0 when there is none; an unreadable one is train.py's to report."""
    path = run / CKPT_NAME
    if not path.is_file():
        return 0
    try:
        ck = load_checkpoint(path, mmap=True)
    except ValueError:
        return 0
    step = ck.get("step") if isinstance(ck, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else 0


def drop_optimizer(run: Path):
    """Once the same arm's next stage has finished, its old stage is needed only as weights (the next
    stage's --init was read; the table reads summary.json, val.json, metrics.jsonl): the AdamW moments,
    two thirds of a full update's checkpoint, go. Read with weights_only=True (mmap: the weights are not
    all held in memory), written atomically; optimizer-dropped is written last, so a rerun does not reread it."""
    marker, path = run / "optimizer-dropped", run / CKPT_NAME
    if marker.is_file() or not path.is_file():
        return
    before = checkpoint_bytes(run)
    try:
        ck = load_checkpoint(path, mmap=True)
    except ValueError as e:  # a damaged checkpoint is one line
        raise ValueError(f"{e}; the next stage was trained from it, so it was readable then: "
                         "check the disk") from None
    opt = ck.get("optimizer") if isinstance(ck, dict) else None
    if isinstance(opt, dict) and opt.get("units") != [DROPPED]:
        # train.py --resume on this checkpoint stops in one line naming DROPPED (its AdamW checks the units)
        if ck.get("sharded"):  # train.py --fsdp's: the moments are in its shard folder, rewritten without them
            from experiments.fsdp import drop_moments, prune
            ck = drop_moments(str(path), ck)
        ck["optimizer"] = dict(t=opt.get("t", 0), units=[DROPPED], m=[], v=[])
        save_checkpoint(path, ck)
        if ck.get("sharded"):
            prune(str(run), ck["sharded"])  # the old folder, now that ckpt.pt names the new one
    write_text(marker, "the AdamW moments of this finished stage were dropped once the next stage had finished "
                       "(twiki.py; --keep-optimizer keeps them). ckpt.pt loads as --init; it cannot be resumed.\n")
    print(f"# dropped the optimizer state of {path}: {before / 1e9:.2f} -> {checkpoint_bytes(run) / 1e9:.2f} GB")


def checkpoint_bytes(run: Path) -> int:  # ckpt.pt, and a sharded run's shard folder (train.py --fsdp)
    return sum(f.stat().st_size for f in [run / CKPT_NAME, *run.glob("ckpt.dcp.*/*")] if f.is_file())


def export_all(cfg):
    """--export-hf DIR: each arm's final model (the last stage run now) as DIR/stageK/ARM, in Hugging Face layout."""
    k = max(cfg.stages)
    for arm in cfg.arms:
        if not exported(cfg, k, arm):
            run(export_argv(cfg, k, arm), stage_dir(cfg, k) / "logs" / f"{arm}-export.log", cfg.threads)


def exported(cfg, k, arm) -> bool:
    """DIR/stageK/ARM is done when its export.json names this arm's run (the absolute path export.py
    records) as its checkpoint is now (step and run-defining flags: a run trained on, or trained again
    after --overwrite, is exported again); anything else there is export.py's to re-export or refuse
    (check_exports refused another model's folder at the start)."""
    marker, run_ = Path(cfg.export_hf) / f"stage{k}" / arm / export.MARKER, run_dir(cfg, k, arm)
    try:
        d = read_json(marker) if marker.is_file() else {}
    except ValueError:
        return False
    try:
        now = export.source_run(str(run_))
    except ValueError:  # an unreadable checkpoint: export.py says so
        return False
    return isinstance(d, dict) and d.get("init") == os.path.abspath(run_) and d.get("run") == now


def check_exports(cfg):
    """Before anything slow: each --export-hf DIR/stageK/ARM is new, or holds an export of this arm's run
    (export.py's rule: another model there is refused, unless --overwrite)."""
    k = max(cfg.stages)
    for arm in cfg.arms:
        try:
            export.check_out(Path(cfg.export_hf) / f"stage{k}" / arm, os.path.abspath(run_dir(cfg, k, arm)),
                             cfg.overwrite)
        except ValueError as e:
            raise ValueError(f"--export-hf: {e} (export.py's --overwrite: this driver's)") from None


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

def train_rate(run: Path) -> float | None:
    """The median of the tok_per_s that train.py logged (training alone: its logged rates exclude probe
    scoring), so a first step slowed by compilation does not count."""
    rates = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line).get("tok_per_s")
            except (ValueError, AttributeError):
                continue
            if isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r):
                rates.append(r)
    return statistics.median(rates) if rates else None


def step_time(cfg, k, *names) -> float | None:
    """Wall seconds of the named steps (their logs' names) from the stage's logs/times.json."""
    path = stage_dir(cfg, k) / "logs" / "times.json"
    times = read_json(path) if path.is_file() else {}
    got = [times.get(n) for n in names] if isinstance(times, dict) else []
    return sum(got) if got and all(isinstance(t, (int, float)) for t in got) else None


def text_ppl(path) -> float | None:
    d = state(path, "text_ppl", (int, float)) if path.is_file() else None
    return d and d["text_ppl"]


def arm_row(cfg, k, arm) -> dict | None:
    """One finished run's numbers: the main metric (summary.json), the other one (val.json), val ppl
    (text.json), training time and tokens/s (train.py's), and the wall time of scoring the other metric and val ppl."""
    run = run_dir(cfg, k, arm)
    if not finished(run):
        return None
    s, other = read_json(run / "summary.json"), OTHER[cfg.metric]
    val = run / "val.json"
    return dict(stage=k, pair=STAGES[k - 1][0], arm=arm, run=str(run), init=init_of(cfg, k, arm), steps=s.get("steps"),
                probes=probe_summary(run / "summary.json", "probes"),
                **{f"probes_{other}": probe_summary(val) if val.is_file() else {}},
                val_ppl=text_ppl(run / "text.json"),
                time=s.get("time") if isinstance(s.get("time"), (int, float)) else None,
                tok_per_s=train_rate(run), score_time=step_time(cfg, k, f"{arm}-val", f"{arm}-text"))


def init_row(cfg, k) -> dict | None:
    path, other = stage_dir(cfg, k) / "init.json", OTHER[cfg.metric]
    if not path.is_file():
        return None
    second = stage_dir(cfg, k) / f"init-{other}.json"
    return dict(stage=k, pair=STAGES[k - 1][0], arm="init", run=str(path), init=cfg.init, steps=0,
                probes=probe_summary(path), **{f"probes_{other}": probe_summary(second) if second.is_file() else {}},
                val_ppl=text_ppl(stage_dir(cfg, k) / "init-text.json"), time=None, tok_per_s=None,
                score_time=step_time(cfg, k, "init", f"init-{other}", "init-text"))


def collect(cfg) -> list:
    """Every finished row of every stage, not only those run now (arms of earlier invocations with other
    --methods / --tgl too, after this one's): one table across stages and arms."""
    rows = []
    for k in range(1, len(STAGES) + 1):
        found = sorted(p.name for p in stage_dir(cfg, k).glob("*-*") if p.name.split("-")[0] in train.METHODS)
        arms = cfg.arms + [arm for arm in found if arm not in cfg.arms]
        rows += [r for r in [init_row(cfg, k)] + [arm_row(cfg, k, arm) for arm in arms] if r]
    return rows


def table(rows, metric) -> str:
    """Markdown: a row per stage x arm; per split perplexity and EM (%) under the main metric, then under the
    other; held-out ppl, training time and tokens/s, scoring time."""
    other = OTHER[metric]
    seen = list(dict.fromkeys(s for r in rows for s in list(r["probes"]) + list(r.get(f"probes_{other}", {}))))
    splits = [s for s in SPLITS if s in seen] + [s for s in seen if s not in SPLITS]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    keys = (("probes", ""), (f"probes_{other}", f" {other}"))
    head = ["stage", "arm"] + [f"{s}{tag} {m}" for _, tag in keys for s in splits for m in ("ppl", "EM %")]
    head += ["val ppl", "train (s)", "tok/s", "score (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['stage']} ({r['pair']})", r["arm"]]
        for key, _ in keys:
            for s in splits:
                p = r.get(key, {}).get(s)
                cells += [fmt(p and p["ppl"], ".2f"), fmt(p and 100 * p["em"], ".1f")]
        cells += [fmt(r["val_ppl"], ".2f"), fmt(r["time"], ".1f"), fmt(r["tok_per_s"], ",.0f"),
                  fmt(r.get("score_time"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(cfg, rows):
    out, other = Path(cfg.out), OTHER[cfg.metric]
    names = {"span": "answer-span", "sentence": "whole-sentence"}
    note = (f"\nSPLIT ppl / EM %: {names[cfg.metric]} perplexity and greedy exact match (%) per probe split "
            f"(train.py's scoring); SPLIT {other} ppl / EM %: the same under the {names[other]} metric (probe.py); "
            "the two metrics are not comparable with each other. twiki/*: TemporalWiki's probes of the stage's "
            "month pair; templama/*: facts whose answer changed / did not between the stage's two --templama-dates; "
            f"ecbd/new: ECBD's new entities. val ppl: perplexity of the held-out slice of the stage's diff set "
            f"({cfg.val_tokens:,} tokens); train (s): train.py's training time; tok/s: median logged training "
            "throughput (scoring excluded); score (s): wall time of the probe.py step(s) of the row (the other "
            "metric and val ppl). Rows 'init': the untouched --init model.\n")
    write_new(out / "results.md", table(rows, cfg.metric) + note)
    write_new(out / "results.json", json.dumps({"protocol": protocol_flags(cfg), "metrics": [cfg.metric, other],
                                                "rows": rows}, indent=1))
    print(f"\n{table(rows, cfg.metric)}\nwrote {out / 'results.md'} and {out / 'results.json'}")


# ----------------------------------------------------------------------------- --plan

def gb(n_bytes) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def diff_tokens(cfg, k) -> tuple[float, bool]:
    """GPT-2 tokens of stage k's diff set: its size / 4 bytes per token when it is on disk, else
    TemporalWiki's published size (DIFF_TOKENS). -> (tokens, from disk)."""
    diff = find_file(fetch.cache_root() / "twiki-diffsets", diff_name(k))
    return (diff.stat().st_size / 4, True) if diff is not None else (DIFF_TOKENS, False)


def stage_steps(cfg, k) -> int:
    """Updates per arm in stage k: the cap, else one pass over the diff set less its held-out slice."""
    return train_steps(cfg, diff_tokens(cfg, k)[0] * (1 - 1 / cfg.val_every))


def plan_stage(cfg, k) -> list:
    """The commands of stage k, those already done marked."""
    done = lambda ok, argv: ("# done: " if ok and not cfg.overwrite else "") + sh(argv)  # noqa: E731
    sd, other = stage_dir(cfg, k), OTHER[cfg.metric]
    lines = [f"\n# stage {k}: {STAGES[k - 1][0]} (old snapshot {STAGES[k - 1][1]}, diff {diff_name(k)})",
             done(old_text(cfg, k).is_file(), snapshot_argv(cfg, k)),
             f"# then one document in {cfg.val_every} of {diff_name(k)} -> {sd}/data/val.csv "
             "(held out), the rest -> train.csv"]
    if cfg.templama:
        lines.append(done((probe_dir(cfg, k) / "templama" / ".templama-splits.done").is_file(), templama_argv(cfg, k)))
    lines += [done((sd / "init.json").is_file(), init_probe_argv(cfg, k)),
              done((sd / f"init-{other}.json").is_file(), init_probe_argv(cfg, k, other)),
              done((sd / "init-text.json").is_file(), text_argv(cfg, k, cfg.init, sd / "init-text.json"))]
    traced = set()
    for arm in cfg.arms:
        if not arm.endswith("-none") and trace_file(cfg, k, arm) not in traced:
            traced.add(trace_file(cfg, k, arm))
            lines.append(done(trace_file(cfg, k, arm).is_file(), trace_argv(cfg, k, arm)))
    for arm in cfg.arms:
        lines.append(done(finished(run_dir(cfg, k, arm)), train_argv(cfg, k, arm, stage_steps(cfg, k))))
        lines.append(done((run_dir(cfg, k, arm) / "val.json").is_file(), val_argv(cfg, k, arm)))
        text = run_dir(cfg, k, arm) / "text.json"
        lines.append(done(text.is_file(), text_argv(cfg, k, run_dir(cfg, k, arm), text)))
    if cfg.export_hf and k == max(cfg.stages):
        lines += [sh(export_argv(cfg, k, arm)) for arm in cfg.arms]
    return lines


def plan_time(cfg) -> list:
    """Steps and hours per stage and arm and in all, from the assumed throughput: an ESTIMATE."""
    rate, per = tok_s(cfg), tokens_per_update(cfg)
    why = ("--assume-tok-s" if cfg.assume_tok_s else
           f"the default: 6 x {model_params(cfg) or HUB_PARAMS['gpt2-large']:,.0f} parameters"
           f"{'' if model_params(cfg) else ' (gpt2-large: the size of --init is unknown)'} FLOPs per token at "
           f"{MFU:.0%} MFU of {cfg.nproc} H100 SXM ({GPU_FLOPS / 1e12:.0f} dense bf16 TFLOP/s each), not measured; "
           "measure yours with `python -m experiments.bench train --device cuda` and pass --assume-tok-s")
    out = [f"\n# ESTIMATE of the training time, at an ASSUMED {rate:,.0f} training tokens/s per run ({why}):"]
    total = 0.0
    for k in cfg.stages:
        steps = stage_steps(cfg, k)
        hours = steps * per / rate / 3600
        src = ("--max-train-tokens" if cfg.max_train_tokens else "the diff set on disk / 4 bytes per token"
               if diff_tokens(cfg, k)[1] else
               f"TemporalWiki's ~{DIFF_TOKENS / 1e6:.0f}M tokens per diff set, approximate")
        out.append(f"#   stage {k} ({STAGES[k - 1][0]}): {steps:,} updates x {per:,} tokens = {steps * per:,} "
                   f"tokens per arm ({src}): {hours:.2f} h per arm, {hours * len(cfg.arms):.2f} h for "
                   f"{len(cfg.arms)} arms ({', '.join(cfg.arms)})")
        total += hours * len(cfg.arms)
    out.append(f"#   total: {total:.2f} h of training for {len(cfg.arms) * len(cfg.stages)} runs (ESTIMATE; tracing, "
               "probe scoring, tokenizing and downloads not included)")
    return out + [plan_checkpoints(cfg)]


def plan_checkpoints(cfg) -> str:
    """The plan's line on checkpoints: what its train.py commands carry (a --save-every or --save-minutes in
    --train-args wins over the driver's --save-minutes)."""
    passed, every = passed_save(cfg), passed_save(cfg).get("save_every")
    if not passed:
        return (f"#   checkpoints: every {cfg.save_minutes:g} minutes of measured training time (train.py "
                f"--save-minutes {cfg.save_minutes:g}: timed on the device in use, not assumed)" if cfg.save_minutes
                else "#   checkpoints: only at the end of each run (--save-minutes 0)")
    said = [f"every {passed['save_minutes']:g} minutes of measured training time (--save-minutes, from "
            "--train-args)"] if passed.get("save_minutes") else []
    if every:
        said.append(f"--save-every {every} updates (from --train-args) = about every "
                    f"{every * tokens_per_update(cfg) / tok_s(cfg) / 60:.3g} minutes at that rate")
    return "#   checkpoints: " + (" and ".join(said) or "only at the end of each run (--train-args)")


def plan_disk(cfg) -> list:
    """ONE total in GB: diff copies, token caches, snapshot prefixes, checkpoints (what --keep-optimizer keeps)."""
    tokens = {k: diff_tokens(cfg, k)[0] for k in range(1, len(STAGES) + 1)}
    params, months = model_params(cfg), {STAGES[k - 1][1] for k in cfg.stages}
    diff_cache = sum(tokens.values()) * BYTES_PER_TOKEN  # the unpacked diff sets ($TGL_CACHE; *_subset.csv not counted)
    copies = sum(tokens[k] for k in cfg.stages) * BYTES_PER_TOKEN  # train.csv + val.csv in every stage folder
    caches = sum(tokens[k] for k in cfg.stages) * 2 + len(months) * cfg.snapshot_mb * 1e6 / BYTES_PER_TOKEN * 2
    prefixes = len(months) * cfg.snapshot_mb * 1e6
    runs, last = len(cfg.arms) * len(cfg.stages), len(cfg.arms) * (len(cfg.stages) if cfg.keep_optimizer else 1)
    # per run fp32 weights (4 bytes a parameter); AdamW's two moments (8 bytes) where kept, for every trained
    # parameter (an upper bound: TGL-FP and LoRA train fewer); one more while a checkpoint is written
    ckpts = (4 * runs + 8 * last + 12) * params if params else 0
    exports = 4 * params * len(cfg.arms) if params and cfg.export_hf else 0
    total = diff_cache + copies + caches + prefixes + ckpts + exports
    return [f"# DISK (ESTIMATE): about {total / 1e9:.1f} GB in all = diff sets in the cache {gb(diff_cache)} "
            "+ their copies "
            f"in the stage folders {gb(copies)} + token caches {gb(caches)} + snapshot prefixes {gb(prefixes)} + "
            f"checkpoints {gb(ckpts) if params else 'unknown (model size unknown)'} ({runs} runs x 4 bytes/parameter, "
            f"AdamW moments (8 bytes/parameter) kept in {last} of them"
            f"{'' if cfg.keep_optimizer else ', the older stages dropped (--keep-optimizer keeps them)'}"
            ", and room for one more while it is written)"
            + (f" + HF exports {gb(exports)}" if exports else "")]


def plan_memory(cfg) -> list:
    """The training state per GPU, arithmetic: fp32 weights, gradients and AdamW's two moments, 16 bytes per
    parameter, on every GPU (DDP) or 1/N of it on each (--fsdp); activations come on top (docs/fsdp.md)."""
    n = model_params(cfg)
    if n is None:
        return ["\n# MEMORY: the size of --init is unknown; docs/fsdp.md has the table per GPU"]
    state, shards = 16 * n, cfg.nproc if cfg.fsdp else 1
    line = (f"\n# MEMORY (ARITHMETIC, not measured) per GPU: training state {gb(state / shards)} "
            f"(16 B/param x {n / 1e9:.2f}B parameters{f' / {shards} shards, --fsdp' if shards > 1 else ''}), "
            "activations extra")
    if state / shards > 0.8 * GPU_GB * 1e9:
        line += (f"; MORE than 80% of one {GPU_GB} GB GPU: "
                 + ("use more --nproc" if cfg.fsdp else "--nproc N --fsdp shards it (N GPUs: 1/N each)"))
    return [line]


def plan(cfg) -> str:
    """Every command, the downloads, the time and the disk: an estimate. No network, no model."""
    root, months = fetch.cache_root(), sorted({STAGES[k - 1][1] for k in cfg.stages})
    out = [f"# twiki.py --plan: init {cfg.init}, arms {' '.join(cfg.arms)}, stages {' '.join(map(str, cfg.stages))}",
           f"# downloads into {root} (TGL_CACHE); HF_ENDPOINT is honoured:",
           f"#   twiki-probes    TWiki_Probes.zip: {fetch.DATASETS['twiki-probes'].disk}",
           f"#   twiki-diffsets  TWiki_Diffsets.zip: {fetch.DATASETS['twiki-diffsets'].disk}",
           f"#   twiki-snapshot  the first {cfg.snapshot_mb:g} MB of text of month(s) {', '.join(months)} "
           f"(ranged reads of Wikipedia_Full.zip): about {gb(len(months) * cfg.snapshot_mb * 1e6)}",
           sh(script("experiments.realdata", "fetch", "twiki-probes")),
           sh(script("experiments.realdata", "fetch", "twiki-diffsets"))]
    out += [sh(script("experiments.realdata", "fetch", s)) for s in cfg.templama if s in TEMPLAMA_SETS]
    out.append(sh(splits_argv(cfg)))
    if cfg.ecbd:
        out.append(sh(ecbd_argv(cfg)))
    for k in cfg.stages:
        out += plan_stage(cfg, k)
    return "\n".join(out + plan_time(cfg) + plan_memory(cfg) + plan_disk(cfg))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg = parse_args(argv)
    with input_errors(PROG), ExitStack() as held:  # the one error path: bad input is one line
        for path, flag in [] if cfg.plan else [(cfg.out, "--out"), (cfg.export_hf, "--export-hf")]:
            if path:  # one driver per folder at a time (the plan writes nothing): checked under the lock
                held.enter_context(folder_lock(path, flag))
        check_config(cfg)
        if cfg.plan:
            print(plan(cfg))
            return None
        check_context(cfg, download=True)  # a hub name's config.json alone: kB, before the data sets
        start(cfg)
        fetch_shared(cfg)
        progress = Progress(cfg)  # after fetch_shared: the diff sets' sizes give the later stages' updates
        for k in cfg.stages:
            run_stage(cfg, k, progress)
        progress.summary()
        if cfg.export_hf:
            export_all(cfg)
        rows = collect(cfg)
        write_results(cfg, rows)
    return rows


if __name__ == "__main__":
    main()
