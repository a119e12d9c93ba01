"""Step 3 of TGL: continual pretraining of the traced units only (FP) or at per-unit learning rates (ALR).
    python train.py --init runs/base --data diff.txt --method recadam --tgl fp --trace trace.json --out runs/x
    torchrun --nproc_per_node 4 train.py ...  # DDP: --batch-size is the global batch
"""
import importlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

import data
import probe
import trace as tgl_trace  # ours, not the stdlib's: the root is first on sys.path
from checkpoint import CKPT_NAME, load_checkpoint, load_model, save_checkpoint
from common import POS, check_output, fail, flag, init_distributed, input_errors, log_lines, number
from common import duration, parse_config, write_text
from experiments import probe_files  # the data sets' probe files
from experiments.tools import folder_lock
from model import GPT, GPTConfig, add_lora, autocast, pick_device, unit_names
from optim import AdamW, clip_gradients, lr_at, make_param_groups, recadam_lambda, recadam_pull

# argparse types: a value outside the interval is refused, naming the flag
INT, NONNEG, BELOW_ONE = number("[0, inf)", int), number("[0, inf)"), number("[0, 1)")
REAL = number("(-inf, inf)")
RESUME_FREE = dict(resume_free=True)  # may change on --resume: it changes nothing computed
METHODS = ("full", "mixreview", "recadam", "lora")  # the continual-learning methods TGL is stacked on
TGL_MODES = ("none", "fp", "alr")  # no TGL, freeze the unselected units, or scale every unit's lr

