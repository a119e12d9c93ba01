"""Pretraining from scratch and continual pretraining, with Traced Gradient Layers on top.

    python train.py --init scratch --data world/t0.txt --tokenizer word --out runs/base
    python train.py --init runs/base --data world/diff.txt --method recadam --tgl fp \\
        --trace trace.json --probes world/probes/*.jsonl --out runs/recadam_fp
    torchrun --nproc_per_node 4 train.py ...            # DDP: --batch-size is the global batch

One file: a hand-written AdamW with one parameter group per unit (model.unit_of), the continual-learning
methods (full, mixreview, recadam, lora), TGL's freeze mask (fp) or per-unit LR scales (alr),
atomic checkpoints with exact resume, and DistributedDataParallel.
"""
import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.distributed as dist

import data
import probe
import trace as tgl_trace  # the project's trace.py (the repo root comes first on sys.path)
from common import Parser, check_output, fail as cli_fail, input_errors, read_text, write_text
from experiments.tools import check_number  # temporary
from model import (CKPT_NAME, GPT, GPTConfig, add_lora, autocast, load_checkpoint, load_model, pick_device,
                   save_checkpoint, unit_names, unit_of)


# ----------------------------------------------------------------------------- optimizer

class AdamW:
    """AdamW (Loshchilov & Hutter 2019), written out. For each parameter, at update t:

        theta <- theta * (1 - lr * wd)                      decoupled weight decay, matrices only
        m     <- b1 * m + (1 - b1) * g                      first moment
        v     <- b2 * v + (1 - b2) * g^2                    second moment
        theta <- theta - s * lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    s is `update_scale` (1, or RecAdam's lambda(t)). The operations and their order are those of
    torch.optim.AdamW, so the two agree to float rounding. Each group is one unit: {"unit", "params",
    "lr_scale"}; the schedule sets group["lr"] = base_lr(step) * lr_scale, which is how TGL+ALR's
    per-unit scales reach the update. Frozen units (TGL+FP) are never given to the optimizer, so
    they hold no state and cost no update. All groups are updated with a handful of fused
    torch._foreach_* calls (per-parameter lr lists), not a Python loop over tensors.
    `rows[id(p)] = LongTensor`: update only those rows of p (weights and moments) this step.
    """

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.param_groups = [dict(g, lr=lr * g["lr_scale"]) for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.beta1, self.beta2, self.eps, self.weight_decay = betas[0], betas[1], eps, weight_decay
        self.t = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]     # m, per parameter
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]  # v, per parameter
        self.rows = {}

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _update(self, params, grads, exp_avg, exp_avg_sq, lrs, update_scale):
        """The update rule, once, on lists of tensors (the docstring's four lines, in that order)."""
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
            self._update([self.params[i] for i in dense], [self.params[i].grad for i in dense],
                         [self.exp_avg[i] for i in dense], [self.exp_avg_sq[i] for i in dense],
                         [lrs[i] for i in dense], update_scale)
        for i, p in enumerate(self.params):  # row-sparse (--embed-rows seen): the same rule on copies of the rows
            rows = self.rows.get(id(p))
            if rows is None or p.grad is None:
                continue
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

    def state_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.exp_avg + self.exp_avg_sq)


def make_param_groups(model, scales=None):
    """One group per unit that trains, in network order: {"unit", "params", "lr_scale"}.
    `scales` is tgl_plan's {unit: scale}; missing units (or no TGL) train at 1.0. Parameters already
    frozen (LoRA base weights) stay out."""
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


# ----------------------------------------------------------------------------- continual-learning methods

def recadam_lambda(t, k, t0):
    """RecAdam (Chen et al. 2020) balances the new-task loss against a quadratic penalty that recalls
    the pretrained weights; lambda(t) anneals from ~0 (mostly recall) to 1 (all new data), so early
    updates, when the gradients of the new text are least informed, move the model least.
    RecAdam's annealing coefficient lambda(t) = 1 / (1 + exp(-k (t - t0))), overflow-safe."""
    x = k * (t - t0)
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@torch.no_grad()
def recadam_pull(opt, anchors, gamma, lam):
    """RecAdam's decoupled quadratic pull: theta <- theta - lr * gamma * (1 - lambda) * (theta - theta0),
    the step of (1 - lambda) * gamma/2 * ||theta - theta0||^2 applied outside Adam's moments (the
    Adam part is scaled by lambda in AdamW.step). The factor is capped at 1: never past theta0."""
    # per parameter, the unit's own lr: under TGL+ALR a slow unit is also pulled back slowly, so the pull
    # never dominates a unit that TGL asked to move little
    coefs = [-min(1.0, g["lr"] * gamma * (1 - lam)) for g in opt.param_groups for _ in g["params"]]
    diff = torch._foreach_sub(opt.params, anchors)
    torch._foreach_mul_(diff, coefs)
    torch._foreach_add_(opt.params, diff)


