"""Pretraining from scratch and continual pretraining, with Traced Gradient Layers on top.

    python train.py --init scratch --data world/t0.txt --tokenizer word --out runs/base
    python train.py --init runs/base --data world/diff.txt --method recadam --tgl fp \\
        --trace trace.json --probes world/probes/*.jsonl --out runs/recadam_fp
    torchrun --nproc_per_node 4 train.py ...            # DDP: --batch-size is the global batch

One file: a hand-written AdamW with one parameter group per unit (DESIGN.md), the continual-learning
methods (full, mixreview, recadam, lora), TGL's freeze mask (fp) or per-unit LR scales (alr),
atomic checkpoints with exact resume, and DistributedDataParallel.
"""
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial

import torch
import torch.distributed as dist

import data
import probe
import trace as tgl_trace  # the project's trace.py (the repo root comes first on sys.path)
from common import Parser, fail as cli_fail, write_text
from model import (CKPT_NAME, GPT, GPTConfig, add_lora, autocast, load_checkpoint, load_model, merge_lora,
                   pick_device, save_checkpoint, unit_names, unit_of)


# ----------------------------------------------------------------------------- optimizer

class AdamW:
    """AdamW (Loshchilov & Hutter 2019), written out. For each parameter, at update t:

        theta <- theta * (1 - lr * wd)                      decoupled weight decay, matrices only
        m     <- b1 * m + (1 - b1) * g                      first moment
        v     <- b2 * v + (1 - b2) * g^2                    second moment
        theta <- theta - s * lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    s is `update_scale` (1, or RecAdam's lambda(t)). The operations and their order are those of
    torch.optim.AdamW, so the two agree to float rounding. Each group is one unit: {"unit", "params",
    "lr_scale"}; the schedule sets group["lr"] = base_lr(step) * lr_scale. Frozen units are never
    given to the optimizer, so they hold no state. All groups are updated with a handful of fused
    torch._foreach_* calls (per-parameter lr lists), not a Python loop over tensors.
    `rows[id(p)] = LongTensor`: update only those rows of p (weights and moments) this step.
    """

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.param_groups = [dict(g, lr=lr * g["lr_scale"]) for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.b1, self.b2, self.eps, self.wd = betas[0], betas[1], eps, weight_decay
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.rows = {}

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, update_scale=1.0):
        self.t += 1
        b1, b2, wd, eps = self.b1, self.b2, self.wd, self.eps
        bc1, bc2_sqrt = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        lrs = [g["lr"] for g in self.param_groups for _ in g["params"]]
        dense = [i for i, p in enumerate(self.params) if p.grad is not None and id(p) not in self.rows]
        P, G = [self.params[i] for i in dense], [self.params[i].grad for i in dense]
        Mo, V, L = [self.m[i] for i in dense], [self.v[i] for i in dense], [lrs[i] for i in dense]
        if wd and dense:
            mats = [k for k, p in enumerate(P) if p.ndim >= 2]
            torch._foreach_mul_([P[k] for k in mats], [1 - L[k] * wd for k in mats])
        if dense:
            torch._foreach_lerp_(Mo, G, 1 - b1)
            torch._foreach_mul_(V, b2)
            torch._foreach_addcmul_(V, G, G, 1 - b2)
            denom = torch._foreach_sqrt(V)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(P, Mo, denom, [-lr * update_scale / bc1 for lr in L])
        for i, p in enumerate(self.params):  # row-sparse updates (--embed-rows seen): same rule on rows
            r = self.rows.get(id(p))
            if r is None or p.grad is None:
                continue
            w, g, m, v = p[r], p.grad[r], self.m[i][r], self.v[i][r]  # (R, C) copies
            if wd and p.ndim >= 2:
                w.mul_(1 - lrs[i] * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-lrs[i] * update_scale / bc1)
            p[r], self.m[i][r], self.v[i][r] = w, m, v

    def state_dict(self):
        return {"t": self.t, "units": [g["unit"] for g in self.param_groups], "m": self.m, "v": self.v}

    def load_state_dict(self, d):
        if d["units"] != [g["unit"] for g in self.param_groups]:
            raise ValueError(f"optimizer state is for units {d['units']}, this run trains others")
        self.t = d["t"]
        for dst, src in zip(self.m + self.v, d["m"] + d["v"]):
            dst.copy_(src)

    def state_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.m + self.v)