@dataclass
class Config:  # train.py's flags
    # given for a mode that does not use it, a flag is refused (common.unused_flag)
    NEEDS = {"method": {"mixreview": "replay_data replay_ratio replay_decay", "lora": "lora_rank lora_alpha",
                        "recadam": "recadam_gamma recadam_k recadam_t0"},
             "tgl": {"fp alr": "trace rank_units trace_split control", "fp": "select", "alr": "alr_norm floor"},
             "decay": {"cosine linear": "min_lr"}}
    init: str = flag("scratch", "scratch | hub name | HF folder | run folder / ckpt.pt")
    out: str = flag("runs/train", "run folder", **RESUME_FREE)
    data: str = flag(None, "training text: .txt, .csv, a folder; PATH@N: its N first tokens", required=True)
    tokenizer: str = flag(None, "gpt2, word (tokenizer.json of --init or by --data) or a tokenizer.json")
    n_layer: int = flag(4, "scratch: layers", type=POS)
    n_head: int = flag(4, "scratch: attention heads", type=POS)
    n_embd: int = flag(128, "scratch: width", type=POS)
    block_size: int = flag(None, "tokens per window (default: scratch 128, else the context)", type=POS)
    dropout: float = flag(None, "default: scratch 0, else the model's", type=BELOW_ONE)
    # the continual-learning method that TGL is stacked on
    method: str = flag("full", "continual-learning method", choices=METHODS)
    replay_data: str = flag(None, "mixreview: old text replayed in each batch")
    replay_ratio: float = flag(0.25, "mixreview: the replayed share at step 0", type=number("[0, 1]"))
    # Mix-Review's decay is tuned per task; this default keeps a quarter of the first share
    replay_decay: float = flag(0.25, "mixreview: the share at the end, relative to step 0", type=NONNEG)
    recadam_gamma: float = flag(100.0, "recadam: strength of the pull to the start weights", type=NONNEG)
    recadam_k: float = flag(0.05, "recadam: k of lambda(t) = 1/(1+exp(-k (t - t0)))", type=REAL)
    recadam_t0: float = flag(None, "recadam: t0 (default: steps / 4)", type=REAL)
    lora_rank: int = flag(8, "lora: adapter rank", type=POS)
    lora_alpha: float = flag(16.0, "lora: adapter output times alpha/rank", type=number("(0, inf)"))
    # TGL: the trace, and how it becomes frozen units (fp) or LR scales (alr)
    tgl: str = flag("none", "fp: freeze unselected units; alr: scale their lr", choices=TGL_MODES)
    trace: str = flag(None, "trace.py's trace.json")
    selection: tgl_trace.Selection = field(default_factory=tgl_trace.Selection)
    # optimization
    steps: int = flag(500, "updates (may grow on --resume)", type=POS, **RESUME_FREE)
    batch_size: int = flag(16, "windows per micro-step, over all processes", type=POS)
    grad_accum: int = flag(1, "micro-steps per update", type=POS)
    lr: float = flag(1e-3, "peak learning rate", type=number("(0, inf)"))
    min_lr: float = flag(0.0, "lr at the end of the decay", type=NONNEG)
    warmup: int = flag(0, "linear warmup updates", type=INT)
    decay: str = flag("cosine", "decay after warmup", choices=["cosine", "linear", "none"])
    weight_decay: float = flag(0.0, "decoupled weight decay (matrices only)", type=NONNEG)
    beta1: float = flag(0.9, "Adam beta1", type=BELOW_ONE)  # beta = 1 would divide by 1 - beta^t = 0
    beta2: float = flag(0.99, "Adam beta2", type=BELOW_ONE)
    grad_clip: float = flag(1.0, "clipping threshold (0: off)", type=NONNEG)
    seed: int = flag(0, "seed of the init, data order and dropout")
    # evaluation, logging, checkpoints, hardware
    probes: list = flag([], "probe files to score", nargs="+", **RESUME_FREE)
    eval_every: int = flag(0, "score every N updates (0: at the end)", type=INT, **RESUME_FREE)
    metric: str = flag("span", "ppl of the answer span (paper) or sentence", choices=probe.METRICS,
                       **RESUME_FREE)
    log_every: int = flag(10, "log (and NaN check) every N updates", type=POS, **RESUME_FREE)
    save_every: int = flag(0, "checkpoint every N updates (0: at the end)", type=INT, **RESUME_FREE)
    save_minutes: float = flag(0.0, "also at a log line M minutes after the last save", type=NONNEG, **RESUME_FREE)
    resume: bool = flag(False, "continue from --out's ckpt.pt if there is one", **RESUME_FREE)
    overwrite: bool = flag(False, "replace the run in --out", **RESUME_FREE)
    device: str = flag("auto", "auto | cpu | cuda | mps", **RESUME_FREE)
    compile: bool = flag(False, "torch.compile (CUDA)", **RESUME_FREE)
    threads: int = flag(None, "CPU threads (default: torch's)", type=POS, **RESUME_FREE)
    fsdp: bool = flag(False, "under torchrun: shard weights, grads, moments (FSDP2)")
    fsdp_bf16: bool = flag(False, "--fsdp on CUDA: gather the weights in bf16 (fp32 shards)")
    checkpoint_activations: bool = flag(False, "--fsdp: recompute each block in the backward", **RESUME_FREE)

    def check(self):  # what argparse cannot check alone, before any slow work
        probe_files.check_files([f for f in (self.data, self.replay_data, self.trace) if f], self.probes)
        files = (CKPT_NAME, "metrics.jsonl", "summary.json")
        held = any(os.path.exists(os.path.join(self.out, f)) for f in files)
        world = int(os.environ.get("WORLD_SIZE", 1))
        for bad, msg in [(self.tgl != "none" and not self.trace, "--tgl needs --trace (trace.py's)"),
                         (self.method == "mixreview" and not self.replay_data, "mixreview: no --replay-data"),
                         (self.init == "scratch" and self.n_embd % self.n_head, "--n-embd % --n-head != 0"),
                         (self.resume and self.overwrite, "--resume and --overwrite contradict each other"),
                         (self.batch_size % world, "--batch-size (the global batch) % processes != 0"),
                         (self.fsdp and world < 2, "--fsdp: run under torchrun --nproc_per_node 2+"),
                         (self.fsdp_bf16 and not self.fsdp, "--fsdp-bf16 needs --fsdp"),
                         (self.checkpoint_activations and not self.fsdp, "--checkpoint-activations needs --fsdp"),
                         (self.fsdp_bf16 and not pick_device(self.device).startswith("cuda"), "--fsdp-bf16: CUDA only"),
                         (held and not (self.resume or self.overwrite) and os.environ.get("RANK", "0") == "0",
                          f"--out {self.out} holds a run: --resume continues it, --overwrite replaces it")]:
            if bad:
                raise ValueError(msg)
        self.selection.check()
        pick_device(self.device)  # fails now, not at the first tensor
        check_output(self.out, "--out", "dir")
        return self

    def run_defining(self) -> dict:  # what decides what the run computes: what --resume compares
        flat = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("resume_free")}
        return dict(flat, **asdict(flat.pop("selection")), processes=int(os.environ.get("WORLD_SIZE", 1)))

# ----- setup