# ----------------------------------------------------------------------------- schedule

def lr_at(step, args):
    """Base learning rate for update `step` (0-based): linear warmup, then cosine/linear/no decay."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.decay == "none":
        return args.lr
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    coef = 0.5 * (1 + math.cos(math.pi * frac)) if args.decay == "cosine" else 1 - frac
    return args.min_lr + coef * (args.lr - args.min_lr)


class Stream:
    """Mix-Review (He et al. 2021): forgetting is fought by replaying old pretraining text inside the
    new batches, so the model keeps seeing the old distribution while it learns the new one.
    Each step's batch (B rows of T tokens): windows of --data, with the last
    round(B * ratio(step)) rows taken from --replay-data for mixreview, where
    ratio(step) = replay_ratio * replay_decay ** (step / steps) (Mix-Review's decaying mix).
    Both Batchers draw every step, so the sampler state depends only on the step (exact resume)."""

    def __init__(self, tokens, replay, args, rank=0, world=1):
        self.b, self.args = args.batch_size // world, args
        self.new = data.Batcher(tokens, args.block_size, self.b, args.seed, rank, world)
        self.old = None if replay is None else data.Batcher(replay, args.block_size, self.b, args.seed + 1, rank, world)

    def n_replay(self, step):
        a = self.args
        return 0 if self.old is None else round(self.b * a.replay_ratio * a.replay_decay ** (step / a.steps))

    def next(self, step):
        # both samplers draw every step, even when no replay row is kept, so the data a step sees depends
        # only on the step number: that is what makes resume exact
        x, y = self.new.next()  # (b, T) each
        if self.old is not None:
            xr, yr = self.old.next()
            n = self.n_replay(step)
            x, y = torch.cat([x[:self.b - n], xr[:n]]), torch.cat([y[:self.b - n], yr[:n]])
        return x, y

    def state_dict(self):
        return {"new": self.new.state_dict(), "old": self.old and self.old.state_dict()}

    def load_state_dict(self, d):
        self.new.load_state_dict(d["new"])
        self.old and self.old.load_state_dict(d["old"])


# ----------------------------------------------------------------------------- CLI

fail = partial(cli_fail, prog="train.py")  # bad input: one line, exit 2, no traceback


def get_args(argv=None):
    p = Parser(prog="train.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--init", default="scratch", help="scratch | known model name | local HF folder | run folder / ckpt.pt")
    a("--out", default="runs/train", help="run folder: ckpt.pt, metrics.jsonl, summary.json")
    a("--data", required=True, help="training text (file or folder)")
    a("--tokenizer", choices=["gpt2", "word"], help="default: the init's tokenizer (scratch: gpt2)")
    a("--tokenizer-file", help="word vocab (tokenizer.json); default: tokenizer.json next to --data")
    a("--n-layer", type=int, default=4, help="scratch: layers")
    a("--n-head", type=int, default=4, help="scratch: attention heads")
    a("--n-embd", type=int, default=128, help="scratch: width")
    a("--block-size", type=int, help="tokens per window (default: scratch 128, else the model's context)")
    a("--dropout", type=float, help="dropout (default: scratch 0, else the model's)")
    a("--method", choices=["full", "mixreview", "recadam", "lora"], default="full", help="continual-learning method")
    a("--replay-data", help="mixreview: old pretraining text replayed into each batch")
    a("--replay-ratio", type=float, default=0.25, help="mixreview: share of each batch that is replay at step 0")
    # Mix-Review (He et al. 2021) shrinks the mixed-in pretraining data geometrically as training goes on
    # (its "mix-decay"): the model is held near the old distribution early and let go later. The published
    # decay is tuned per task, so the default here is a choice, not their value: a quarter of the starting
    # share is left at the end. --replay-decay 1 keeps the constant mix (plain replay) for the ablation.
    a("--replay-decay", type=float, default=0.25, help="mixreview: share left at the end, as a fraction of the start (1 = constant)")
    a("--recadam-gamma", type=float, default=100.0, help="recadam: strength of the pull toward the start weights (0 = AdamW)")
    a("--recadam-k", type=float, default=0.05, help="recadam: slope of lambda(t) = 1/(1+exp(-k (t - t0)))")
    a("--recadam-t0", type=float, help="recadam: midpoint of the annealing (default: steps / 4)")
    a("--lora-rank", type=int, default=8, help="lora: adapter rank")
    a("--lora-alpha", type=float, default=16.0, help="lora: adapter scale alpha (output scaled by alpha/rank)")
    a("--tgl", choices=["none", "fp", "alr"], default="none", help="TGL: fp freezes unselected units, alr scales each unit's LR")
    a("--trace", help="trace.json from trace.py")
    a("--trace-probes", nargs="+", help="diagnostic probe files: trace at start instead of --trace")
    a("--trace-text", help="old pretraining text for the LM norm when tracing at start")
    a("--trace-n-span", type=int, help="tracing at start: probes used (default: trace.py's)")
    a("--trace-n-lm", type=int, help="tracing at start: LM windows used (default: trace.py's)")
    tgl_trace.add_selection_args(p)  # --select, --rank-units, --alr-norm, --floor, --trace-split, --control
    a("--embed-rows", choices=["all", "seen"], default="all",
      help="seen: update only the embedding rows of tokens in the batch (weights and Adam moments)")
    a("--steps", type=int, default=500, help="optimizer updates")
    a("--batch-size", type=int, default=16, help="global batch (windows per micro-step, over all processes)")
    a("--grad-accum", type=int, default=1, help="micro-steps per update (gradients averaged)")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    a("--warmup", type=int, default=0, help="linear warmup updates")
    a("--decay", choices=["cosine", "linear", "none"], default="cosine", help="learning-rate decay after warmup")
    a("--weight-decay", type=float, default=0.0, help="decoupled weight decay (matrices only)")
    a("--beta1", type=float, default=0.9, help="Adam beta1")
    a("--beta2", type=float, default=0.99, help="Adam beta2")
    a("--grad-clip", type=float, default=1.0, help="gradient clipping threshold (0 = off); see --clip-by")
    a("--clip-by", choices=["unit", "global"], default="unit",
      help="unit: clip each unit's gradient to grad_clip/sqrt(units of the model), the same rule whichever units "
           "train; global: one norm over the trained parameters (an FP run is then clipped less than a full one)")
    a("--seed", type=int, default=0, help="seed for init, data order and dropout")
    a("--probes", nargs="+", default=[], help="probe files scored every --eval-every steps and at the end")
    a("--eval-every", type=int, default=0, help="score probes (and --val-data) every N updates (0 = only at the end)")
    a("--val-data", help="held-out text whose perplexity is scored with the probes (file, folder or CSV; PATH@N: a prefix)")
    a("--val-tokens", type=int, default=65536, help="--val-data: tokens scored, as consecutive context-length windows")
    a("--metric", choices=probe.METRICS, default="span", help="probe perplexity of the answer span (the paper's) or "
      "of the whole sentence (TemporalWiki's scorer)")
    a("--log-every", type=int, default=10, help="progress line, metrics line and NaN check every N updates")
    a("--save-every", type=int, default=0, help="checkpoint every N updates (0 = only at the end)")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
    a("--device", default="auto", help="auto | cpu | cuda | mps")
    a("--compile", action="store_true", help="torch.compile the model (CUDA)")
    a("--threads", type=int, help="CPU threads (default: torch's, shared among local processes)")
    a("--overwrite", action="store_true", help="replace an existing run in --out (without it, a finished or "
      "partial run there is refused: use --resume to continue it)")
    args = p.parse_args(argv)
    with input_errors("train.py"):
        check_args(args)
    args.run_flags = run_flags(args)  # as given, before defaults are filled in: what --resume compares
    args.recadam_t0 = args.steps / 4 if args.recadam_t0 is None else args.recadam_t0
    return args


def check_args(args):
    """Every flag and path checked before any slow work: a ValueError names the flag and what to do."""
    paths = [data.parse_text_spec(f)[0] for f in (args.data, args.replay_data, args.trace_text, args.val_data) if f]
    paths += [f for f in (args.trace, args.tokenizer_file) if f]
    paths += [data.parse_probe_spec(f)[0] for f in args.probes + (args.trace_probes or [])]  # FILE@DATES:SPLIT
    for f in paths:
        if not os.path.exists(f):
            raise ValueError(f"no such file: {f}")
    needs = [(f"--tgl {args.tgl} needs --trace FILE or --trace-probes FILE... --trace-text OLD",
              args.tgl != "none" and not (args.trace or args.trace_probes)),
             ("--trace-probes needs --trace-text (old text for the LM gradient norm)", args.trace_probes and not args.trace_text),
             ("--method mixreview needs --replay-data", args.method == "mixreview" and not args.replay_data)]
    for msg, bad in needs:
        if bad:
            raise ValueError(msg)
    for flag in ("steps", "batch_size", "grad_accum", "log_every", "n_layer", "n_head", "n_embd", "lora_rank",
                 "block_size", "threads", "trace_n_span", "trace_n_lm", "val_tokens"):
        check_number("--" + flag.replace("_", "-"), getattr(args, flag), low=1, integer=True)
    for flag in ("eval_every", "save_every", "warmup", "min_lr", "weight_decay", "grad_clip", "recadam_gamma", "replay_decay"):
        check_number("--" + flag.replace("_", "-"), getattr(args, flag), low=0)
    check_number("--lr", args.lr, low=0, low_open=True)
    check_number("--lora-alpha", args.lora_alpha, low=0, low_open=True)
    check_number("--replay-ratio", args.replay_ratio, low=0, high=1)
    check_number("--recadam-k", args.recadam_k)
    check_number("--recadam-t0", args.recadam_t0)
    for flag, value in (("--beta1", args.beta1), ("--beta2", args.beta2), ("--dropout", args.dropout)):
        check_number(flag, value, low=0, high=1, high_open=True)  # beta = 1 divides by 1 - beta^t = 0
    if args.init == "scratch" and args.n_embd % args.n_head:
        raise ValueError(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    args.selection = tgl_trace.selection_from_args(args)
    pick_device(args.device)  # --device cuda without CUDA fails here, not at the first tensor
    check_output(args.out, "--out", "dir")
    first_rank = int(os.environ.get("RANK", 0)) == 0  # under torchrun, rank 0 may already be writing --out
    if first_rank and not args.resume and not args.overwrite and any(
            os.path.exists(os.path.join(args.out, f)) for f in (CKPT_NAME, "metrics.jsonl", "summary.json")):
        raise ValueError(f"--out {args.out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")


# The flags that define what a run computes. --resume refuses to change any of them; the others (device,
# threads, log / eval / save cadence, probes scored and a larger --steps) may change on resume.
RUN_FLAGS = ("init", "data", "replay_data", "tokenizer", "tokenizer_file", "n_layer", "n_head", "n_embd", "block_size",
             "dropout", "method", "replay_ratio", "replay_decay", "recadam_gamma", "recadam_k", "recadam_t0",
             "lora_rank", "lora_alpha", "tgl", "trace", "trace_probes", "trace_text", "trace_n_span", "trace_n_lm",
             "select", "rank_units", "alr_norm", "floor", "trace_split", "control", "embed_rows", "batch_size",
             "grad_accum", "lr", "min_lr", "warmup", "decay", "weight_decay", "beta1", "beta2", "grad_clip", "clip_by", "seed")


def run_flags(args) -> dict:
    return {k: getattr(args, k) for k in RUN_FLAGS}


def check_resume(args, ck: dict, path: str):
    """--resume continues the run the checkpoint describes, or refuses in one line listing what differs."""
    saved = ck.get("run_flags")
    if saved is None:
        raise ValueError(f"{path}: written by an older tgl without its run flags; re-run with --overwrite")
    now = args.run_flags  # the flags as given, recorded by get_args before defaults were filled in
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in RUN_FLAGS if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"--resume: {path} was trained with other flags ({'; '.join(diff)}); "
                         "resume with the same flags, or start a new run with --overwrite or another --out")
    if args.steps < ck["step"]:
        raise ValueError(f"--steps {args.steps} is below the checkpoint's step {ck['step']}; --steps can only grow on resume")


# ----------------------------------------------------------------------------- setup

def get_tokenizer(args):
    """--tokenizer-file; else word: tokenizer.json of the init run or next to --data; else gpt2 / the init's."""
    if args.tokenizer == "word" or args.tokenizer_file:
        data_dir = args.data if os.path.isdir(args.data) else os.path.dirname(args.data) or "."
        near = [os.path.join(d, "tokenizer.json") for d in ([args.init] if os.path.isdir(args.init) else []) + [data_dir]]
        path = args.tokenizer_file or next((p for p in near if os.path.isfile(p)), None)
        if path is None:
            fail(f"--tokenizer word: no tokenizer.json in {' or '.join(near)}; pass --tokenizer-file")
        return data.load_tokenizer(path)
    return data.load_tokenizer("gpt2" if args.tokenizer == "gpt2" or args.init == "scratch" else args.init)


def build_model(args, n_vocab, device):
    """The starting model (also theta0 for RecAdam): fresh from --seed, or loaded with load_model."""
    if args.init == "scratch":
        torch.manual_seed(args.seed)
        cfg = GPTConfig(block_size=args.block_size or 128, vocab_size=n_vocab, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout or 0.0)
        return GPT(cfg).to(device)
    try:
        model = load_model(args.init, device)
    except (OSError, ValueError, KeyError) as e:
        fail(f"--init {args.init}: {e}")
    if args.dropout is not None:  # dropout lives in modules, not in the weights
        model.config.dropout = args.dropout
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = args.dropout
            elif hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = args.dropout
    return model


def get_scales(args, model, tokenizer, device, rank):
    """TGL steps 1-2: {unit: lr scale} (0 = frozen) from --trace, or traced now; None without TGL."""
    if args.tgl == "none":
        return None
    try:
        if args.trace:
            trace = tgl_trace.load_trace(args.trace)
        else:
            opts = tgl_trace.TraceOptions(seed=args.seed, selection=args.selection)
            opts.n_span, opts.n_lm = args.trace_n_span or opts.n_span, args.trace_n_lm or opts.n_lm
            trace = tgl_trace.trace_files(model, tokenizer, args.trace_probes, args.trace_text, opts, device)
            if rank == 0:
                tgl_trace.save_trace(os.path.join(args.out, "trace.json"), trace)
        return tgl_trace.tgl_plan(trace, args.tgl, args.selection, unit_names(model.config.n_layer))
    except ValueError as e:
        source = args.trace or os.path.join(args.out, "trace.json")
        fail(str(e) if str(e).startswith(source) else f"{source}: {e}")


def setup_ddp(args):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU). -> rank, world, device."""
    device = pick_device(args.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    elif not args.threads:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    return rank, world, device


def gathered(obj, world):
    """obj from every rank (list by rank); plain list on one process."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything the training loop reads and writes, built by setup() and restore(). One object
    instead of closures over main's locals, so each step of the loop is a plain function."""
    args: argparse.Namespace
    rank: int
    world: int
    device: str
    tokenizer: object
    model: GPT                      # the GPT itself: checkpoints, hooks and evaluation use it
    opt: AdamW
    stream: Stream
    probes: list
    scales: dict | None             # tgl_plan's {unit: lr scale}, None without TGL
    anchors: list | None            # RecAdam's theta0, one tensor per trained parameter
    ckpt_path: str
    metrics_path: str
    dmodel: torch.nn.Module = None  # what the forward pass calls: the GPT, compiled and/or DDP-wrapped
    step: int = 0                   # optimizer updates done
    elapsed: float = 0.0            # training seconds before this process (resume)
    t_start: float = 0.0
    t_log: float = 0.0
    loss_sum: torch.Tensor = None   # sum of micro-step losses since the last log line, on the device
    n_sum: int = 0                  # updates in loss_sum
    steps_now: int = 0              # updates done by this process (0: a finished run was resumed)
    saved_time: float = 0.0         # training seconds at the last checkpoint
    last_loss: float | None = None
    val_tokens: object = None       # --val-data as a token array
    evals: dict | None = None       # the latest evaluate(): probes and val_ppl

    @property
    def master(self):
        return self.rank == 0

    def say(self, *a):
        if self.master:
            print(*a, flush=True)