def make_param_groups(model, scales=None):
    """One group per unit that trains, in network order: {"unit", "params", "lr_scale"}.
    A unit whose scale is 0 is frozen here (requires_grad False: no weight-gradient compute, no
    optimizer state). Parameters already frozen (LoRA base weights) stay out. Missing units: 1.0."""
    scales, groups = scales or {}, {}
    for name, p in model.named_parameters():
        unit = unit_of(name)
        if scales.get(unit, 1.0) == 0:
            p.requires_grad_(False)
        if p.requires_grad:
            groups.setdefault(unit, []).append(p)
    return [{"unit": u, "params": ps, "lr_scale": float(scales.get(u, 1.0))} for u, ps in groups.items()]


def recadam_lambda(t, k, t0):
    """RecAdam's annealing coefficient lambda(t) = 1 / (1 + exp(-k (t - t0))), overflow-safe."""
    x = k * (t - t0)
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@torch.no_grad()
def recadam_pull(opt, anchors, gamma, lam):
    """RecAdam's decoupled quadratic pull: theta <- theta - lr * gamma * (1 - lambda) * (theta - theta0),
    the step of (1 - lambda) * gamma/2 * ||theta - theta0||^2 applied outside Adam's moments (the
    Adam part is scaled by lambda in AdamW.step). The factor is capped at 1: never past theta0."""
    coefs = [-min(1.0, g["lr"] * gamma * (1 - lam)) for g in opt.param_groups for _ in g["params"]]
    diff = torch._foreach_sub(opt.params, anchors)
    torch._foreach_mul_(diff, coefs)
    torch._foreach_add_(opt.params, diff)


