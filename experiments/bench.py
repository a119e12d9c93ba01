"""Benchmarks: our code against transformers, a plain loop, or other training setups.

    python -m experiments.bench all                                               # the four, small: a few minutes on 2 CPU cores
    python -m experiments.bench model --steps 5                                   # CPU: B=4, T=256, GPT-2 small
    python -m experiments.bench model --family all --batch-size 1 --block-size 512  # + SmolLM2, Pythia, Qwen2.5 shapes
    python -m experiments.bench probe --n-layer 12 --n-embd 768 --n-head 12 --n-probes 128   # GPT-2 small size
    python -m experiments.bench trace --n-layer 4 --n-embd 256 --device cuda
    python -m experiments.bench train --device cuda --n-layer 12 --n-embd 768 --vocab 50257 --block-size 512 --batch-size 8
    python -m experiments.bench tokenize --n-tokens 20000000                      # peak memory of streaming tokenization

`python -m experiments.bench` alone runs `all`; `python -m experiments.bench COMMAND --help` explains each one. model and probe
compare against transformers, a test and benchmark dependency (pip install -r requirements-dev.txt).
"""
import argparse
import csv
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import probe
from data import GPT2Tokenizer, WordTokenizer, span_example
from experiments.probe_files import read_probes
from model import GPT, GPTConfig, add_lora, autocast, pick_device, unit_names
from data import collate as _collate
from trace import grad_norms, trace_norms
from optim import AdamW, make_param_groups
from common import Parser, fail, input_errors, number
from experiments.export import save_hf
from experiments.world import WorldConfig, make_world


# ----------------------------------------------------------------------------- shared helpers

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device="cpu"):
    """(fn(), seconds), the device synchronized before and after so that queued kernels count."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def interleaved(fns: dict, repeats: int, device, warmup: int = 1) -> dict:
    """{name: [seconds] of `repeats` timed rounds}; every round (the `warmup` untimed ones first)
    runs each fn once in turn, so that drift in machine load hits them all alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = timed(fn, device)[1]
            if i >= warmup:
                times[name].append(t)
    return times


def need_transformers():
    try:
        import transformers
    except ImportError:
        fail("this benchmark needs transformers (pip install -r requirements-dev.txt)", "bench.py")
    transformers.logging.set_verbosity_error()  # no load-time notices or progress bars between the figures
    transformers.logging.disable_progress_bar()
    return transformers


# ----------------------------------------------------------------------------- model

# real shapes of the other families (their config.json fields), random weights: nothing is downloaded
FAMILY_SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True)),
    "pythia-160m": ("GPTNeoXConfig", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                    use_parallel_residual=True, tie_word_embeddings=False)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                     rope_theta=1000000.0, tie_word_embeddings=True)),
}


def model_pair(shape, transformers):
    """(ours, theirs, vocab, label): our GPT and transformers' model of the same config, random weights;
    shape: GPT-2's (n_layer, n_head, n_embd), or a FAMILY_SHAPES name."""
    if not isinstance(shape, str):
        n_layer, n_head, n_embd = shape
        ours = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, dropout=0.0))
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        return ours, theirs, 50257, f"GPT-2 shape ({n_layer}L {n_embd}d)"
    from experiments.hf import config_from_hf
    cls, kw = FAMILY_SHAPES[shape]
    theirs = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw))
    ours = GPT(config_from_hf(theirs.config.to_dict()))
    return ours, theirs, kw["vocab_size"], f"{shape} shape ({kw['num_hidden_layers']}L {kw['hidden_size']}d)"


def bench_model(device="cpu", steps=5, batch_size=4, block_size=256, shape=(12, 12, 768), warmup=1, seed=0) -> dict:
    """Forward + backward throughput of our GPT against transformers' model of the same family, same process.

Both models get the same config (GPT-2 small by default; --family: SmolLM2-135M, Pythia-160m or Qwen2.5-0.5B
at their real shapes, or all four), random weights and the same batch; their steps are interleaved (ours,
theirs, ours, ...) so that machine noise hits both alike, and the median tokens/s of each is reported."""
    transformers = need_transformers()
    if shape == "all":  # --family all: GPT-2 small, then each family
        return {f: bench_model(device, steps, batch_size, block_size, f, warmup, seed)
                for f in [(12, 12, 768), *FAMILY_SHAPES]}
    torch.manual_seed(seed)
    ours, theirs, vocab, label = model_pair(shape, transformers)
    ours, theirs = ours.to(device).train(), theirs.to(device).train()  # dropout is 0 in both
    x = torch.randint(0, vocab, (batch_size, block_size), device=device)
    y = torch.randint(0, vocab, (batch_size, block_size), device=device)

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

    times = interleaved({"ours": run_ours, "transformers": run_theirs}, steps, device, warmup)
    tokens = batch_size * block_size
    result = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"device {device}, threads {torch.get_num_threads()}, B={batch_size} T={block_size}, "
          f"{label}, median of {steps} interleaved steps, forward+backward:")
    for name, tps in result.items():
        print(f"  {name:13s} {tps:9.0f} tokens/s   ({statistics.median(times[name]) * 1000:.0f} ms/step)")
    print(f"  ours / transformers = {result['ours'] / result['transformers']:.2f}x", flush=True)
    return result


