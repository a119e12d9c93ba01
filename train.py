"""Step 3 of TGL: continual pretraining with the traced units only (FP) or at per-unit learning rates (ALR).

    python train.py --init scratch --data world/t0.txt --tokenizer word --out runs/base
    python train.py --init runs/base --data world/diff.txt --method recadam --tgl fp \\
        --trace trace.json --probes world/probes/*.jsonl --out runs/recadam_fp
    torchrun --nproc_per_node 4 train.py ...            # DDP: --batch-size is the global batch

One file: a hand-written AdamW with one parameter group per unit (model.unit_of), the continual-learning
methods (full, mixreview, recadam, lora) that TGL is stacked on, atomic checkpoints with exact resume, DDP.
"""
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

import data
import probe
import trace as tgl_trace  # the project's trace.py (the repository root comes first on sys.path)
from common import Parser, add_flags, check_output, fail, flag, from_args, input_errors, number, read_text, write_text
from model import CKPT_NAME, GPT, GPTConfig, add_lora, autocast, load_checkpoint, load_model, pick_device
from model import save_checkpoint, unit_names, unit_of

POSITIVE, NONNEG, UNIT = number("[1, inf)", int), number("[0, inf)"), number("[0, 1)")  # argparse types


@dataclass
class Config:
    """train.py's flags, one field each. A checkpoint records them; --resume refuses to change any but the
    resume_free ones (and --steps may only grow)."""
    init: str = flag("scratch", "scratch | known model name | local HF folder | run folder / ckpt.pt")
    out: str = flag("runs/train", "run folder: ckpt.pt, metrics.jsonl, summary.json", resume_free=True)
    data: str = flag(None, "training text: .txt, TemporalWiki .csv or a folder; PATH@N: a prefix", required=True)
    tokenizer: str = flag(None, "default: the init's tokenizer (scratch: gpt2)", choices=["gpt2", "word"])
    tokenizer_file: str = flag(None, "word vocabulary (tokenizer.json); default: tokenizer.json next to --data")
    # the model, when --init scratch
    n_layer: int = flag(4, "scratch: layers", type=POSITIVE)
    n_head: int = flag(4, "scratch: attention heads", type=POSITIVE)
    n_embd: int = flag(128, "scratch: width", type=POSITIVE)
    block_size: int = flag(None, "tokens per window (default: scratch 128, else the model's context)", type=POSITIVE)
    dropout: float = flag(None, "dropout (default: scratch 0, else the model's)", type=UNIT)
    # the continual-learning method that TGL is stacked on
    method: str = flag("full", "continual-learning method", choices=["full", "mixreview", "recadam", "lora"])
    replay_data: str = flag(None, "mixreview: old pretraining text replayed into each batch")
    replay_ratio: float = flag(0.25, "mixreview: share of each batch that is replay at step 0", type=number("[0, 1]"))
    # Mix-Review (He et al. 2021) shrinks the mixed-in old data geometrically over training (its "mix-decay"). The
    # published decay is tuned per task, so this default is a choice: a quarter of the starting share is left.
    replay_decay: float = flag(0.25, "mixreview: share left at the end, as a fraction of the start (1 = constant)",
                               type=NONNEG)
    recadam_gamma: float = flag(100.0, "recadam: strength of the pull toward the start weights (0 = AdamW)",
                                type=NONNEG)
    recadam_k: float = flag(0.05, "recadam: slope of lambda(t) = 1/(1+exp(-k (t - t0)))", type=number("(-inf, inf)"))
    recadam_t0: float = flag(None, "recadam: midpoint of the annealing (default: steps / 4)", type=number("(-inf, inf)"))
    lora_rank: int = flag(8, "lora: adapter rank", type=POSITIVE)
    lora_alpha: float = flag(16.0, "lora: adapter scale alpha (output scaled by alpha/rank)", type=number("(0, inf)"))
    # TGL: where the trace comes from, and how it becomes frozen units or LR scales (Selection)
    tgl: str = flag("none", "TGL: fp freezes unselected units, alr scales each unit's LR", choices=["none", "fp", "alr"])
    trace: str = flag(None, "trace.json from trace.py")
    trace_probes: list = flag(None, "diagnostic probe files: trace at start instead of --trace", nargs="+")
    trace_text: str = flag(None, "old pretraining text for the LM norm when tracing at start")
    trace_n_span: int = flag(100, "tracing at start: probes per split", type=POSITIVE)
    trace_n_lm: int = flag(100, "tracing at start: LM windows", type=POSITIVE)
    selection: tgl_trace.Selection = field(default_factory=tgl_trace.Selection)
    embed_rows: str = flag("all", "seen: update only the embedding rows of tokens in the batch (weights and Adam "
                           "moments)", choices=["all", "seen"])
    # optimization
    steps: int = flag(500, "optimizer updates (may grow on --resume)", resume_free=True, type=POSITIVE)
    batch_size: int = flag(16, "global batch (windows per micro-step, over all processes)", type=POSITIVE)
    grad_accum: int = flag(1, "micro-steps per update (gradients averaged)", type=POSITIVE)
    lr: float = flag(1e-3, "peak learning rate", type=number("(0, inf)"))
    min_lr: float = flag(0.0, "learning rate at the end of the decay", type=NONNEG)
    warmup: int = flag(0, "linear warmup updates", type=number("[0, inf)", int))
    decay: str = flag("cosine", "learning-rate decay after warmup", choices=["cosine", "linear", "none"])
    weight_decay: float = flag(0.0, "decoupled weight decay (matrices only)", type=NONNEG)
    beta1: float = flag(0.9, "Adam beta1", type=UNIT)  # beta = 1 would divide by 1 - beta^t = 0
    beta2: float = flag(0.99, "Adam beta2", type=UNIT)
    grad_clip: float = flag(1.0, "gradient clipping threshold (0 = off); see --clip-by", type=NONNEG)
    clip_by: str = flag("unit", "unit: clip each unit's gradient to grad_clip/sqrt(units of the model), the same "
                        "rule whichever units train; global: one norm over the trained parameters (an FP run is then "
                        "clipped less than a full one)", choices=["unit", "global"])
    seed: int = flag(0, "seed of the init, the data order and dropout")
    # evaluation, logging, checkpoints, hardware: none of these changes what is trained
    probes: list = flag([], "probe files scored every --eval-every steps and at the end", resume_free=True, nargs="+")
    eval_every: int = flag(0, "score probes (and --val-data) every N updates (0 = only at the end)",
                           resume_free=True, type=number("[0, inf)", int))
    val_data: str = flag(None, "held-out text whose perplexity is scored with the probes", resume_free=True)
    val_tokens: int = flag(65536, "--val-data: tokens scored, as consecutive context-length windows",
                           resume_free=True, type=POSITIVE)
    metric: str = flag("span", "probe perplexity of the answer span (the paper's) or of the whole sentence "
                       "(TemporalWiki's scorer)", resume_free=True, choices=probe.METRICS)
    log_every: int = flag(10, "progress line, metrics line and NaN check every N updates", resume_free=True,
                          type=POSITIVE)
    save_every: int = flag(0, "checkpoint every N updates (0 = only at the end)", resume_free=True,
                           type=number("[0, inf)", int))
    resume: bool = flag(False, "continue from OUT/ckpt.pt if it exists", resume_free=True)
    overwrite: bool = flag(False, "replace a run in --out (without it, a run there is refused: --resume "
                           "continues it)", resume_free=True)
    device: str = flag("auto", "auto | cpu | cuda | mps", resume_free=True)
    compile: bool = flag(False, "torch.compile the model (CUDA)", resume_free=True)
    threads: int = flag(None, "CPU threads (default: torch's, shared among local processes)", resume_free=True,
                        type=POSITIVE)

    def check(self):
        """What argparse cannot check alone, before any slow work: a ValueError names the flag and what to do."""
        specs = [(self.data, "--data"), (self.replay_data, "--replay-data"), (self.trace_text, "--trace-text"),
                 (self.val_data, "--val-data")]
        paths = [data.parse_text_spec(f)[0] for f, _ in specs if f] + [f for f in (self.trace, self.tokenizer_file) if f]
        paths += [data.parse_probe_spec(f)[0] for f in self.probes + (self.trace_probes or [])]  # FILE@DATES:SPLIT
        for bad, msg in [(next((f for f in paths if not os.path.exists(f)), None), "no such file: {}"),
                         (self.tgl != "none" and not (self.trace or self.trace_probes),
                          f"--tgl {self.tgl} needs --trace FILE or --trace-probes FILE... --trace-text OLD"),
                         (self.trace_probes and not self.trace_text, "--trace-probes needs --trace-text (old text "
                          "for the LM gradient norm)"),
                         (self.method == "mixreview" and not self.replay_data, "--method mixreview needs --replay-data"),
                         (self.init == "scratch" and self.n_embd % self.n_head,
                          f"--n-embd {self.n_embd} must be a multiple of --n-head {self.n_head}"),
                         (self.resume and self.overwrite, "--resume and --overwrite contradict each other: pick one")]:
            if bad:
                raise ValueError(msg.format(bad))
        self.selection.check()
        pick_device(self.device)  # --device cuda without CUDA fails here, not at the first tensor
        check_output(self.out, "--out", "dir")
        first_rank = int(os.environ.get("RANK", 0)) == 0  # under torchrun, rank 0 may already be writing --out
        if first_rank and not (self.resume or self.overwrite) and any(
                os.path.exists(os.path.join(self.out, f)) for f in (CKPT_NAME, "metrics.jsonl", "summary.json")):
            raise ValueError(f"--out {self.out} already holds a run; pass --resume to continue it or --overwrite "
                             "to replace it")
        return self

    def run_defining(self) -> dict:
        """{flag: value} of everything that decides what the run computes: what --resume compares."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("resume_free")}
        return dict(flat, **asdict(flat.pop("selection")))

# ----------------------------------------------------------------------------- the optimizer


class AdamW:
    """AdamW (Loshchilov & Hutter 2019), written out. For each parameter, at update t:

        theta <- theta * (1 - lr * wd)                      decoupled weight decay, matrices only
        m     <- b1 * m + (1 - b1) * g                      first moment
        v     <- b2 * v + (1 - b2) * g^2                    second moment
        theta <- theta - s * lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    s is `update_scale` (1, or RecAdam's lambda(t)). The operations and their order are those of
    torch.optim.AdamW, so the two agree to float rounding. Each group is one unit: {"unit", "params",
    "lr_scale"}; the loop sets group["lr"] = base_lr(step) * lr_scale, which is how TGL+ALR's per-unit
    scales reach the update. Frozen units (TGL+FP) are never given to the optimizer, so they hold no
    state and cost no update. `rows[id(p)] = LongTensor`: update only those rows of p this step.
    """

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.param_groups = [dict(g, lr=lr * g["lr_scale"]) for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.beta1, self.beta2, self.eps, self.weight_decay = betas[0], betas[1], eps, weight_decay
        self.t, self.rows = 0, {}
        self.exp_avg = [torch.zeros_like(p) for p in self.params]     # m, per parameter
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]  # v, per parameter

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _update(self, params, grads, exp_avg, exp_avg_sq, lrs, update_scale):
        """The rule, once, on lists of tensors (the docstring's four lines in order), in fused _foreach calls."""
        bias1, bias2_sqrt = 1 - self.beta1 ** self.t, math.sqrt(1 - self.beta2 ** self.t)
        if self.weight_decay:  # decoupled: shrink the weights, not the gradient; vectors (biases, LN) are exempt
            mats = [k for k, p in enumerate(params) if p.ndim >= 2]
            torch._foreach_mul_([params[k] for k in mats], [1 - lrs[k] * self.weight_decay for k in mats])
        torch._foreach_lerp_(exp_avg, grads, 1 - self.beta1)
        torch._foreach_mul_(exp_avg_sq, self.beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - self.beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, [-lr * update_scale / bias1 for lr in lrs])

    @torch.no_grad()
    def step(self, update_scale=1.0):
        self.t += 1
        lrs = [g["lr"] for g in self.param_groups for _ in g["params"]]  # per parameter: its unit's lr
        dense = [i for i, p in enumerate(self.params) if p.grad is not None and id(p) not in self.rows]
        if dense:
            self._update(*([seq[i] for i in dense] for seq in (self.params, [p.grad for p in self.params],
                                                               self.exp_avg, self.exp_avg_sq, lrs)), update_scale)
        for i, p in enumerate(self.params):  # row-sparse (--embed-rows seen): the same rule on copies of the rows
            rows = self.rows.get(id(p))
            if rows is not None and p.grad is not None:
                w, m, v = p[rows], self.exp_avg[i][rows], self.exp_avg_sq[i][rows]  # (R, C) copies
                self._update([w], [p.grad[rows]], [m], [v], [lrs[i]], update_scale)
                p[rows], self.exp_avg[i][rows], self.exp_avg_sq[i][rows] = w, m, v

    def state_dict(self):
        return {"t": self.t, "units": [g["unit"] for g in self.param_groups], "m": self.exp_avg, "v": self.exp_avg_sq}

    def load_state_dict(self, d):
        if d["units"] != [g["unit"] for g in self.param_groups]:
            raise ValueError(f"optimizer state is for units {d['units']}, this run trains others")
        self.t = d["t"]
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, d["m"] + d["v"]):
            dst.copy_(src)


def make_param_groups(model, scales=None):
    """One group per unit that trains, in network order: {"unit", "params", "lr_scale"}. `scales` is
    tgl_plan's {unit: scale}; missing units (or no TGL) train at 1.0. Frozen parameters (LoRA's base) stay out."""
    scales, groups = scales or {}, {}
    for name, p in model.named_parameters():
        unit = unit_of(name)
        if scales.get(unit, 1.0) == 0:
            # TGL step 3, FP: a unit the trace did not select is frozen. requires_grad False means autograd
            # computes no weight gradient for it and the optimizer holds no state for it.
            p.requires_grad_(False)
        if p.requires_grad:
            groups.setdefault(unit, []).append(p)
    # TGL step 3, ALR: each unit's group carries its scale; AdamW trains it at lr * lr_scale
    return [{"unit": u, "params": ps, "lr_scale": float(scales.get(u, 1.0))} for u, ps in groups.items()]


def clip_gradients(opt, max_norm, by, n_units):
    """Clipping that treats every arm alike. A global norm over the *trained* parameters is smaller when FP
    freezes units, so FP runs would be clipped less than full runs. Per unit, each unit's gradient is clipped
    to max_norm / sqrt(n_units) (all units of the model, trained or not): a unit's update never depends on
    which other units train, and a model whose units all sit at the threshold has global norm max_norm."""
    if by == "global":
        torch.nn.utils.clip_grad_norm_(opt.params, max_norm, foreach=True)
        return
    for g in opt.param_groups:
        torch.nn.utils.clip_grad_norm_(g["params"], max_norm / math.sqrt(n_units), foreach=True)

# ----------------------------------------------------------------------------- continual-learning methods


def recadam_lambda(t, k, t0):
    """RecAdam (Chen et al. 2020) balances the new-text loss against a quadratic pull back to the pretrained
    weights; lambda(t) = 1 / (1 + exp(-k (t - t0))) anneals from ~0 (mostly recall) to 1 (all new data), so
    early updates, when the new text's gradients are least informed, move the model least. Overflow-safe."""
    x = k * (t - t0)
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@torch.no_grad()
def recadam_pull(opt, anchors, gamma, lam):
    """RecAdam's decoupled pull: theta <- theta - lr * gamma * (1 - lambda) * (theta - theta0), the step of
    (1 - lambda) * gamma/2 * ||theta - theta0||^2 outside Adam's moments (AdamW.step scales the Adam part by
    lambda). Per parameter its unit's own lr: under TGL+ALR a slow unit is pulled back slowly too. Capped at
    1: never past theta0."""
    coefs = [-min(1.0, g["lr"] * gamma * (1 - lam)) for g in opt.param_groups for _ in g["params"]]
    diff = torch._foreach_sub(opt.params, anchors)
    torch._foreach_mul_(diff, coefs)
    torch._foreach_add_(opt.params, diff)


class Stream:
    """Mix-Review (He et al. 2021) fights forgetting by replaying old pretraining text inside the new batches.
    Each step's batch (B rows of T tokens): windows of --data, the last round(B * ratio(step)) rows taken from
    --replay-data, ratio(step) = replay_ratio * replay_decay ** (step / steps). Both samplers draw every step,
    even when no replay row is kept, so the data of a step depends only on the step: exact resume."""

    def __init__(self, tokens, replay, cfg: Config, block_size, rank=0, world=1):
        self.b, self.cfg = cfg.batch_size // world, cfg
        self.new = data.Batcher(tokens, block_size, self.b, cfg.seed, rank, world)
        self.old = None if replay is None else data.Batcher(replay, block_size, self.b, cfg.seed + 1, rank, world)

    def n_replay(self, step):
        c = self.cfg
        return 0 if self.old is None else round(self.b * c.replay_ratio * c.replay_decay ** (step / c.steps))

    def next(self, step):
        x, y = self.new.next()  # (b, T) each
        if self.old is not None:
            (xr, yr), n = self.old.next(), self.n_replay(step)
            x, y = torch.cat([x[:self.b - n], xr[:n]]), torch.cat([y[:self.b - n], yr[:n]])
        return x, y

    def state_dict(self):
        return {"new": self.new.state_dict(), "old": self.old and self.old.state_dict()}

    def load_state_dict(self, d):
        self.new.load_state_dict(d["new"])
        self.old and self.old.load_state_dict(d["old"])


def lr_at(step, cfg: Config):
    """Base learning rate of update `step` (0-based): linear warmup, then cosine/linear/no decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.decay == "none":
        return cfg.lr
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    coef = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.decay == "cosine" else 1 - frac
    return cfg.min_lr + coef * (cfg.lr - cfg.min_lr)

# ----------------------------------------------------------------------------- setup


def get_tokenizer(cfg: Config):
    """--tokenizer-file; else word: tokenizer.json of the init run or next to --data; else gpt2 / the init's."""
    if cfg.tokenizer == "word" or cfg.tokenizer_file:
        data_dir = cfg.data if os.path.isdir(cfg.data) else os.path.dirname(data.parse_text_spec(cfg.data)[0]) or "."
        near = [os.path.join(d, "tokenizer.json") for d in ([cfg.init] if os.path.isdir(cfg.init) else []) + [data_dir]]
        path = cfg.tokenizer_file or next((p for p in near if os.path.isfile(p)), None)
        if path is None:
            raise ValueError(f"--tokenizer word: no tokenizer.json in {' or '.join(near)}; pass --tokenizer-file")
        return data.load_tokenizer(path)
    return data.load_tokenizer("gpt2" if cfg.tokenizer == "gpt2" or cfg.init == "scratch" else cfg.init)


def build_model(cfg: Config, n_vocab, device):
    """The starting model (also theta0 for RecAdam): fresh from --seed, or loaded with load_model."""
    if cfg.init == "scratch":
        torch.manual_seed(cfg.seed)
        return GPT(GPTConfig(block_size=cfg.block_size or 128, vocab_size=n_vocab, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout or 0.0)).to(device)
    try:
        model = load_model(cfg.init, device)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--init {cfg.init}: {e}") from None
    if cfg.dropout is not None:  # dropout lives in modules, not in the weights
        model.config.dropout = cfg.dropout
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
            elif isinstance(getattr(m, "dropout", None), float):
                m.dropout = cfg.dropout
    return model


def get_scales(cfg: Config, model, tokenizer, device, rank):
    """TGL steps 1-2: {unit: lr scale} (0 = frozen) from --trace, or traced now; None without TGL."""
    if cfg.tgl == "none":
        return None
    source = cfg.trace or os.path.join(cfg.out, "trace.json")
    try:
        if cfg.trace:
            trace = tgl_trace.load_trace(cfg.trace)
        else:
            tcfg = tgl_trace.TraceConfig(init=cfg.init, probes=cfg.trace_probes, text=cfg.trace_text, out=source,
                                   n_span=cfg.trace_n_span, n_lm=cfg.trace_n_lm, seed=cfg.seed, selection=cfg.selection)
            trace = tgl_trace.trace_files(model, tokenizer, tcfg, device)
            if rank == 0:
                write_text(source, json.dumps(trace, indent=1))
        return tgl_trace.tgl_plan(trace, cfg.tgl, cfg.selection, unit_names(model.config.n_layer))
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def setup_ddp(cfg: Config):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU). -> rank, world, device."""
    device = pick_device(cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    elif not cfg.threads:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    return rank, world, device


def gathered(obj, world):
    """obj from every rank, as a list by rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Run:
    """What the loop reads and writes, built by setup() and restore(): one object instead of closures."""
    cfg: Config
    rank: int
    world: int
    device: str
    tokenizer: object
    model: GPT                      # the GPT itself: checkpoints and evaluation use it
    opt: AdamW
    stream: Stream
    probes: list
    val_tokens: object              # --val-data as a token array, or None
    scales: dict | None             # tgl_plan's {unit: lr scale}, None without TGL
    anchors: list | None            # RecAdam's theta0, one tensor per trained parameter
    block_size: int
    dmodel: torch.nn.Module = None  # what the forward pass calls: the GPT, compiled and/or DDP-wrapped
    step: int = 0                   # optimizer updates done
    elapsed: float = 0.0            # training seconds before this process, then at the last checkpoint
    last_loss: float | None = None
    evals: dict | None = None       # the latest evaluate(): probes and val_ppl

    def say(self, *a):
        if self.rank == 0:
            print(*a, flush=True)