def lr_at(step, args):
    """Base learning rate for update `step` (0-based): linear warmup, then cosine/linear/no decay."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.decay == "none":
        return args.lr
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    coef = 0.5 * (1 + math.cos(math.pi * frac)) if args.decay == "cosine" else 1 - frac
    return args.min_lr + coef * (args.lr - args.min_lr)


# ----------------------------------------------------------------------------- data

class Stream:
    """Each step's batch (B rows of T tokens): windows of --data, with the last
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
    a("--replay-decay", type=float, default=1.0, help="mixreview: share left at the end, as a fraction of the start (1 = constant)")
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
    a("--trace-split", default="all", help="which traced split's relative norms select units (all, updated, new, ...)")
    a("--select", default="mean", help="fp rule: mean (rgn above the mean), topk:K or frac:F")
    a("--rank-units", default="all", help="units ranked by the selection: all, blocks, attn, mlp or a comma list")
    a("--alr-norm", choices=["max", "mean"], default="max", help="alr scale: rgn/max (paper) or rgn/mean capped at 1")
    a("--floor", type=float, default=tgl_trace.DEFAULT_FLOOR, help="alr: smallest LR scale (0 lets alr freeze units)")
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
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    a("--seed", type=int, default=0, help="seed for init, data order and dropout")
    a("--probes", nargs="+", default=[], help="probe files scored every --eval-every steps and at the end")
    a("--eval-every", type=int, default=0, help="score probes every N updates (0 = only at the end)")
    a("--log-every", type=int, default=10, help="progress line, metrics line and NaN check every N updates")
    a("--save-every", type=int, default=0, help="checkpoint every N updates (0 = only at the end)")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
    a("--export-hf", help="also write the final model (LoRA merged) in Hugging Face layout here")
    a("--device", default="auto", help="auto | cpu | cuda | mps")
    a("--compile", action="store_true", help="torch.compile the model (CUDA)")
    a("--threads", type=int, help="CPU threads (default: torch's, shared among local processes)")
    args = p.parse_args(argv)

    files = [args.data, args.replay_data, args.trace, args.trace_text, args.tokenizer_file] + args.probes + (args.trace_probes or [])
    checks = [(f"no such file: {f}", f and not os.path.exists(f)) for f in files] + [
        (f"--tgl {args.tgl} needs --trace FILE or --trace-probes FILE... --trace-text OLD",
         args.tgl != "none" and not (args.trace or args.trace_probes)),
        ("--trace-probes needs --trace-text (old text for the LM gradient norm)", args.trace_probes and not args.trace_text),
        ("--method mixreview needs --replay-data", args.method == "mixreview" and not args.replay_data),
        ("--replay-ratio must be in [0, 1] and --replay-decay >= 0", not 0 <= args.replay_ratio <= 1 or args.replay_decay < 0),
        ("--steps, --batch-size, --grad-accum and --log-every must be >= 1",
         min(args.steps, args.batch_size, args.grad_accum, args.log_every) < 1)]
    for msg, bad in checks:
        if bad:
            fail(msg)
    try:
        tgl_trace.parse_rule(args.select)
    except ValueError as e:
        fail(str(e))
    args.recadam_t0 = args.steps / 4 if args.recadam_t0 is None else args.recadam_t0
    return args


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
    """TGL: {unit: lr scale} (0 = frozen) from --trace or traced now; None without TGL."""
    if args.tgl == "none":
        return None
    try:
        if args.trace:
            tr = tgl_trace.load_trace(args.trace)
        else:
            tr = tgl_trace.trace_files(model, tokenizer, args.trace_probes, args.trace_text, seed=args.seed, device=device,
                                       **{k: v for k, v in dict(n_span=args.trace_n_span, n_lm=args.trace_n_lm).items() if v})
            if rank == 0:
                tgl_trace.save_trace(os.path.join(args.out, "trace.json"), tr)
        rgn = tr["rgn"] if args.trace_split == "all" else tr.get("splits", {}).get(args.trace_split, {}).get("rgn")
        if rgn is None:
            fail(f"trace has no split {args.trace_split!r} (has: {', '.join(tr.get('splits', {})) or 'all only'})")
        units = unit_names(model.config.n_layer)
        if sorted(rgn) != sorted(units):
            fail(f"trace units {sorted(rgn)} do not match this model's {model.config.n_layer} layers")
        ranked = tgl_trace.resolve_units(args.rank_units, units)
        return tgl_trace.select(rgn, args.tgl, args.select, ranked, args.alr_norm, args.floor)
    except ValueError as e:
        fail(str(e))


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


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_ddp(args)
    torch.manual_seed(args.seed)  # whatever is random before training (LoRA's A init) follows --seed too
    master, say = rank == 0, (print if rank == 0 else (lambda *a, **k: None))
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(args.out, CKPT_NAME), os.path.join(args.out, "metrics.jsonl")
    ck = load_checkpoint(ckpt_path) if args.resume and os.path.isfile(ckpt_path) else None
    if ck and ck["world_size"] != world:
        fail(f"{ckpt_path} was written by {ck['world_size']} processes; resume with as many")

    # model, TGL scales, method, optimizer: identical on a fresh start and a resume (state loaded below)
    tokenizer = get_tokenizer(args)
    model = build_model(args, tokenizer.n_vocab, device)
    cfg = model.config
    args.block_size = args.block_size or cfg.block_size
    if args.block_size > cfg.block_size or tokenizer.n_vocab > cfg.vocab_size:
        fail(f"block size {args.block_size} / vocab {tokenizer.n_vocab} exceed the model's {cfg.block_size} / {cfg.vocab_size}")
    scales = [ck["scales"] if ck else get_scales(args, model, tokenizer, device, rank)]
    if world > 1:
        dist.broadcast_object_list(scales, 0)  # every rank trains the same units
    scales = scales[0]
    if args.method == "lora":  # TGL-FP + LoRA: adapters only in selected units; ALR: the adapters' LR
        add_lora(model, args.lora_rank, args.lora_alpha, scales and {u for u, s in scales.items() if s > 0})
    groups = make_param_groups(model, scales)
    if not groups:
        fail("nothing to train: every unit is frozen")
    opt = AdamW(groups, args.lr, (args.beta1, args.beta2), weight_decay=args.weight_decay)
    anchors = [p.detach().clone() for p in opt.params] if args.method == "recadam" and args.recadam_gamma > 0 else None
    n_train, trained = sum(p.numel() for p in opt.params), [g["unit"] for g in groups]
    say(f"{args.method}, tgl {args.tgl}: training {n_train:,} of {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; optimizer state {opt.state_bytes() / 2**20:.1f} MiB")
    frozen = [u for u in unit_names(cfg.n_layer) if u not in trained]
    say("units (lr scale): " + " ".join(f"{g['unit']}x{g['lr_scale']:.2f}" for g in groups) + " | frozen: " + (" ".join(frozen) or "-"))

    try:
        if rank > 0:  # rank 0 tokenizes first (load_tokens caches), the others then read the cache
            dist.barrier()
        tokens = data.load_tokens(args.data, tokenizer)
        replay = data.load_tokens(args.replay_data, tokenizer) if args.method == "mixreview" else None
        if rank == 0 and world > 1:
            dist.barrier()
        stream = Stream(tokens, replay, args, rank, world)
        probes = data.read_probe_files(args.probes)  # same-named splits of two files never merge
    except ValueError as e:
        fail(str(e))
    wte = model.transformer.wte.weight
    seen_rows = args.embed_rows == "seen" and wte.requires_grad

    step, elapsed = 0, 0.0
    if ck:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        stream.load_state_dict(ck["sampler"][rank])
        rng = ck["rng"][rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], device)
        step, elapsed = ck["step"], ck["time"]
        say(f"resumed from {ckpt_path} at step {step}")
    else:
        torch.manual_seed(args.seed + rank)  # dropout stream, independent of how setup used the RNG
        random.seed(args.seed + rank)
    if master:  # the log must agree with the checkpoint: drop lines past it
        old = open(metrics_path).read().splitlines() if ck and os.path.exists(metrics_path) else []
        write_text(metrics_path, "".join(line + "\n" for line in old if json.loads(line)["step"] <= step))
        if hasattr(tokenizer, "save"):
            tokenizer.save(os.path.join(args.out, "tokenizer.json"))
    hooks = tgl_trace.GradNormHooks(model).__enter__()  # trace.py's hooks log per-unit gradient norms; on for the run
    dmodel = torch.compile(model) if args.compile else model
    if world > 1:
        dmodel = torch.nn.parallel.DistributedDataParallel(dmodel, device_ids=[device] if device.startswith("cuda") else None)

    def checkpoint():
        with torch.no_grad():
            if not all(torch.isfinite(p).all() for p in opt.params):
                stop("weights are not finite")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}
        state = dict(config=asdict(cfg), model=model.state_dict(), lora=getattr(model, "lora", None), step=step,
                     optimizer=opt.state_dict(), sampler=gathered(stream.state_dict(), world), rng=gathered(rng, world),
                     args=vars(args), tokenizer="word" if hasattr(tokenizer, "save") else "gpt2",
                     scales=scales, world_size=world, time=elapsed + time.time() - t_start)
        if master:
            save_checkpoint(ckpt_path, state)

    def stop(why):
        last = f"step {load_checkpoint(ckpt_path)['step']}" if os.path.exists(ckpt_path) else "none"
        fail(f"{why} at step {step}; stopped (last good checkpoint: {last})", code=3)

    def evaluate():
        with autocast(device):
            res = probe.evaluate(model, tokenizer, probes, device=device)  # eval mode, no grad: probe.py
        say(f"eval step {step}: " + " | ".join(f"{s} ppl {r['ppl']:.2f} em {r['em']:.2f}" for s, r in sorted(res.items())))
        return res

    tok_per_step = args.batch_size * args.block_size * args.grad_accum
    loss_sum, n_sum, probe_res, last = torch.zeros((), device=device), 0, None, None
    t_start = t_log = time.time()
    model.train()
    while step < args.steps:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        mask = torch.zeros(cfg.vocab_size, device=device) if seen_rows else None
        logging = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        for micro in range(args.grad_accum):
            # the hooks read .grad once it holds the whole accumulated gradient: at the last micro-step
            hooks.enabled = logging and world == 1 and micro == args.grad_accum - 1
            x, y = (t.to(device, non_blocking=True) for t in stream.next(step))  # (B, T) each
            sync = world == 1 or micro == args.grad_accum - 1  # DDP: all-reduce on the last micro-step only
            with (nullcontext() if sync else dmodel.no_sync()), autocast(device):
                _, loss = dmodel(x, y)
            (loss / args.grad_accum).backward()  # accumulated gradient = mean over micro-steps
            loss_sum += loss.detach() / args.grad_accum
            if mask is not None:  # --embed-rows seen: rows of every token in inputs or targets
                mask[x.view(-1)] = 1
                mask[y[y >= 0]] = 1
        step += 1
        if logging:  # per-unit norms of this update's gradient, before clipping (the paper's Figure 1)
            grad_norms = hooks.norms() if world == 1 else tgl_trace.unit_grad_norms(model)  # DDP: after the all-reduce
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(opt.params, args.grad_clip, foreach=True)
        if mask is not None:
            if world > 1:
                dist.all_reduce(mask, dist.ReduceOp.MAX)  # the same rows on every rank
            # the tied LM head gives every row a gradient; only rows of tokens in the batch are updated
            opt.rows = {id(wte): mask.nonzero().squeeze(1)}
        lam = recadam_lambda(step, args.recadam_k, args.recadam_t0) if anchors else 1.0
        opt.step(update_scale=lam)
        if anchors:
            recadam_pull(opt, anchors, args.recadam_gamma, lam)
        opt.zero_grad()
        n_sum += 1

        do_eval = probes and (step == args.steps or (args.eval_every and step % args.eval_every == 0))
        do_save = step == args.steps or (args.save_every and step % args.save_every == 0)
        if logging or do_save:  # the only places the loop waits for the device
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            last = loss_sum.item() / n_sum
            if not math.isfinite(last):
                stop(f"loss is {last}")
        if logging:
            now = time.time()
            tok_s = tok_per_step * n_sum / (now - t_log)
            say(f"step {step}/{args.steps} | loss {last:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | {elapsed + now - t_start:.1f}s")
            rec = dict(step=step, loss=last, lr=lr, tok_per_s=tok_s, grad_norms=grad_norms,
                       time=elapsed + now - t_start)
        if do_eval:
            probe_res = evaluate() if master else None
        if logging:
            if master:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(dict(rec, probes=probe_res) if do_eval else rec) + "\n")
            loss_sum.zero_()
            n_sum, t_log = 0, time.time()
        if do_save:
            checkpoint()
    if probes and probe_res is None and master:  # resumed a finished run: still report
        probe_res = evaluate()

    summary = dict(out=args.out, method=args.method, tgl=args.tgl, steps=step, final_loss=last, probes=probe_res,
                   scales=scales, trainable_params=n_train, time=elapsed + time.time() - t_start)
    if master:
        write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1))
        if args.export_hf:
            if getattr(model, "lora", None):
                merge_lora(model)
            model.save_pretrained(args.export_hf)
            tokenizer.save_hf(args.export_hf, model.config.block_size)  # AutoTokenizer loads the export too
            say(f"exported to {args.export_hf}")
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