def setup(args) -> tuple[Run, dict | None]:
    """Devices, the model, TGL's scales, the method's optimizer and data: identical on a fresh start
    and a resume (restore() then loads the state). Returns the run and the checkpoint to resume, if any."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_ddp(args)
    torch.manual_seed(args.seed)  # whatever is random before training (LoRA's A init) follows --seed too
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, CKPT_NAME)
    ck = load_checkpoint(ckpt_path) if args.resume and os.path.isfile(ckpt_path) else None
    if ck:  # read once, here: the flags are compared before the model is built
        check_resume(args, ck, ckpt_path)
    if ck and ck["world_size"] != world:
        fail(f"{ckpt_path} was written by {ck['world_size']} processes; resume with as many")
    if args.overwrite and rank == 0:  # the old run goes now, so nothing of it can be mistaken for the new one
        for f in (CKPT_NAME, "metrics.jsonl", "summary.json"):
            if os.path.exists(os.path.join(args.out, f)):
                os.remove(os.path.join(args.out, f))

    tokenizer = get_tokenizer(args)
    model = build_model(args, tokenizer.n_vocab, device)
    cfg = model.config
    args.block_size = args.block_size or cfg.block_size
    if args.block_size > cfg.block_size or tokenizer.n_vocab > cfg.vocab_size:
        fail(f"block size {args.block_size} / vocab {tokenizer.n_vocab} exceed the model's {cfg.block_size} / {cfg.vocab_size}")
    # every probe file is read and length-checked now, with probe.py's rule: before tracing and training,
    # not at the first evaluation
    probes = data.read_probe_files(args.probes)  # same-named splits of two files never merge
    probe.check_probes(tokenizer, probes, cfg.block_size, metric=args.metric)

    # TGL steps 1-2 (trace, select) happen once, before training; a resume reuses the scales it saved
    scales = [ck["scales"] if ck else get_scales(args, model, tokenizer, device, rank)]
    if world > 1:
        dist.broadcast_object_list(scales, 0)  # every rank trains the same units
    scales = scales[0]
    if args.method == "lora":
        # TGL step 3 under LoRA: FP puts adapters only in the selected units; ALR scales the adapters' LR
        add_lora(model, args.lora_rank, args.lora_alpha, scales and {u for u, s in scales.items() if s > 0})
    groups = make_param_groups(model, scales)
    if not groups:
        fail("nothing to train: every unit is frozen")
    opt = AdamW(groups, args.lr, (args.beta1, args.beta2), weight_decay=args.weight_decay)
    anchors = [p.detach().clone() for p in opt.params] if args.method == "recadam" and args.recadam_gamma > 0 else None

    if rank > 0:  # rank 0 tokenizes first (load_tokens caches), the others then read the cache
        dist.barrier()
    tokens = data.load_tokens(args.data, tokenizer)
    replay = data.load_tokens(args.replay_data, tokenizer) if args.method == "mixreview" else None
    if rank == 0 and world > 1:
        dist.barrier()
    stream = Stream(tokens, replay, args, rank, world)
    val_tokens = data.load_tokens(args.val_data, tokenizer) if args.val_data else None
    run = Run(args=args, rank=rank, world=world, device=device, tokenizer=tokenizer, model=model, opt=opt,
              stream=stream, probes=probes, val_tokens=val_tokens, scales=scales, anchors=anchors, ckpt_path=ckpt_path,
              metrics_path=os.path.join(args.out, "metrics.jsonl"))
    describe(run)
    return run, ck


def describe(run: Run):
    """What trains: parameter counts, optimizer memory, and each unit's LR scale or frozen."""
    groups, n_layer = run.opt.param_groups, run.model.config.n_layer
    n_train, n_all = sum(p.numel() for p in run.opt.params), sum(p.numel() for p in run.model.parameters())
    run.say(f"{run.args.method}, tgl {run.args.tgl}: training {n_train:,} of {n_all:,} "
            f"parameters; optimizer state {run.opt.state_bytes() / 2**20:.1f} MiB")
    trained = [g["unit"] for g in groups]
    frozen = [u for u in unit_names(n_layer) if u not in trained]
    run.say("units (lr scale): " + " ".join(f"{g['unit']}x{g['lr_scale']:.2f}" for g in groups)
            + " | frozen: " + (" ".join(frozen) or "-"))


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
        run.step, run.elapsed, run.last_loss = ck["step"], ck["time"], ck.get("last_loss")
        run.say(f"resumed from {run.ckpt_path} at step {run.step}")
    else:
        torch.manual_seed(run.args.seed + run.rank)  # dropout stream, independent of how setup used the RNG
        random.seed(run.args.seed + run.rank)
    if run.master:  # the log must agree with the checkpoint: drop lines past it
        lines = logged_lines(run.metrics_path) if ck and os.path.exists(run.metrics_path) else []
        write_text(run.metrics_path, "".join(line + "\n" for line, rec in lines if rec["step"] <= run.step))
        if hasattr(run.tokenizer, "save"):
            run.tokenizer.save(os.path.join(run.args.out, "tokenizer.json"))
    run.dmodel = torch.compile(run.model) if run.args.compile else run.model
    if run.world > 1:
        ids = [run.device] if run.device.startswith("cuda") else None
        run.dmodel = torch.nn.parallel.DistributedDataParallel(run.dmodel, device_ids=ids)


