"""Cost of one training step for full, full + TGL-FP (half the units frozen) and LoRA: same model, same batch.

    python bench_train.py                                   # the demo's model on CPU
    python bench_train.py --device cuda --n-layer 12 --n-embd 768 --vocab 50257 --block-size 512 --batch-size 8

Per setup: step time (forward, backward, clip, optimizer), tokens/s, and memory:
  state    = bytes of weight gradients + optimizer state (exact, from the tensors)
  saved    = bytes of activations autograd keeps for backward (saved-tensor hooks, parameters
             excluded, each storage counted once): what freezing removes besides gradients
  peak     = torch.cuda.max_memory_allocated on CUDA (not measurable per setup on CPU: "-")
"""
import argparse
import time

import torch

from model import GPT, GPTConfig, add_lora, autocast, pick_device, unit_names
from train import AdamW, make_param_groups


def setups(n_layer):
    units = unit_names(n_layer)
    half = n_layer // 2
    late = {f"h.{i}.{s}" for i in range(half, n_layer) for s in ("attn", "mlp")} | {"ln_f"}
    early = {"embed"} | {f"h.{i}.{s}" for i in range(half) for s in ("attn", "mlp")}
    return {"full": None,
            "fp (late half frozen)": {u: float(u not in late) for u in units},
            "fp (early half frozen)": {u: float(u not in early) for u in units},
            "lora r8": "lora"}


def saved_activation_bytes(model, x, y, device):
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device):
        _, loss = model(x, y)
    loss.backward()
    return sum(seen.values())


def bench_train(n_layer=4, n_head=4, n_embd=128, vocab=2000, block_size=64, batch_size=16, steps=20,
                device="cpu", seed=0):
    """Print one table row per setup; return {setup: dict(ms, tok_s, state, saved, peak, trainable)}."""
    torch.manual_seed(seed)
    x = torch.randint(0, vocab, (batch_size, block_size), device=device)
    y = torch.randint(0, vocab, (batch_size, block_size), device=device)
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    cuda = str(device).startswith("cuda")
    print(f"{n_layer} layers, d={n_embd}, vocab {vocab}, batch {batch_size}x{block_size}, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'setup':24s} {'trainable':>10s} {'ms/step':>8s} {'tok/s':>9s} {'state MiB':>9s} {'saved MiB':>9s} {'peak MiB':>8s}")
    out = {}
    for name, scales in setups(n_layer).items():
        torch.manual_seed(seed)
        model = GPT(cfg).to(device)
        if scales == "lora":
            add_lora(model, 8, 16.0)
            scales = None
        opt = AdamW(make_param_groups(model, scales), lr=1e-4)
        saved = saved_activation_bytes(model, x, y, device)
        opt.zero_grad()
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for i in range(steps + 3):  # 3 warm-up steps
            t = time.perf_counter()
            with autocast(device):
                _, loss = model(x, y)
            loss.backward()
            state = sum(p.grad.numel() * p.grad.element_size() for p in opt.params) + opt.state_bytes()
            torch.nn.utils.clip_grad_norm_(opt.params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        ms = sorted(times[3:])[len(times[3:]) // 2] * 1000  # median
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        out[name] = dict(ms=ms, tok_s=batch_size * block_size / ms * 1000, state=state, saved=saved, peak=peak,
                         trainable=sum(p.numel() for p in opt.params))
        r = out[name]
        print(f"{name:24s} {r['trainable']:>10,} {ms:8.1f} {r['tok_s']:9,.0f} {state / 2**20:9.2f} {saved / 2**20:9.2f} "
              f"{'-' if peak is None else f'{peak:.0f}':>8s}")
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layer", type=int, default=4, help="layers")
    p.add_argument("--n-head", type=int, default=4, help="heads")
    p.add_argument("--n-embd", type=int, default=128, help="width")
    p.add_argument("--vocab", type=int, default=2000, help="vocabulary size")
    p.add_argument("--block-size", type=int, default=64, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setup (median reported)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    return bench_train(a.n_layer, a.n_head, a.n_embd, a.vocab, a.block_size, a.batch_size, a.steps, pick_device(a.device))


if __name__ == "__main__":
    main()