def build_model(cfg: Config, device):
    """The tokenizer and the starting model (RecAdam's theta0): new from --seed, or loaded."""
    spec = cfg.tokenizer or ("gpt2" if cfg.init == "scratch" else cfg.init)
    if spec == "word":  # the vocabulary of the run it continues, or of the world the data comes from
        near = [os.path.join(d, "tokenizer.json")
                for d in (cfg.init, os.path.dirname(cfg.data) or ".", cfg.data)]
        spec = next((p for p in near if os.path.isfile(p)), None)
        if spec is None:
            raise ValueError(f"--tokenizer word: no {' or '.join(near)}; give a tokenizer.json")
    tokenizer = data.load_tokenizer(spec)
    if cfg.init == "scratch":
        torch.manual_seed(cfg.seed)
        model_config = GPTConfig(block_size=cfg.block_size or 128, vocab_size=tokenizer.n_vocab,
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                 dropout=cfg.dropout or 0.0)
        return tokenizer, GPT(model_config).to(device)
    try:
        model = load_model(cfg.init, device)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--init {cfg.init}: {e}") from None
    for f in [f for f in fields(Config) if f.name in ("n_layer", "n_head", "n_embd")]:  # scratch's shape:
        given, has = getattr(cfg, f.name), getattr(model.config, f.name)
        if given not in (f.default, has):  # given, and not the loaded model's: refused, never ignored
            raise ValueError(f"--{f.name.replace('_', '-')} {given}: --init {cfg.init} has {has}; drop it "
                             "(it shapes --init scratch only)")
    if cfg.dropout is None:
        return tokenizer, model
    for m in model.modules():  # --dropout overrides the loaded model's: a module attribute, not a weight
        if isinstance(m, torch.nn.Dropout):
            m.p = cfg.dropout
        elif isinstance(getattr(m, "dropout", None), float):  # attention's dropout probability
            m.dropout = cfg.dropout
    return tokenizer, model