def logged_lines(path) -> list:
    """metrics.jsonl as [(line, record)]. A torn last line (killed mid-append) lies past the checkpoint
    and is dropped; a bad line anywhere else is an error that names it."""
    lines = read_text(path).splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            out.append((line, rec))
            rec["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a metrics line; move the file away to resume") from None
    return out


# ----------------------------------------------------------------------------- one update

def forward_backward(run: Run, hooks, logging: bool):
    """--grad-accum micro-steps into .grad. Returns the --embed-rows seen mask (vocab,) or None."""
    args, model = run.args, run.model
    wte = model.transformer.wte.weight
    mask = torch.zeros(model.config.vocab_size, device=run.device) if args.embed_rows == "seen" and wte.requires_grad else None
    for micro in range(args.grad_accum):
        last_micro = micro == args.grad_accum - 1
        # the hooks read .grad once it holds the whole accumulated gradient: at the last micro-step
        hooks.enabled = logging and run.world == 1 and last_micro
        x, y = (t.to(run.device, non_blocking=True) for t in run.stream.next(run.step))  # (B, T) each
        sync = run.world == 1 or last_micro  # DDP: all-reduce on the last micro-step only
        with (nullcontext() if sync else run.dmodel.no_sync()), autocast(run.device):
            _, loss = run.dmodel(x, y)
        (loss / args.grad_accum).backward()  # accumulated gradient = mean over micro-steps
        run.loss_sum += loss.detach() / args.grad_accum
        if mask is not None:  # --embed-rows seen: rows of every token in inputs or targets
            mask[x.view(-1)] = 1
            mask[y[y >= 0]] = 1
    return mask


