"""Benchmark probe scoring: probe.score batched vs one at a time vs transformers, same weights.

    python bench_probe.py                       # GPT-2 BPE, 4-layer d=256 GPT-2-style model, 256 probes
    python bench_probe.py --n-layer 12 --n-embd 768 --n-head 12 --n-probes 128   # GPT-2 small size

The probes are the evaluation probes of a synthetic world (TempLAMA / ECBD formats), tokenized
with GPT-2 BPE. Three ways to get the same numbers:
  batched   probe.score(batch_size=B): packed rows sorted by length, LM head at answer tokens only
  one-by-1  a plain loop: model(idx) for every (probe, answer), cross-entropy over the span
  hf        transformers.GPT2LMHeadModel on the same weights, B (probe, answer) rows per forward,
            right padding + attention_mask, all logits, cross-entropy (how one would usually do it)
"""
import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

import probe
from data import GPT2Tokenizer, WordTokenizer, make_world, read_probes, span_example
from model import GPT, GPTConfig


def one_by_one(model, tok, probes):
    """Reference loop: one forward per (probe, answer), full logits, best answer by NLL/token."""
    out = []
    with torch.inference_mode():
        for pr in probes:
            best = None
            for ans in pr.answers:
                idx, tgt = span_example(tok, pr.prompt, ans)
                logits, _ = model(torch.tensor([idx]))
                nll = F.cross_entropy(logits[0], torch.tensor(tgt), ignore_index=-1, reduction="sum").item()
                n = sum(t != -1 for t in tgt)
                best = min(best or (nll / n, nll), (nll / n, nll))
            out.append(best[1])
    return out


def hf_model(model):
    """transformers' GPT2LMHeadModel with our weights (via model.save_pretrained, else copied)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    if hasattr(model, "save_pretrained"):
        try:
            from transformers import AutoModelForCausalLM
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                return AutoModelForCausalLM.from_pretrained(d).eval()
        except Exception as e:  # an unfinished exporter must not stop the benchmark
            print(f"(save_pretrained failed: {type(e).__name__}: {e}; copying weights instead)")
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, n_inner=c.n_inner,
                                    layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new"))
    sd = model.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for k, v in hf.state_dict().items():
            if k in sd:
                v.copy_(sd[k].t() if k.endswith(conv1d) else sd[k])  # HF Conv1D stores (in, out)
    return hf.eval()


def hf_scores(hf, tok, probes, batch_size):
    """NLL of the best answer per probe with transformers, batched by (probe, answer) rows."""
    items = [(i, *span_example(tok, pr.prompt, a)) for i, pr in enumerate(probes) for a in pr.answers]
    items.sort(key=lambda it: len(it[1]))  # the same length sorting probe.score gets
    best = [None] * len(probes)
    with torch.inference_mode():
        for b in range(0, len(items), batch_size):
            chunk = items[b:b + batch_size]
            T = max(len(it[1]) for it in chunk)
            idx = torch.zeros(len(chunk), T, dtype=torch.long)
            att = torch.zeros(len(chunk), T, dtype=torch.long)
            labels = torch.full((len(chunk), T), -100, dtype=torch.long)
            for r, (_, x, y) in enumerate(chunk):
                idx[r, :len(x)], att[r, :len(x)] = torch.tensor(x), 1
                labels[r, :len(y)] = torch.tensor([t if t != -1 else -100 for t in y])
            logits = hf(input_ids=idx, attention_mask=att).logits  # (B, T, V)
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
            ntok = (labels != -100).sum(1)
            for r, (i, _, _) in enumerate(chunk):
                cand = (nll[r].item() / ntok[r].item(), nll[r].item())
                best[i] = min(best[i] or cand, cand)
    return [b[1] for b in best]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_probe(n_probes=256, n_layer=4, n_embd=256, n_head=4, batch_size=64, seed=0, threads=None,
                tokenizer="gpt2"):
    """Print probes/s of the three ways and check they agree; returns the figures as a dict.
    tokenizer: 'gpt2' (50k softmax) or 'word' (the world's ~1.2k-word vocabulary)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        make_world(d, seed=seed, n_entities=300)
        probes = [p for s in ("updated", "unchanged", "new") for p in read_probes(f"{d}/probes/{s}.jsonl")]
        tok = GPT2Tokenizer() if tokenizer == "gpt2" else WordTokenizer.load(f"{d}/tokenizer.json")
    probes = probes[:n_probes]
    model = GPT(GPTConfig(block_size=128, vocab_size=tok.n_vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head)).eval()
    hf = hf_model(model)
    n_tok = sum(len(span_example(tok, p.prompt, a)[0]) for p in probes for a in p.answers)
    print(f"model: {n_layer} layers, d={n_embd}, vocab {model.config.vocab_size}, "
          f"{model.num_params() / 1e6:.1f}M params; {len(probes)} probes, {n_tok} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    probe.score(model, tok, probes[:8])  # warm-up
    res, t_batched = timed(lambda: probe.score(model, tok, probes, batch_size=batch_size))
    ours = [r["nll"] for r in res]
    _, t_rows1 = timed(lambda: probe.score(model, tok, probes, batch_size=1))
    naive, t_naive = timed(lambda: one_by_one(model, tok, probes))
    hf_nll, t_hf = timed(lambda: hf_scores(hf, tok, probes, batch_size))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-probes", type=int, default=256, help="probes to score")
    ap.add_argument("--n-layer", type=int, default=4, help="transformer layers")
    ap.add_argument("--n-embd", type=int, default=256, help="model width")
    ap.add_argument("--n-head", type=int, default=4, help="attention heads")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per forward (batched and transformers)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the world")
    ap.add_argument("--tokenizer", choices=["gpt2", "word"], default="gpt2",
                    help="gpt2: GPT-2 BPE, 50k softmax; word: the world's small word vocabulary")
    args = ap.parse_args(argv)
    if min(args.n_probes, args.n_layer, args.batch_size) < 1 or args.n_embd % args.n_head:
        ap.error("sizes must be >= 1 and --n-embd divisible by --n-head")
    return bench_probe(args.n_probes, args.n_layer, args.n_embd, args.n_head, args.batch_size, args.seed, args.threads,
                       args.tokenizer)


if __name__ == "__main__":
    main()