def check_resume(cfg: Config, ck: dict, path):
    """--resume continues the run the checkpoint describes, or refuses in one line listing what differs."""
    saved, now = ck.get("train_config"), cfg.run_defining()
    if saved is None:
        raise ValueError(f"{path}: written by an older tgl without its config; re-run with --overwrite")
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"--resume: {path} was trained with other flags ({'; '.join(diff)}); resume with the "
                         "same flags, or start a new run with --overwrite or another --out")
    if cfg.steps < ck["step"]:
        raise ValueError(f"--steps {cfg.steps} is below the checkpoint's step {ck['step']}; it can only grow")
    if ck["world_size"] != int(os.environ.get("WORLD_SIZE", 1)):
        raise ValueError(f"{path} was written by {ck['world_size']} processes; resume with as many")


def load_data(run: Run):
    """Training text (and Mix-Review's replay), then the held-out text. Rank 0 tokenizes first (the token
    cache is shared), the others read its cache."""
    cfg, tok = run.cfg, run.tokenizer
    if run.rank > 0:
        dist.barrier()
    tokens = data.load_tokens(cfg.data, tok)
    replay = data.load_tokens(cfg.replay_data, tok) if cfg.method == "mixreview" else None
    if run.rank == 0 and run.world > 1:
        dist.barrier()
    run.stream = Stream(tokens, replay, cfg, run.block_size, run.rank, run.world)
    run.val_tokens = data.load_tokens(cfg.val_data, tok) if cfg.val_data else None