def clip_gradients(opt, max_norm, by, n_units):
    """Gradient clipping that treats every arm alike (issue 12). A global norm over the *trained*
    parameters is smaller when TGL+FP freezes units, so FP runs would be clipped less than full runs.
    Per unit, each unit's gradient is clipped to max_norm / sqrt(n_units) (n_units: all units of the
    model, trained or not): a unit's update never depends on which other units train, and a model whose
    units all sit at the threshold has global norm max_norm, the scale of the global rule."""
    if by == "global":
        torch.nn.utils.clip_grad_norm_(opt.params, max_norm, foreach=True)
        return
    for g in opt.param_groups:
        torch.nn.utils.clip_grad_norm_(g["params"], max_norm / math.sqrt(n_units), foreach=True)


def update(run: Run, mask):
    """Clip, then one AdamW step (RecAdam: scaled by lambda(t), then the pull toward theta0)."""
    args, opt = run.args, run.opt
    if args.grad_clip > 0:
        clip_gradients(opt, args.grad_clip, args.clip_by, len(unit_names(run.model.config.n_layer)))
    if mask is not None:
        if run.world > 1:
            dist.all_reduce(mask, dist.ReduceOp.MAX)  # the same rows on every rank
        # the tied LM head gives every row a gradient; only rows of tokens in the batch are updated
        opt.rows = {id(run.model.transformer.wte.weight): mask.nonzero().squeeze(1)}
    lam = recadam_lambda(run.step, args.recadam_k, args.recadam_t0) if run.anchors else 1.0
    opt.step(update_scale=lam)
    if run.anchors:
        recadam_pull(opt, run.anchors, args.recadam_gamma, lam)
    opt.zero_grad()