# ----------------------------------------------------------------------------- probe

def one_by_one(model, tok, probes, device="cpu"):
    """Reference loop: one forward per (probe, answer), full logits, best answer by NLL/token."""
    out = []
    with torch.inference_mode():
        for pr in probes:
            best = None
            for ans in pr.answers:
                idx, tgt = span_example(tok, pr.prompt, ans)
                logits, _ = model(torch.tensor([idx], device=device))
                tgt = torch.tensor(tgt, device=device)
                nll = F.cross_entropy(logits[0], tgt, ignore_index=-1, reduction="sum").item()
                n = (tgt != -1).sum().item()
                best = min(best or (nll / n, nll), (nll / n, nll))
            out.append(best[1])
    return out


def hf_scores(hf, tok, probes, batch_size, device="cpu"):
    """NLL of the best answer per probe with transformers, B (probe, answer) rows per forward:
    right padding + attention_mask, all logits, cross-entropy (how one would usually do it)."""
    items = [(i, span_example(tok, pr.prompt, a)) for i, pr in enumerate(probes) for a in pr.answers]
    items.sort(key=lambda it: len(it[1][0]))  # the same length sorting probe.score gets
    best = [None] * len(probes)
    with torch.inference_mode():
        for b in range(0, len(items), batch_size):
            owners, examples = zip(*items[b:b + batch_size])
            x, y = _collate(examples, device)  # (B, T) each; padding has target -1
            lengths = torch.tensor([len(idx) for idx, _ in examples], device=device)
            att = (torch.arange(x.shape[1], device=device) < lengths[:, None]).long()
            logits = hf(input_ids=x, attention_mask=att).logits  # (B, T, V)
            nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none").sum(1).tolist()
            for i, s, n in zip(owners, nll, (y != -1).sum(1).tolist()):
                best[i] = min(best[i] or (s / n, s), (s / n, s))
    return [b[1] for b in best]