def setup(cfg: Config) -> tuple[Run, dict | None]:
    """Devices, the model, TGL's scales, the optimizer and data: the same on a fresh start and a resume
    (restore() then loads the state). Returns the run and the checkpoint to resume, if any."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_ddp(cfg)
    torch.manual_seed(cfg.seed)  # whatever is random before training (LoRA's A init) follows --seed too
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, CKPT_NAME)
    ck = load_checkpoint(path) if cfg.resume and os.path.isfile(path) else None
    if ck:  # read once, here: the flags are compared before the model is built
        check_resume(cfg, ck, path)
    tokenizer = get_tokenizer(cfg)
    model = build_model(cfg, tokenizer.n_vocab, device)
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size or tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"--block-size {block_size} / vocabulary {tokenizer.n_vocab} exceed the model's "
                         f"{model.config.block_size} / {model.config.vocab_size}")
    # every probe is read and length-checked now, with probe.py's rule, not at the first evaluation
    probes = data.read_probe_files(cfg.probes)
    probe.check_probes(tokenizer, probes, model.config.block_size, metric=cfg.metric)
    if cfg.overwrite and rank == 0:  # the old run goes now, so nothing of it can be mistaken for the new one
        for f in (CKPT_NAME, "metrics.jsonl", "summary.json"):
            if os.path.exists(os.path.join(cfg.out, f)):
                os.remove(os.path.join(cfg.out, f))

    # TGL steps 1-2 (trace, select) happen once, before training; a resume reuses the scales it saved
    scales = [ck["scales"] if ck else get_scales(cfg, model, tokenizer, device, rank)]
    if world > 1:
        dist.broadcast_object_list(scales, 0)  # every rank trains the same units
    scales = scales[0]
    if cfg.method == "lora":
        # TGL step 3 under LoRA: FP puts adapters only in the selected units; ALR scales the adapters' LR
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, scales and {u for u, s in scales.items() if s > 0})
    groups = make_param_groups(model, scales)
    if not groups:
        raise ValueError("nothing to train: every unit is frozen")
    opt = AdamW(groups, cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    anchors = [p.detach().clone() for p in opt.params] if cfg.method == "recadam" and cfg.recadam_gamma > 0 else None
    run = Run(cfg, rank, world, device, tokenizer, model, opt, None, probes, None, scales, anchors, block_size)
    load_data(run)
    n_train, n_all = sum(p.numel() for p in opt.params), sum(p.numel() for p in model.parameters())
    frozen = [u for u in unit_names(model.config.n_layer) if u not in {g["unit"] for g in groups}]
    run.say(f"{cfg.method}, tgl {cfg.tgl}: training {n_train:,} of {n_all:,} parameters\nunits (lr scale): "
            + " ".join(f"{g['unit']}x{g['lr_scale']:.2f}" for g in groups) + " | frozen: " + (" ".join(frozen) or "-"))
    return run, ck


def restore(run: Run, ck: dict | None):
    """Resume: weights, optimizer, sampler and RNG exactly as saved, so the run continues bit for bit.
    Fresh start: seed the dropout stream. Either way the metrics log is cut back to the checkpoint."""
    if ck:
        run.model.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
        run.stream.load_state_dict(ck["sampler"][run.rank])
        rng = ck["rng"][run.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and run.device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], run.device)
        run.step, run.elapsed, run.last_loss = ck["step"], ck["time"], ck["last_loss"]
        run.say(f"resumed from {os.path.join(run.cfg.out, CKPT_NAME)} at step {run.step}")
    else:
        torch.manual_seed(run.cfg.seed + run.rank)  # dropout stream, independent of how setup used the RNG
        random.seed(run.cfg.seed + run.rank)
    if run.rank == 0:  # the log must agree with the checkpoint: drop lines past it
        path = os.path.join(run.cfg.out, "metrics.jsonl")
        lines = logged_lines(path) if ck and os.path.exists(path) else []
        write_text(path, "".join(line + "\n" for line, rec in lines if rec["step"] <= run.step))
        if hasattr(run.tokenizer, "save"):
            run.tokenizer.save(os.path.join(run.cfg.out, "tokenizer.json"))
    run.dmodel = torch.compile(run.model) if run.cfg.compile else run.model
    if run.world > 1:
        ids = [run.device] if run.device.startswith("cuda") else None
        run.dmodel = torch.nn.parallel.DistributedDataParallel(run.dmodel, device_ids=ids)


def logged_lines(path) -> list:
    """metrics.jsonl as [(line, record)]. A torn last line (killed mid-append) lies past the checkpoint and
    is dropped; a bad line anywhere else is an error that names it."""
    lines, out = read_text(path).splitlines(), []
    for n, line in enumerate(lines, 1):
        try:
            out.append((line, json.loads(line)))
            out[-1][1]["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if n == len(lines):
                return out[:-1] if len(out) == n else out
            raise ValueError(f"{path}:{n}: not a metrics line; move the file away to resume") from None
    return out

# ----------------------------------------------------------------------------- one update


def forward_backward(run: Run):
    """--grad-accum micro-steps into .grad; returns the mean loss (on the device) and the --embed-rows seen
    mask (vocab,) or None."""
    cfg, wte = run.cfg, run.model.transformer.wte.weight
    seen = cfg.embed_rows == "seen" and wte.requires_grad
    mask, total = torch.zeros(wte.shape[0], device=run.device) if seen else None, 0.0
    for micro in range(cfg.grad_accum):
        x, y = (t.to(run.device, non_blocking=True) for t in run.stream.next(run.step))  # (B, T) each
        sync = run.world == 1 or micro == cfg.grad_accum - 1  # DDP: all-reduce on the last micro-step only
        with (nullcontext() if sync else run.dmodel.no_sync()), autocast(run.device):
            _, loss = run.dmodel(x, y)
        (loss / cfg.grad_accum).backward()  # the accumulated gradient is the mean over micro-steps
        total = total + loss.detach() / cfg.grad_accum
        if mask is not None:  # --embed-rows seen: rows of every token in inputs or targets
            mask[x.view(-1)] = 1
            mask[y[y >= 0]] = 1
    return total, mask


def update(run: Run, mask):
    """Clip, then one AdamW step (RecAdam: scaled by lambda(t), then the pull toward theta0)."""
    cfg, opt = run.cfg, run.opt
    if cfg.grad_clip > 0:
        clip_gradients(opt, cfg.grad_clip, cfg.clip_by, len(unit_names(run.model.config.n_layer)))
    if mask is not None:
        if run.world > 1:
            dist.all_reduce(mask, dist.ReduceOp.MAX)  # the same rows on every rank
        # the tied LM head gives every row a gradient; only rows of tokens in the batch are updated
        opt.rows = {id(run.model.transformer.wte.weight): mask.nonzero().squeeze(1)}
    t0 = cfg.steps / 4 if cfg.recadam_t0 is None else cfg.recadam_t0
    lam = recadam_lambda(run.step, cfg.recadam_k, t0) if run.anchors else 1.0
    opt.step(update_scale=lam)
    if run.anchors:
        recadam_pull(opt, run.anchors, cfg.recadam_gamma, lam)
    opt.zero_grad()

# ----------------------------------------------------------------------------- evaluate, log, checkpoint


def evaluate(run: Run) -> dict:
    """{"probes": {split: {ppl, em, n}}, "val_ppl": held-out perplexity}, each where asked for. probe.py
    scores, so a run and probe.py agree on every number."""
    out = {}
    with autocast(run.device):
        if run.probes:
            out["probes"] = probe.evaluate(run.model, run.tokenizer, run.probes, device=run.device, metric=run.cfg.metric)
        if run.val_tokens is not None:
            out["val_ppl"] = probe.text_ppl(run.model, run.val_tokens, run.cfg.val_tokens, device=run.device)
    shown = [f"{s} ppl {r['ppl']:.2f} em {r['em']:.2f}" for s, r in sorted(out.get("probes", {}).items())]
    shown += [f"val ppl {out['val_ppl']:.2f}"] if "val_ppl" in out else []
    run.say(f"eval step {run.step}: " + " | ".join(shown))
    return out


def stop(run: Run, why: str):
    path = os.path.join(run.cfg.out, CKPT_NAME)
    last = f"step {load_checkpoint(path)['step']}" if os.path.exists(path) else "none"
    fail(f"{why} at step {run.step}; stopped (last good checkpoint: {last})", prog="train.py", code=3)


def checkpoint(run: Run, now: float):
    """Everything needed to continue bit for bit, written atomically by rank 0."""
    with torch.no_grad():
        if not all(torch.isfinite(p).all() for p in run.opt.params):
            stop(run, "weights are not finite")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state(run.device) if run.device.startswith("cuda") else None}
    run.elapsed = now
    state = dict(config=asdict(run.model.config), model=run.model.state_dict(), lora=getattr(run.model, "lora", None),
                 step=run.step, optimizer=run.opt.state_dict(), sampler=gathered(run.stream.state_dict(), run.world),
                 rng=gathered(rng, run.world), train_config=run.cfg.run_defining(), scales=run.scales,
                 world_size=run.world, time=now, last_loss=run.last_loss)
    if run.rank == 0:
        save_checkpoint(os.path.join(run.cfg.out, CKPT_NAME), state)

# ----------------------------------------------------------------------------- the loop


def train(run: Run):
    """From run.step to --steps updates, in labelled blocks."""
    cfg, opt = run.cfg, run.opt
    loss_sum, n_sum, t_start, elapsed0 = 0.0, 0, time.time(), run.elapsed
    t_log = t_start
    run.model.train()
    while run.step < cfg.steps:
        # determine the learning rate: the schedule times each unit's TGL scale (ALR; 1 otherwise)
        lr = lr_at(run.step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]

        # forward, backward, update
        loss, mask = forward_backward(run)
        run.step += 1
        logging = run.step % cfg.log_every == 0 or run.step == cfg.steps
        if logging:  # per-unit norms of this update's gradient before clipping (the paper's Figure 1)
            grad_norms = tgl_trace.grad_norms(run.model)  # after DDP's all-reduce: the same on every rank
        update(run, mask)
        loss_sum, n_sum = loss_sum + loss, n_sum + 1

        # once in a while: evaluate, log, checkpoint
        done, now = run.step == cfg.steps, time.time()
        do_eval = (run.probes or run.val_tokens is not None) and (done or cfg.eval_every and run.step % cfg.eval_every == 0)
        do_save = done or (cfg.save_every and run.step % cfg.save_every == 0)
        if logging or do_save:  # the mean loss since the last log line: the only place the loop waits for the device
            if run.world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= run.world
            run.last_loss = loss_sum.item() / n_sum
            if not math.isfinite(run.last_loss):
                stop(run, f"loss is {run.last_loss}")
        if do_eval:
            run.evals = evaluate(run) if run.rank == 0 else None
        if logging:
            tok_s = cfg.batch_size * run.block_size * cfg.grad_accum * n_sum / (now - t_log)
            rec = dict(step=run.step, loss=run.last_loss, lr=lr, tok_per_s=tok_s, grad_norms=grad_norms,
                       time=elapsed0 + now - t_start, **(run.evals or {} if do_eval else {}))
            run.say(f"step {run.step}/{cfg.steps} | loss {run.last_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                    f"{rec['time']:.1f}s")
            if run.rank == 0:
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            loss_sum, n_sum, t_log = 0.0, 0, time.time()
        if do_save:
            checkpoint(run, elapsed0 + now - t_start)


def finish(run: Run) -> dict:
    """summary.json: what trained, the final loss and scores. A resumed finished run (nothing left to train)
    reads its time back from the checkpoint, so its summary comes out exactly as the first time."""
    cfg = run.cfg
    if (run.probes or run.val_tokens is not None) and run.evals is None and run.rank == 0:
        run.evals = evaluate(run)
    summary = dict(out=cfg.out, method=cfg.method, tgl=cfg.tgl, steps=run.step, final_loss=run.last_loss,
                   probes=(run.evals or {}).get("probes"), scales=run.scales,
                   trainable_params=sum(p.numel() for p in run.opt.params), time=run.elapsed)
    if cfg.val_data:
        summary["val_ppl"] = (run.evals or {}).get("val_ppl")
    if run.probes:
        summary["metric"] = cfg.metric
    if run.rank == 0:
        write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=1))
    if run.world > 1:
        dist.destroy_process_group()
    return summary


def get_config(argv=None) -> Config:
    parser = Parser(prog="train.py", description=__doc__.split("\n")[0])
    add_flags(parser, Config)
    return from_args(Config, parser.parse_args(argv))


def main(argv=None):
    cfg = get_config(argv)
    with input_errors("train.py"):  # the one error path: bad input is one line, bugs keep their traceback
        run, ck = setup(cfg.check())
        restore(run, ck)
        train(run)
        return finish(run)


if __name__ == "__main__":
    main()
