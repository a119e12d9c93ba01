"""Forward + backward throughput of our GPT against transformers' GPT2LMHeadModel, same process.

Both models get the GPT-2 small config, random weights and the same batch; their steps are
interleaved (ours, theirs, ours, ...) so that machine noise hits both alike, and the median
tokens/s of each is reported. transformers is only needed here and in the tests.

    python bench_model.py --steps 5            # CPU: B=4, T=256
"""
import argparse
import statistics
import sys
import time

import torch

from model import GPT, GPTConfig, autocast, pick_device


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def step_time(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_model(device="cpu", steps=5, batch_size=4, block_size=256, n_layer=12, n_head=12, n_embd=768,
                warmup=1, seed=0) -> dict:
    """Median forward+backward tokens/s of ours and transformers' GPT-2 (same config, batch, process)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise SystemExit("error: the comparison needs transformers (pip install -r requirements-dev.txt)")
    device = pick_device(device)
    torch.manual_seed(seed)
    ours = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, dropout=0.0)).to(device)
    hf_cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = GPT2LMHeadModel(hf_cfg).to(device)
    ours.train()
    theirs.train()  # dropout is 0 in both, so train mode costs nothing extra
    x = torch.randint(0, 50257, (batch_size, block_size), device=device)
    y = torch.randint(0, 50257, (batch_size, block_size), device=device)

    def run_ours():
        with autocast(device):
            _, loss = ours(x, y)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def run_theirs():
        with autocast(device):
            loss = theirs(input_ids=x, labels=x).loss  # labels are shifted inside: same work as ours
        loss.backward()
        theirs.zero_grad(set_to_none=True)

    times = {"ours": [], "transformers": []}
    for i in range(warmup + steps):
        for name, fn in (("ours", run_ours), ("transformers", run_theirs)):
            t = step_time(fn, device)
            if i >= warmup:
                times[name].append(t)
    tokens = batch_size * block_size
    result = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"device {device}, threads {torch.get_num_threads()}, B={batch_size} T={block_size}, "
          f"GPT-2 small ({n_layer}L {n_embd}d), median of {steps} interleaved steps, forward+backward:")
    for name, tps in result.items():
        print(f"  {name:13s} {tps:9.0f} tokens/s   ({statistics.median(times[name]) * 1000:.0f} ms/step)")
    print(f"  ours / transformers = {result['ours'] / result['transformers']:.2f}x")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default auto)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--block-size", type=int, default=256, help="tokens per sequence (default 256)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or not 1 <= args.block_size <= 1024 or args.warmup < 0:
        p.error("--steps and --batch-size must be >= 1, --block-size in 1..1024, --warmup >= 0")
    return bench_model(args.device, args.steps, args.batch_size, args.block_size, warmup=args.warmup)


if __name__ == "__main__":
    main(sys.argv[1:])