# ----------------------------------------------------------------------------- evaluate, log, checkpoint

def evaluate(run: Run) -> dict:
    """{"probes": {split: {ppl, em, n}}, "val_ppl": held-out text perplexity}, each where asked for.
    probe.py does the scoring (eval mode, no grad), so a run and probe.py agree on every number."""
    out = {}
    with autocast(run.device):
        if run.probes:
            out["probes"] = probe.evaluate(run.model, run.tokenizer, run.probes, device=run.device, metric=run.args.metric)
        if run.val_tokens is not None:
            out["val_ppl"] = probe.text_ppl(run.model, run.val_tokens, run.args.val_tokens, device=run.device)
    shown = [f"{s} ppl {r['ppl']:.2f} em {r['em']:.2f}" for s, r in sorted(out.get("probes", {}).items())]
    run.say(f"eval step {run.step}: " + " | ".join(shown + ([f"val ppl {out['val_ppl']:.2f}"] if "val_ppl" in out else [])))
    return out


def mean_loss(run: Run) -> float:
    """The mean loss since the last log line: the only place the loop waits for the device."""
    if run.world > 1:
        dist.all_reduce(run.loss_sum)
        run.loss_sum /= run.world
    loss = run.loss_sum.item() / run.n_sum
    if not math.isfinite(loss):
        stop(run, f"loss is {loss}")
    return loss


