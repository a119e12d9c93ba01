"""Benchmark: tracing N examples with the gradient-norm hooks vs the plain per-example fwd+bwd loop.

The target (issue 4) is traced / plain <= 1.1: the hooks must not be the bottleneck.

    python bench_trace.py                      # GPT-2 small shape, 32 probe-like examples
    python bench_trace.py --n-layer 4 --n-embd 256 --device cuda
"""
import argparse
import time

import torch

from model import GPT, GPTConfig, autocast, pick_device
from trace import _collate, trace_norms


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_trace(n=32, n_layer=12, n_head=12, n_embd=768, vocab_size=50257, seq_len=24, n_targets=3,
                device="cpu", repeats=3, seed=0) -> dict:
    """Time (best of `repeats`) tracing n examples vs the plain loop over the same examples:
    zero_grad(set_to_none) + forward + backward per example, as one would write it without hooks."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=max(seq_len, 64), vocab_size=vocab_size, n_layer=n_layer,
                          n_head=n_head, n_embd=n_embd)).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    examples = [(torch.randint(0, vocab_size, (seq_len,), generator=g).tolist(),
                 [-1] * (seq_len - n_targets) + torch.randint(0, vocab_size, (n_targets,), generator=g).tolist())
                for _ in range(n)]

    def plain():
        for ex in examples:
            model.zero_grad(set_to_none=True)
            x, y = _collate([ex], device)  # (1, T) each, as the trace builds them
            with autocast(device):
                _, loss = model(x, y)
            loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)

    def traced():
        _, sums, _ = trace_norms(model, {"span": examples}, device=device)
        sums["span"].tolist()  # the one sync of a real trace

    times = {"plain": [], "trace": []}
    for fn in (plain, traced):  # warm-up (allocator, kernels)
        fn()
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        for name, fn in (("plain", plain), ("trace", traced)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    res = {"n": n, "device": str(device), "params_M": model.num_params() / 1e6, "plain_s": best["plain"],
           "trace_s": best["trace"], "ratio": best["trace"] / best["plain"],
           "plain_ms_per_example": 1e3 * best["plain"] / n, "trace_ms_per_example": 1e3 * best["trace"] / n}
    print(f"{res['params_M']:.1f}M params on {device}, {n} examples of {seq_len} tokens ({n_targets} targets), best of {repeats}")
    print(f"plain fwd+bwd loop: {best['plain']:.3f} s ({res['plain_ms_per_example']:.2f} ms/example)")
    print(f"trace (hooks)     : {best['trace']:.3f} s ({res['trace_ms_per_example']:.2f} ms/example)")
    print(f"ratio trace/plain : {res['ratio']:.3f} (target <= 1.1)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description="Time tracing vs a plain per-example forward+backward loop.")
    ap.add_argument("--n", type=int, default=32, help="examples traced")
    ap.add_argument("--n-layer", type=int, default=12, help="layers (GPT-2 small: 12)")
    ap.add_argument("--n-head", type=int, default=12, help="attention heads")
    ap.add_argument("--n-embd", type=int, default=768, help="model width")
    ap.add_argument("--vocab-size", type=int, default=50257, help="vocabulary size")
    ap.add_argument("--seq-len", type=int, default=24, help="tokens per example (probe-like)")
    ap.add_argument("--n-targets", type=int, default=3, help="answer tokens per example")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    ap.add_argument("--seed", type=int, default=0, help="seed for the model and the examples")
    args = ap.parse_args(argv)
    if min(args.n, args.repeats, args.n_targets) < 1 or args.n_targets > args.seq_len:
        ap.error("--n, --repeats, --n-targets must be >= 1 and --n-targets <= --seq-len")
    if args.n_embd % args.n_head:
        ap.error("--n-embd must be a multiple of --n-head")
    return bench_trace(args.n, args.n_layer, args.n_head, args.n_embd, args.vocab_size, args.seq_len,
                       args.n_targets, pick_device(args.device), args.repeats, args.seed)


if __name__ == "__main__":
    main()