@dataclass
class Run:  # what the loop reads and writes
    cfg: Config
    rank: int
    world: int
    device: str
    tokenizer: object
    model: GPT
    opt: AdamW
    scales: dict | None   # tgl_plan's {unit: lr scale}
    anchors: list | None  # RecAdam's theta0
    probes: list
    block_size: int
    stream: data.Stream = None
    dmodel: torch.nn.Module = None  # the GPT, compiled and/or DDP-wrapped, for the forward pass
    step: int = 0
    elapsed: float = 0.0  # training seconds, as of the last checkpoint
    last_loss: float = None
    evals: dict = None
    data: dict = None  # {text file: its token cache's name}: a digest of its bytes, checked on --resume
    loss_since_log: tuple = (0.0, 0)  # (loss sum, updates) since the last log line, this rank's

    def say(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

def resumed(cfg: Config) -> dict | None:
    """--resume: the checkpoint in --out if the run it describes is this one; None: start afresh."""
    path = os.path.join(cfg.out, CKPT_NAME)
    if not (cfg.resume and os.path.isfile(path)):
        return None
    saved = load_checkpoint(path)
    # a checkpoint from before a flag existed lacks its key: that run computed what the default computes
    was = dict(Config().run_defining(), **(saved.get("train_config") or {}))
    diff = [f"--{k.replace('_', '-')} {was[k]!r} -> {v!r}" for k, v in cfg.run_defining().items()
            if was[k] != v]
    if diff:
        raise ValueError(f"--resume: {path} was trained with other flags ({'; '.join(diff[:4])}): use those, "
                         "or --overwrite or another --out")
    if cfg.steps < saved["step"]:
        raise ValueError(f"--resume: --steps {cfg.steps} is below the checkpoint's {saved['step']}")
    return saved

def tgl_scales(cfg: Config, model: GPT) -> dict | None:
    """TGL steps 1-2 (trace.py): {unit: lr scale}, 0 = frozen; None without TGL. Every rank computes it."""
    if cfg.tgl == "none":
        return None
    try:
        trace, fp = tgl_trace.load_trace(cfg.trace), tgl_trace.fingerprint(model)
        if "fingerprint" not in trace:  # an older trace.py's
            print(f"note: {cfg.trace} has no model fingerprint: not checked against --init")
        elif trace["fingerprint"] != fp:
            raise ValueError(f"traced {trace.get('model')} ({trace['fingerprint']}), not --init {cfg.init} ({fp}): "
                             "trace --init")
        return tgl_trace.tgl_plan(trace, cfg.tgl, cfg.selection, unit_names(model.config.n_layer))
    except ValueError as e:  # name the trace file once
        raise ValueError(str(e) if str(e).startswith(cfg.trace) else f"{cfg.trace}: {e}") from None

def setup(cfg: Config) -> tuple[Run, dict | None]:
    """Devices, model, TGL's scales, optimizer, data: the same on a fresh start and a resume."""
    rank, world, device = init_distributed(pick_device(cfg.device), cfg.threads)
    torch.manual_seed(cfg.seed)  # LoRA's A follows --seed too
    saved = resumed(cfg)  # compared before the model is built
    tokenizer, model = build_model(cfg, "cpu" if cfg.fsdp else device)
    block_size, model_config = cfg.block_size or model.config.block_size, model.config
    if block_size > model_config.block_size or tokenizer.n_vocab > model_config.vocab_size:
        raise ValueError(f"--block-size {block_size} / vocabulary {tokenizer.n_vocab} exceed the model's "
                         f"{model_config.block_size} / {model_config.vocab_size}")
    probes = probe_files.read_probe_files(cfg.probes)  # checked now, not at the first evaluation
    probe.check_probes(tokenizer, probes, model_config.block_size, metric=cfg.metric)
    # a resume reuses the scales it saved: the trace file may have moved or changed since
    scales = saved["scales"] if saved else tgl_scales(cfg, model)
    if cfg.method == "lora":  # TGL step 3 under LoRA: FP puts adapters only in the selected units
        selected = None if scales is None else {u for u, s in scales.items() if s > 0}
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, selected)
    groups = make_param_groups(model, scales)
    if cfg.fsdp:  # the one wrap: each block, then the root
        groups = make_param_groups(fsdp().shard(model, device, cfg.fsdp_bf16, cfg.checkpoint_activations), scales)
    if not groups:
        raise ValueError("nothing to train: every unit is frozen")
    opt = AdamW(groups, cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    anchors = None  # RecAdam's theta0: a copy of the trained parameters as they start
    if cfg.method == "recadam" and cfg.recadam_gamma > 0:
        anchors = [p.detach().clone() for p in opt.params]
    run = Run(cfg, rank, world, device, tokenizer, model, opt, scales, anchors, probes, block_size)
    if rank > 0:  # rank 0 tokenizes first, the others then read its token cache
        dist.barrier()
    tokens = data.load_tokens(cfg.data, tokenizer)
    replay = data.load_tokens(cfg.replay_data, tokenizer) if cfg.method == "mixreview" else None
    if rank == 0 and world > 1:
        dist.barrier()
    # a token cache's name digests its text and tokenizer: the tokenizer is checked first
    run.data = {f: os.path.basename(getattr(t, "filename", t)) for f, t in [("the tokenizer", tokenizer.fingerprint),
                (cfg.data, tokens), (cfg.replay_data, replay)] if t is not None}
    for f in run.data if saved else ():
        if saved.get("data", run.data).get(f, run.data[f]) != run.data[f]:
            raise ValueError(f"--resume: {f} changed since {CKPT_NAME}: restore it, or --overwrite")
    run.stream = data.Stream(tokens, replay, cfg, block_size, rank, world)
    trained = " ".join(f"{g['unit']}x{g['lr_scale']:.2f}" for g in groups)
    trained_units = {g["unit"] for g in groups}
    frozen = " ".join(u for u in unit_names(model_config.n_layer) if u not in trained_units) or "-"
    run.say(f"{cfg.method}, tgl {cfg.tgl}: units (lr scale) {trained} | frozen: {frozen}")
    return run, saved

def restore(run: Run, saved: dict | None):
    """Resume: weights, optimizer, sampler and RNG exactly as saved, so the run continues bit for bit."""
    cfg = run.cfg
    if saved:
        if saved.get("sharded"):  # FSDP: each process reads its shards
            fsdp().load_sharded(run, saved)
        run.model.load_state_dict(saved["model"])
        run.opt.load_state_dict(saved["optimizer"])
        state = saved["ranks"][run.rank]
        run.stream.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if state["cuda"] is not None and run.device.startswith("cuda"):
            torch.cuda.set_rng_state(state["cuda"], run.device)
        run.step, run.elapsed, run.last_loss = saved["step"], saved["time"], saved["last_loss"]
        run.loss_since_log = state.get("acc", (0.0, 0))
        run.say(f"resumed: step {run.step}")
    else:
        torch.manual_seed(cfg.seed + run.rank)  # the dropout stream, whatever setup drew before
        random.seed(cfg.seed + run.rank)
    if run.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        for f in (CKPT_NAME, "summary.json") if cfg.overwrite else ():  # nothing old passes for new
            Path(cfg.out, f).unlink(missing_ok=True)
        path = os.path.join(cfg.out, "metrics.jsonl")  # the log as the checkpoint saw it
        write_text(path, "".join(log_lines(path, run.step) if saved and os.path.exists(path) else []))
        if hasattr(run.tokenizer, "save"):
            run.tokenizer.save(os.path.join(cfg.out, "tokenizer.json"))
    run.dmodel = torch.compile(run.model) if cfg.compile else run.model
    if run.world > 1 and not cfg.fsdp:
        run.dmodel = torch.nn.parallel.DistributedDataParallel(
            run.dmodel, device_ids=[run.device] if run.device.startswith("cuda") else None)

# ----- evaluate, log, checkpoint, the loop

def evaluate(run: Run) -> dict:
    """{split: {ppl, em, n}}: probe.py's scorer, so both agree."""
    with autocast(run.device):
        out = probe.evaluate(run.model, run.tokenizer, run.probes, device=run.device, metric=run.cfg.metric)
    run.say("\n".join(f"eval step {run.step}: {s} ppl {r['ppl']:.2f} EM {100 * r['em']:.1f}%"
                      for s, r in out.items()))
    return out

def stop(run: Run, why: str):  # a diverged run stops (exit 3); its last good checkpoint stays
    fail(f"{why} at step {run.step}; stopped: {run.cfg.out}/{CKPT_NAME}, if any, is good", "train.py", code=3)

def log(run: Run, rec: dict, eta: float):
    """A line on the terminal, with the ETA (this session's s/update times the updates left), and one in
    metrics.jsonl."""
    if not math.isfinite(rec["loss"]):
        stop(run, f"loss is {rec['loss']}")
    run.say(f"step {rec['step']}/{run.cfg.steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"{rec['tok_per_s']:,.0f} tok/s | {rec['time']:.1f}s | ETA {duration(eta)}")
    if run.rank == 0:
        with open(os.path.join(run.cfg.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

def checkpoint(run: Run, elapsed: float, loss_since_log: tuple):
    """All it takes to continue bit for bit (weights, moments, samplers, RNGs); rank 0 writes it."""
    if not all(torch.isfinite(p).all() for p in run.opt.params):
        stop(run, "weights are not finite")
    cuda = torch.cuda.get_rng_state(run.device) if run.device.startswith("cuda") else None
    mine = [dict(sampler=run.stream.state_dict(), torch=torch.get_rng_state(), python=random.getstate(),
                 cuda=cuda, acc=loss_since_log)] * run.world  # "acc": the key older checkpoints have
    if run.world > 1:
        dist.all_gather_object(mine, mine[0])  # every rank's sampler and RNG
    run.elapsed = elapsed
    state = dict(config=asdict(run.model.config), model=run.model.state_dict(), step=run.step, ranks=mine,
                 lora=getattr(run.model, "lora", None), optimizer=run.opt.state_dict(), scales=run.scales,
                 train_config=run.cfg.run_defining(), world_size=run.world, time=elapsed,
                 last_loss=run.last_loss, data=run.data)
    if run.cfg.fsdp:  # every process writes its shards
        fsdp().save_sharded(run, state)
    elif run.rank == 0:
        save_checkpoint(os.path.join(run.cfg.out, CKPT_NAME), state)

def forward_backward(run: Run, loss_sum: torch.Tensor):
    """--grad-accum micro-steps: .grad is their mean gradient; loss_sum (on device) gets their mean loss."""
    cfg = run.cfg
    for micro in range(cfg.grad_accum):
        x, y = (t.to(run.device, non_blocking=True) for t in run.stream.next(run.step))  # (B, T) each
        last = micro == cfg.grad_accum - 1
        # DDP all-reduces gradients on the last micro-step only: the others skip the sync
        sync = nullcontext() if last or run.world == 1 or run.cfg.fsdp else run.dmodel.no_sync()
        with sync, autocast(run.device):
            _, loss = run.dmodel(x, y)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach() / cfg.grad_accum

def update(run: Run):
    """Clip per unit, then AdamW; RecAdam scales the step by lambda(t), then pulls toward theta0."""
    cfg, opt = run.cfg, run.opt
    clip_gradients(opt, cfg.grad_clip, len(unit_names(run.model.config.n_layer)))
    lambda_t = 1.0
    if run.anchors:
        t0 = cfg.steps / 4 if cfg.recadam_t0 is None else cfg.recadam_t0
        lambda_t = recadam_lambda(run.step, cfg.recadam_k, t0)
    opt.step(update_scale=lambda_t)
    if run.anchors:
        recadam_pull(opt, run.anchors, cfg.recadam_gamma, lambda_t)
    opt.zero_grad()

def fsdp():  # plumbing, imported under --fsdp only
    return importlib.import_module("experiments.fsdp")

def mean_loss(run: Run, loss_sum: torch.Tensor, n_updates: int) -> float:
    """The mean loss over updates and ranks: the one place the loop waits for the device."""
    total = loss_sum.clone()  # a copy: each rank keeps its own sum until the log line
    if run.world > 1:
        dist.all_reduce(total)
    return total.item() / n_updates / run.world

def train(run: Run):
    cfg, opt = run.cfg, run.opt
    t_start, first_step = time.time(), run.step  # this session's start: its rate gives the ETA
    elapsed_before = run.elapsed  # training seconds of earlier sessions (a resume)
    t_log, step_log, t_saved = t_start, run.step, t_start  # the last log line (tok/s since), save
    loss_sum = torch.tensor(run.loss_since_log[0], device=run.device)
    n_updates = run.loss_since_log[1]  # updates in loss_sum
    run.model.train()
    while run.step < cfg.steps:
        # determine the learning rate: the schedule times each unit's TGL scale (ALR; 1 otherwise)
        lr = lr_at(run.step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]

        # forward, backward, update
        forward_backward(run, loss_sum)
        run.step, n_updates = run.step + 1, n_updates + 1
        done = run.step == cfg.steps
        logging = run.step % cfg.log_every == 0 or done
        # the per-unit norms of this update's gradient, before clipping: the paper's Figure 1
        grad_norms = tgl_trace.grad_norms(run.model) if logging else None
        update(run)

        # evaluate and checkpoint (the loss first: the checkpoint keeps the last one)
        now = time.time()
        due = [logging and cfg.save_minutes > 0 and now - t_saved >= 60 * cfg.save_minutes]
        if logging and run.world > 1:  # rank 0's clock decides: every rank saves at the same step
            dist.broadcast_object_list(due, src=0)
        saving = done or (cfg.save_every > 0 and run.step % cfg.save_every == 0) or due[0]
        if logging or saving:
            run.last_loss = mean_loss(run, loss_sum, n_updates)
        scoring = run.probes and (done or (cfg.eval_every > 0 and run.step % cfg.eval_every == 0))
        if scoring:
            run.evals = evaluate(run) if run.rank == 0 or cfg.fsdp else None

        # timing and logging
        if logging:
            tok_s = cfg.batch_size * run.block_size * cfg.grad_accum * (run.step - step_log) / (now - t_log)
            eta = (now - t_start) / (run.step - first_step) * (cfg.steps - run.step)
            rec = dict(step=run.step, loss=run.last_loss, lr=lr, tok_per_s=tok_s, grad_norms=grad_norms,
                       time=elapsed_before + now - t_start)
            if scoring:
                rec["probes"] = run.evals
            log(run, rec, eta)
            loss_sum, n_updates, t_log, step_log = loss_sum * 0, 0, time.time(), run.step
        if saving:
            checkpoint(run, elapsed_before + now - t_start, (loss_sum.item(), n_updates))
            t_saved = time.time()

def finish(run: Run) -> dict:
    """summary.json; a resumed finished run writes the same (its time from the checkpoint)."""
    cfg = run.cfg
    if run.probes and run.evals is None and (run.rank == 0 or cfg.fsdp):
        run.evals = evaluate(run)
    summary = dict(out=cfg.out, method=cfg.method, tgl=cfg.tgl, steps=run.step, final_loss=run.last_loss,
                   probes=run.evals, metric=cfg.metric, scales=run.scales, time=run.elapsed,
                   trainable_params=sum(p.numel() for p in run.opt.params))
    if run.rank == 0:
        write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=1))
    if run.world > 1:
        dist.destroy_process_group()
    return summary

def main(argv=None):
    cfg = parse_config(Config, "train.py", __doc__, argv)
    with input_errors("train.py"), folder_lock(cfg.out):  # bad input is one line; a bug keeps its traceback
        run, saved = setup(cfg.check())
        restore(run, saved)
        train(run)
        return finish(run)

if __name__ == "__main__":
    main()