def log_line(run: Run, lr: float, grad_norms: dict, evals: dict | None):
    """Progress on stdout, one JSON line in metrics.jsonl; then the loss average starts again."""
    args, now = run.args, time.time()
    tok_s = args.batch_size * args.block_size * args.grad_accum * run.n_sum / (now - run.t_log)
    run.say(f"step {run.step}/{args.steps} | loss {run.last_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
            f"{run.elapsed + now - run.t_start:.1f}s")
    rec = dict(step=run.step, loss=run.last_loss, lr=lr, tok_per_s=tok_s, grad_norms=grad_norms,
               time=run.elapsed + now - run.t_start)
    rec.update(evals or {})  # probes, val_ppl: on the lines where they were evaluated
    if run.master:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    run.loss_sum.zero_()
    run.n_sum, run.t_log = 0, time.time()


def checkpoint(run: Run):
    """Everything needed to continue bit for bit, written atomically by rank 0."""
    with torch.no_grad():
        if not all(torch.isfinite(p).all() for p in run.opt.params):
            stop(run, "weights are not finite")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state(run.device) if run.device.startswith("cuda") else None}
    state = dict(config=asdict(run.model.config), model=run.model.state_dict(), lora=getattr(run.model, "lora", None),
                 step=run.step, optimizer=run.opt.state_dict(), sampler=gathered(run.stream.state_dict(), run.world),
                 rng=gathered(rng, run.world), args=vars(run.args), tokenizer="word" if hasattr(run.tokenizer, "save") else "gpt2",
                 scales=run.scales, world_size=run.world, time=run.elapsed + time.time() - run.t_start,
                 run_flags=run.args.run_flags, last_loss=run.last_loss)
    state["args"] = {k: v for k, v in state["args"].items() if k != "selection"} | {"selection": asdict(run.args.selection)}
    if run.master:
        save_checkpoint(run.ckpt_path, state)
    run.saved_time = state["time"]


