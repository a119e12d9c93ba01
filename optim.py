"""The update rule of TGL's step 3, written out: AdamW with one parameter group per unit, which is where TGL
acts (FP: a frozen unit has no group; ALR: a group's lr is scaled), per-unit clipping, the learning-rate
schedule, and RecAdam's annealed pull toward the old weights. train.py's loop calls these."""
import math

import torch
import torch.distributed as dist

from model import unit_of

# ----- the optimizer

class AdamW:
    """AdamW (Loshchilov & Hutter 2019), written out. For each parameter, at update t:

        theta <- theta * (1 - lr * wd)                      decoupled weight decay, matrices only
        m     <- b1 * m + (1 - b1) * g                      first moment
        v     <- b2 * v + (1 - b2) * g^2                    second moment
        theta <- theta - s * lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    s: 1, or RecAdam's lambda(t); the order is torch.optim.AdamW's. A group is a unit, its lr set by the loop
    to lr(step) * lr_scale (TGL+ALR). TGL+FP's frozen units have no group.
    """

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.param_groups = [dict(g, lr=lr * g["lr_scale"]) for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.beta1, self.beta2, self.eps, self.weight_decay, self.t = betas[0], betas[1], eps, weight_decay, 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]     # m, per parameter
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]  # v, per parameter

    @torch.no_grad()
    def step(self, update_scale=1.0):
        """The four lines above, on all parameters at once (torch._foreach_*)."""
        self.t += 1
        params, m, v = self.params, self.exp_avg, self.exp_avg_sq
        grads, lrs = [p.grad for p in params], [g["lr"] for g in self.param_groups for _ in g["params"]]
        if self.weight_decay:  # decoupled: shrink the weights, not the gradient; biases and LN are exempt
            mats = [k for k, p in enumerate(params) if p.ndim >= 2]
            torch._foreach_mul_([params[k] for k in mats], [1 - lrs[k] * self.weight_decay for k in mats])
        torch._foreach_lerp_(m, grads, 1 - self.beta1)
        torch._foreach_mul_(v, self.beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - self.beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - self.beta2 ** self.t))
        torch._foreach_add_(denom, self.eps)
        bias1 = 1 - self.beta1 ** self.t
        torch._foreach_addcdiv_(params, m, denom, [-lr * update_scale / bias1 for lr in lrs])

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self):
        return dict(t=self.t, units=[g["unit"] for g in self.param_groups], m=self.exp_avg, v=self.exp_avg_sq)

    def load_state_dict(self, d):
        if d["units"] != [g["unit"] for g in self.param_groups]:
            raise ValueError(f"optimizer state is for units {d['units']}: another run")
        self.t = d["t"]
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, d["m"] + d["v"]):
            dst.copy_(src)

def make_param_groups(model, scales=None):
    """A group per unit that trains: {"unit", "params", "lr_scale"}, the scale tgl_plan's (default 1)."""
    scales, groups = scales or {}, {}
    for name, p in model.named_parameters():
        if scales.get(unit_of(name), 1.0) == 0:
            # TGL step 3, FP: a unit the trace did not select is frozen (no gradient, no optimizer state)
            p.requires_grad_(False)
        if p.requires_grad:
            groups.setdefault(unit_of(name), []).append(p)
    # TGL step 3, ALR: each unit's group carries its scale; AdamW trains it at lr * lr_scale
    return [{"unit": u, "params": ps, "lr_scale": float(scales.get(u, 1.0))} for u, ps in groups.items()]

def group_norms(norms, group_of, n_groups, across=False) -> list:
    """[n_groups] 2-norms from the norms of tensors, tensor i in group group_of[i]; one sync. Squares are
    added in float64, in order. FSDP (across): each process has the norms of its slices only; the squares
    add up over processes to the whole's. The one place norms span shards."""
    sq = torch.stack(norms).square()
    if across:
        idx = torch.tensor(group_of, device=sq.device)
        sq = torch.zeros(n_groups, dtype=torch.float64, device=sq.device).index_add_(0, idx, sq.double())
        dist.all_reduce(sq)
        return sq.sqrt().tolist()
    out = [0.0] * n_groups
    for k, v in zip(group_of, sq.tolist()):
        out[k] += v
    return [math.sqrt(v) for v in out]

def sharded(t) -> bool:  # FSDP's parameters and gradients are DTensors
    return hasattr(t, "to_local")

def local(t):  # this process's slice of a sharded tensor, else the tensor
    return t.to_local() if sharded(t) else t

def clip_gradients(opt, max_norm, n_units):
    """Each unit to max_norm / sqrt(units): one norm over the trained parameters is smaller when FP freezes
    units, so FP would be clipped less."""
    pairs = [(k, p.grad) for k, g in enumerate(opt.param_groups) for p in g["params"] if p.grad is not None]
    if max_norm <= 0 or not pairs:  # --grad-clip 0: off
        return
    if not sharded(pairs[0][1]):  # torch's own clip, unit by unit
        for g in opt.param_groups:
            torch.nn.utils.clip_grad_norm_(g["params"], max_norm / math.sqrt(n_units), foreach=True)
        return
    at, grads = zip(*pairs)  # FSDP: each unit's norm summed over the shards, then torch's rule
    norms = group_norms([torch.linalg.vector_norm(local(g), dtype=torch.float32) for g in grads], at,
                        len(opt.param_groups), across=True)
    for k in set(at):
        coef = min(1.0, max_norm / math.sqrt(n_units) / (norms[k] + 1e-6))
        torch._foreach_mul_([local(g) for j, g in pairs if j == k], coef)

def lr_at(step, cfg):  # cfg: train.Config; linear warmup, then cosine, linear or no decay
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    coef = {"none": 1.0, "linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.decay]
    return cfg.lr if cfg.decay == "none" else cfg.min_lr + coef * (cfg.lr - cfg.min_lr)

# ----- continual-learning methods

def recadam_lambda(t, k, t0):
    """RecAdam (Chen et al. 2020) weighs the new text's loss against a pull back to the old weights; lambda(t)
    anneals from ~0 (recall) to 1 (new text): early, least informed updates move least."""
    x = k * (t - t0)
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))  # overflow-safe

@torch.no_grad()
def recadam_pull(opt, anchors, gamma, lambda_t):
    """theta -= lr * gamma * (1 - lambda) * (theta - theta0), outside Adam's moments; each parameter with its
    unit's lr, so under ALR a slow unit is also pulled back slowly."""
    lrs = [g["lr"] for g in opt.param_groups for _ in g["params"]]
    diff = torch._foreach_sub(opt.params, anchors)
    torch._foreach_mul_(diff, [-min(1.0, lr * gamma * (1 - lambda_t)) for lr in lrs])
    torch._foreach_add_(opt.params, diff)