def bench_probe(n_probes=256, shape=(4, 4, 256), batch_size=64, seed=0, tokenizer="gpt2", device="cpu") -> dict:
    """Probe scoring: probe.score batched vs one at a time vs transformers, same weights.

The probes are the evaluation probes of a synthetic world (TempLAMA / ECBD formats), tokenized
with GPT-2 BPE (or the world's word vocabulary). Three ways to get the same numbers:
  batched   probe.score(batch_size=B): a row per (probe, answer), sorted by length, right-padded,
            one plain model(idx) per batch, log-softmax at the answer positions
  one-by-1  a plain loop: model(idx) for every (probe, answer), cross-entropy over the span
  hf        transformers' GPT2LMHeadModel with our weights (experiments/export.py), B (probe, answer)
            rows per forward, right padding + attention_mask, all logits, cross-entropy
Prints probes/s of each and checks that they agree (to bf16 rounding on CUDA, where probe.score autocasts)."""
    transformers = need_transformers()
    n_layer, n_head, n_embd = shape
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        make_world(d, WorldConfig(seed=seed, n_entities=300))
        probes = [p for s in ("updated", "unchanged", "new") for p in read_probes(f"{d}/probes/{s}.jsonl")]
        try:
            tok = GPT2Tokenizer() if tokenizer == "gpt2" else WordTokenizer.load(f"{d}/tokenizer.json")
        except OSError as e:  # tiktoken's download (requests' ConnectionError is an OSError)
            fail(f"no GPT-2 BPE files offline ({type(e).__name__}): set TIKTOKEN_CACHE_DIR "
                 "or use --tokenizer word", "bench.py")
    probes = probes[:n_probes]
    cfg = GPTConfig(block_size=128, vocab_size=tok.n_vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    model = GPT(cfg).to(device).eval()
    with tempfile.TemporaryDirectory() as d:  # our exporter: what transformers loads is what we wrote
        save_hf(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).to(device).eval()
    n_tok = sum(len(span_example(tok, p.prompt, a)[0]) for p in probes for a in p.answers)
    print(f"model: {n_layer} layers, d={n_embd}, vocab {cfg.vocab_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; {len(probes)} probes, {n_tok} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    probe.score(model, tok, probes[:8])  # warm-up
    res, t_batched = timed(lambda: probe.score(model, tok, probes, batch_size=batch_size), device)
    ours = [r["nll"] for r in res]
    t_rows1 = timed(lambda: probe.score(model, tok, probes, batch_size=1), device)[1]
    naive, t_naive = timed(lambda: one_by_one(model, tok, probes, device), device)
    hf_nll, t_hf = timed(lambda: hf_scores(hf, tok, probes, batch_size, device), device)
    diff_naive = max(abs(a - b) for a, b in zip(ours, naive))
    diff_hf = max(abs(a - b) for a, b in zip(ours, hf_nll))
    n = len(probes)
    figures = {"batched": n / t_batched, "score_batch1": n / t_rows1, "one_by_one": n / t_naive, "hf": n / t_hf}
    print(f"{'method':<28} {'probes/s':>10} {'vs one-by-1':>12}")
    for name, label in (("batched", f"probe.score batch {batch_size}"), ("score_batch1", "probe.score batch 1"),
                        ("one_by_one", "one at a time (model())"), ("hf", f"transformers batch {batch_size}")):
        print(f"{label:<28} {figures[name]:>10.1f} {figures[name] / figures['one_by_one']:>11.1f}x")
    print(f"batched is {figures['batched'] / figures['hf']:.2f}x transformers; "
          f"max |NLL diff| vs one-by-1 {diff_naive:.2e}, vs transformers {diff_hf:.2e}")
    return {**figures, "max_diff_naive": diff_naive, "max_diff_hf": diff_hf}


# ----------------------------------------------------------------------------- trace

def bench_trace(n=32, shape=(12, 12, 768), vocab_size=50257, seq_len=24, n_targets=3, device="cpu", repeats=3,
                seed=0) -> dict:
    """Tracing n examples with the gradient-norm hooks vs a plain loop that reads the same norms from p.grad.

The plain loop is what one would write without hooks: per example zero_grad(set_to_none), forward,
backward, then the per-unit norms of every p.grad (trace.grad_norms); the hooks (trace.trace_norms) take
each norm as its gradient is accumulated and drop the gradient. Same examples, interleaved rounds; the
median and the best of `repeats` rounds. The target (issue 23) is hooks / plain <= 1.1 at real shapes;
beside it, the gradient memory each holds: plain, every parameter's gradient at once; hooks, at most
one (the largest) at a time. shape: GPT-2's (n_layer, n_head, n_embd), or a FAMILY_SHAPES name."""
    torch.manual_seed(seed)
    if isinstance(shape, str):  # another family's real shape (transformers gives its config's defaults)
        from experiments.hf import config_from_hf
        cls, kw = FAMILY_SHAPES[shape]
        cfg = config_from_hf(getattr(need_transformers(), cls)(**kw).to_dict())
        vocab_size, label = cfg.vocab_size, shape
    else:
        n_layer, n_head, n_embd = shape
        cfg = GPTConfig(block_size=max(seq_len, 64), vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd)
        label = f"GPT-2 shape ({n_layer}L {n_embd}d)"
    model = GPT(cfg).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    examples = [(torch.randint(0, vocab_size, (seq_len,), generator=g).tolist(),
                 [-1] * (seq_len - n_targets) + torch.randint(0, vocab_size, (n_targets,), generator=g).tolist())
                for _ in range(n)]

    def plain():  # the same numbers the trace records, read from .grad: one sync per example too
        for ex in examples:
            model.zero_grad(set_to_none=True)
            x, y = _collate([ex], device)  # (1, T) each, as the trace builds them
            with autocast(device):
                _, loss = model(x, y)
            loss.backward()
            grad_norms(model)
        model.zero_grad(set_to_none=True)

    def traced():
        trace_norms(model, {"span": examples}, device=device)

    rounds = interleaved({"plain": plain, "trace": traced}, repeats, device)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    best = {k: min(v) for k, v in rounds.items()}
    sizes = [p.numel() * 4 for p in model.parameters()]  # fp32 gradients
    res = {"n": n, "shape": label, "device": str(device), "params_M": sum(sizes) / 4e6,
           "plain_s": med["plain"], "trace_s": med["trace"], "ratio": med["trace"] / med["plain"],
           "ratio_best": best["trace"] / best["plain"], "plain_grad_MiB": sum(sizes) / 2 ** 20,
           "trace_grad_MiB": max(sizes) / 2 ** 20}
    print(f"{label}: {res['params_M']:.1f}M params on {device}, {n} examples of {seq_len} tokens "
          f"({n_targets} targets), {repeats} rounds, {torch.get_num_threads()} threads")
    print(f"plain loop + norms from p.grad: {med['plain']:.3f} s median ({1e3 * med['plain'] / n:.1f} ms/example), "
          f"gradients held {res['plain_grad_MiB']:.0f} MiB")
    print(f"trace (hooks)                 : {med['trace']:.3f} s median ({1e3 * med['trace'] / n:.1f} ms/example), "
          f"gradients held <= {res['trace_grad_MiB']:.0f} MiB (one at a time)")
    print(f"ratio hooks/plain: {res['ratio']:.3f} median, {res['ratio_best']:.3f} best (target <= 1.1)")
    return res


# ----------------------------------------------------------------------------- train

def train_setups(n_layer):
    """{name: unit scales for make_param_groups (0 = frozen), None = all train, or "lora"}."""
    units = unit_names(n_layer)  # embed, h.0.attn, h.0.mlp, ..., ln_f: network order
    cut = 1 + 2 * (n_layer // 2)  # embed and the first half of the blocks
    early, late = set(units[:cut]), set(units[cut:])
    return {"full": None,
            "fp (late half frozen)": {u: float(u not in late) for u in units},
            "fp (early half frozen)": {u: float(u not in early) for u in units},
            "lora r8": "lora"}


def saved_activation_bytes(model, x, y, device):
    """Bytes autograd saves for backward in one step: parameters excluded, each storage once."""
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


def bench_train(shape=(4, 4, 128), vocab=2000, block_size=64, batch_size=16, steps=20, device="cpu", seed=0) -> dict:
    """Cost of one training step for full, full + TGL-FP (half the units frozen) and LoRA: same model, same batch.

Per setup: step time (forward, backward, clip, optimizer; median after 3 warm-up steps), tokens/s, memory:
  state    = bytes of weight gradients + optimizer state (exact, from the tensors)
  saved    = bytes of activations autograd keeps for backward (saved-tensor hooks, parameters
             excluded, each storage counted once): what freezing removes besides gradients
  peak     = torch.cuda.max_memory_allocated on CUDA (not measurable per setup on CPU: "-")
Returns {setup: dict(ms, tok_s, state, saved, peak, trainable)}."""
    n_layer, n_head, n_embd = shape
    torch.manual_seed(seed)
    x = torch.randint(0, vocab, (batch_size, block_size), device=device)
    y = torch.randint(0, vocab, (batch_size, block_size), device=device)
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    cuda = str(device).startswith("cuda")
    print(f"{n_layer} layers, d={n_embd}, vocab {vocab}, batch {batch_size}x{block_size}, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'setup':24s} {'trainable':>10s} {'ms/step':>8s} {'tok/s':>9s} {'state MiB':>9s} {'saved MiB':>9s} {'peak MiB':>8s}")
    out = {}
    for name, scales in train_setups(n_layer).items():
        torch.manual_seed(seed)
        model = GPT(cfg).to(device)
        if scales == "lora":
            add_lora(model, 8, 16.0)
            scales = None
        opt = AdamW(make_param_groups(model, scales), lr=1e-4)
        saved = saved_activation_bytes(model, x, y, device)
        opt.zero_grad()
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def step():  # returns the bytes of gradients + optimizer state, measured before they are freed
            with autocast(device):
                _, loss = model(x, y)
            loss.backward()
            state = sum(t.numel() * t.element_size() for t in [p.grad for p in opt.params] + opt.exp_avg + opt.exp_avg_sq)
            torch.nn.utils.clip_grad_norm_(opt.params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad()
            return state

        runs = [timed(step, device) for _ in range(steps + 3)]  # 3 warm-up steps
        state, ms = runs[-1][0], statistics.median(t for _, t in runs[3:]) * 1000
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        r = out[name] = dict(ms=ms, tok_s=batch_size * block_size / ms * 1000, state=state, saved=saved, peak=peak,
                             trainable=sum(p.numel() for p in opt.params))
        print(f"{name:24s} {r['trainable']:>10,} {ms:8.1f} {r['tok_s']:9,.0f} {state / 2**20:9.2f} {saved / 2**20:9.2f} "
              f"{'-' if peak is None else f'{peak:.0f}':>8s}")
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- all, command line

# command: (function, default --device, default (--n-layer, --n-head, --n-embd) or None, other flags).
# A flag is {name: (default, help)}: an int >= 1, or >= a third item; a list default = choices, first chosen.
def _peak_rss_mb(code: str):
    """(peak resident memory in MB, last line printed) of a fresh Python running `code` in this folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rss = "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"  # kB on Linux
    out = subprocess.run([sys.executable, "-c", code + rss], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: the measured run failed: {out.stderr.strip().splitlines()[-1:]}")
    lines = out.stdout.split("\n")
    return int(lines[-2]) / 1024, lines[-3] if len(lines) > 2 else ""


def bench_tokenize(device="cpu", seed=0, n_tokens=20_000_000):
    """Peak memory of data.load_tokens on a TemporalWiki-layout CSV of at least --n-tokens GPT-2 tokens.

    Tokenizing streams documents into the cache file, so the peak should not grow with the corpus;
    the old reader held a Python list of every token (about 51 bytes per token: 1 GB at 20M tokens).
    The peak is the max RSS of a fresh process, minus that of one that only loads the tokenizer."""
    rng = random.Random(seed)
    words = sorted({w for f in Path(__file__).resolve().parents[1].glob("*.md") for w in re.findall(r"[A-Za-z]+", f.read_text())})
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "wikipedia_0809_gpt2.csv"
        with open(src, "w", newline="", encoding="utf-8") as f:  # ~5.3 characters per GPT-2 token in this text
            w, size = csv.writer(f), 0
            w.writerow(["text"])
            while size < n_tokens * 6:
                doc = " ".join(rng.choice(words) for _ in range(rng.randint(50, 600))) + "."
                w.writerow([doc])
                size += len(doc) + 3
        base, _ = _peak_rss_mb("from data import GPT2Tokenizer; GPT2Tokenizer()")
        peak, elapsed = _peak_rss_mb("import time; from data import GPT2Tokenizer, load_tokens; tok = GPT2Tokenizer(); "
                                     f"t = time.time(); load_tokens({str(src)!r}, tok); print(time.time() - t)")
        elapsed = float(elapsed)
        n, csv_mb = len(np.fromfile(next(Path(d).glob("*.tokens.bin")), dtype=np.uint16)), src.stat().st_size / 1e6
    print(f"tokenized {n / 1e6:.1f}M tokens ({csv_mb:.0f} MB CSV) "
          f"in {elapsed:.0f} s ({n / elapsed / 1e6:.2f}M tokens/s, one process)")
    print(f"peak RSS {peak:.0f} MB; tokenizer alone {base:.0f} MB; tokenizing added {peak - base:.0f} MB "
          f"(one document's tokens at a time, whatever the corpus size; the old list-of-ids reader took ~51 bytes/token, "
          f"{51 * n / 2 ** 30:.1f} GiB here)")
    return dict(tokens=n, peak_mb=peak, base_mb=base, seconds=elapsed)


COMMANDS = {
    "model": (bench_model, "auto", (12, 12, 768), {
        "steps": (5, "timed steps per model (median reported)"),
        "warmup": (1, "untimed steps per model first", 0),
        "batch-size": (4, "sequences per step"),
        "block-size": (256, "tokens per sequence (at most 1024)"),
        "family": (["gpt2", *FAMILY_SHAPES, "all"], "gpt2 (its shape from --n-layer/--n-head/--n-embd) or another "
                   "family at its real shape, random weights")}),
    "probe": (bench_probe, "cpu", (4, 4, 256), {
        "n-probes": (256, "probes to score"),
        "batch-size": (64, "rows per forward (batched and transformers)"),
        "tokenizer": (["gpt2", "word"], "gpt2: GPT-2 BPE, 50k softmax; word: the world's small word vocabulary")}),
    "trace": (bench_trace, "auto", (12, 12, 768), {
        "family": (["gpt2", *FAMILY_SHAPES], "gpt2 (its shape from --n-layer/--n-head/--n-embd) or another "
                   "family at its real shape, random weights"),
        "n": (32, "examples traced"),
        "vocab-size": (50257, "vocabulary size"),
        "seq-len": (24, "tokens per example (probe-like)"),
        "n-targets": (3, "answer tokens per example (at most --seq-len)"),
        "repeats": (3, "timed repeats; the best is reported")}),
    "tokenize": (bench_tokenize, "cpu", None, {
        "n-tokens": (20_000_000, "GPT-2 tokens in the generated corpus (at least)")}),
    "train": (bench_train, "cpu", (4, 4, 128), {
        "vocab": (2000, "vocabulary size"),
        "block-size": (64, "tokens per window"),
        "batch-size": (16, "windows per step"),
        "steps": (20, "timed steps per setup (median reported)")}),
}
# `all`: sizes for a 2-core CPU, the four in about three minutes
SMALL = {"model": dict(steps=5, batch_size=1, block_size=128),
         "probe": dict(n_probes=128),
         "trace": dict(n=16, shape=(4, 4, 256)),
         "train": dict()}


def bench_all(device="cpu", seed=0) -> dict:
    """Each benchmark at small sizes (a few minutes on a 2-core CPU), one header per section."""
    out = {}
    for name, kw in SMALL.items():
        fn = COMMANDS[name][0]
        sizes = ", ".join(f"{k}={v}" for k, v in kw.items()) or "its defaults"
        print(f"\n=== {name}: {fn.__doc__.splitlines()[0]} ({sizes})", flush=True)
        out[name] = fn(device=device, seed=seed, **kw)
    return out


def at_least(low):
    return number(f"[{low}, inf)", int)


def check_device(name: str) -> str:
    """--device: model.pick_device's check, and for cuda:N that GPU N exists (else the first .to() fails)."""
    device = pick_device(name)
    kind, _, index = device.partition(":")
    if index and (kind != "cuda" or not index.isdigit() or int(index) >= torch.cuda.device_count()):
        gpus = f", cuda:0..{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else ""
        raise ValueError(f"--device {name}: no such device here; use auto, cpu{gpus}")
    return device


def main(argv=None):
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})

    def common(device):  # the flags every command has (a parser per command: argparse shares defaults)
        p = Parser(add_help=False)
        p.add_argument("--device", default=device, help="cpu, cuda, mps or auto")
        p.add_argument("--threads", type=at_least(1), help="torch CPU threads (default: %(default)s = torch's choice)")
        p.add_argument("--seed", type=at_least(0), default=0, help="seed of the weights and the data")
        return p
    ap = Parser(prog="bench.py", description=__doc__, formatter_class=fmt)  # its subparsers: Parser too
    sub, parsers = ap.add_subparsers(dest="command", metavar="{model,probe,trace,train,tokenize,all}"), {}
    for name, (fn, device, size, flags) in {**COMMANDS, "all": (bench_all, "auto", None, {})}.items():
        p = parsers[name] = sub.add_parser(name, parents=[common(device)], help=fn.__doc__.splitlines()[0],
                                           description=fn.__doc__, formatter_class=fmt)
        p.set_defaults(fn=fn)
        if size:
            flags = {"n-layer": (size[0], "transformer layers"), "n-head": (size[1], "attention heads"),
                     "n-embd": (size[2], "model width (a multiple of --n-head)"), **flags}
        for flag, (default, text, *low) in flags.items():
            if isinstance(default, list):
                p.add_argument(f"--{flag}", choices=default, default=default[0], help=text)
            else:
                p.add_argument(f"--{flag}", type=at_least(*low or [1]), default=default, help=text)

    args = ap.parse_args(argv)
    if args.command is None:  # `python -m experiments.bench` (make bench): everything, small
        args = ap.parse_args(["all"])
    kw = {k: v for k, v in vars(args).items() if k not in ("command", "fn", "threads")}
    error = parsers[args.command].error
    if kw.get("n_embd", 0) % kw.get("n_head", 1):
        error("--n-embd must be a multiple of --n-head")
    if args.command == "model" and args.block_size > 1024:
        error("--block-size must be <= 1024 (GPT-2's context)")
    if kw.get("n_targets", 0) > kw.get("seq_len", 0):
        error("--n-targets must be <= --seq-len")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "n_layer" in kw:  # the model's shape travels as one (n_layer, n_head, n_embd) tuple
        kw["shape"] = (kw.pop("n_layer"), kw.pop("n_head"), kw.pop("n_embd"))
    if kw.pop("family", "gpt2") != "gpt2":  # or as a family's name: its real shape
        kw["shape"] = args.family
    with input_errors("bench.py"):
        kw["device"] = check_device(args.device)
    return args.fn(**kw)


if __name__ == "__main__":
    main(sys.argv[1:])