def stop(run: Run, why: str):
    last = f"step {load_checkpoint(run.ckpt_path)['step']}" if os.path.exists(run.ckpt_path) else "none"
    fail(f"{why} at step {run.step}; stopped (last good checkpoint: {last})", code=3)


# ----------------------------------------------------------------------------- the loop

def train(run: Run, hooks):
    """The training loop: from run.step to --steps updates."""
    args, opt = run.args, run.opt
    run.loss_sum, run.n_sum = torch.zeros((), device=run.device), 0
    run.t_start = run.t_log = time.time()
    run.model.train()
    while run.step < args.steps:
        # determine the learning rate: the schedule times each unit's TGL scale (ALR; 1 otherwise)
        lr = lr_at(run.step, args)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]

        # forward, backward, update
        logging = (run.step + 1) % args.log_every == 0 or run.step + 1 == args.steps
        mask = forward_backward(run, hooks, logging)
        run.step += 1
        if logging:  # per-unit norms of this update's gradient, before clipping (the paper's Figure 1)
            grad_norms = hooks.norms() if run.world == 1 else tgl_trace.unit_grad_norms(run.model)  # DDP: after the all-reduce
        update(run, mask)
        run.n_sum += 1
        run.steps_now += 1

        # once in a while: evaluate, log, checkpoint
        done = run.step == args.steps
        do_eval = (run.probes or run.val_tokens is not None) and (done or (args.eval_every and run.step % args.eval_every == 0))
        do_save = done or (args.save_every and run.step % args.save_every == 0)
        if logging or do_save:
            run.last_loss = mean_loss(run)
        if do_eval:
            run.evals = evaluate(run) if run.master else None
        if logging:
            log_line(run, lr, grad_norms, run.evals if do_eval else None)
        if do_save:
            checkpoint(run)


def finish(run: Run) -> dict:
    """summary.json."""
    args = run.args
    train_time = run.saved_time if run.steps_now else run.elapsed  # nothing trained now: the checkpoint's time
    if (run.probes or run.val_tokens is not None) and run.evals is None and run.master:  # resumed a finished run
        run.evals = evaluate(run)
    # time: training time up to the final checkpoint, which a resumed finished run reads back from it,
    # so summary.json comes out exactly as the first time
    summary = dict(out=args.out, method=args.method, tgl=args.tgl, steps=run.step, final_loss=run.last_loss,
                   probes=(run.evals or {}).get("probes"), scales=run.scales,
                   trainable_params=sum(p.numel() for p in run.opt.params), time=train_time)
    if args.val_data:
        summary["val_ppl"] = (run.evals or {}).get("val_ppl")
    if run.probes:
        summary["metric"] = args.metric
    if run.master:
        write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1))
    if run.world > 1:
        dist.destroy_process_group()
    return summary


def main(argv=None):
    args = get_args(argv)
    with input_errors("train.py"):  # the one error path: bad input is one line, bugs keep their traceback
        run, ck = setup(args)
        restore(run, ck)
        # trace.py's hooks log per-unit gradient norms while training; on for the whole run
        with tgl_trace.GradNormHooks(run.model) as hooks:
            train(run, hooks)
        return finish(run)


if __name__ == "__main__":
    main()
