"""Score knowledge probes (answer-span perplexity and greedy exact match per split) and held-out text.

    python probe.py --init runs/t0 --probes data/world/probes/updated.jsonl data/world/probes/new.jsonl
    python probe.py --init gpt2 --probes changed.csv --metric sentence --json out.json
    python probe.py --init runs/t1 --text heldout.csv@200000

Per answer: NLL = sum of -log p(answer token | prompt, earlier answer tokens); exact match = the argmax is
the answer token at every answer position. A probe counts its best answer (lowest NLL per token), exact
match if any answer matches. Split perplexity = exp(total NLL / total answer tokens).
"""
import argparse
import json
import math

import torch

from common import Parser, check_output, input_errors, write_text
from data import collate, load_tokenizer, load_tokens, read_probe_files, sentence_example, span_example, windows
from model import autocast, load_model, pick_device, unwrap

METRICS = ("span", "sentence")
MAX_TOKENS = 4096  # padded tokens per forward: GPT-2's (B, T, V) logits are then at most 0.8 GB in fp32

def probe_example(tokenizer, pr, answer, use_context, block_size, metric="span"):
    """(idx, targets) of a (probe, answer); a ValueError if too long (the one length rule: train.py checks
    every probe with it at start). span: the answer tokens (the paper); sentence: all (TemporalWiki's)."""
    if metric not in METRICS:
        raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    prompt = f"{pr.context} {pr.prompt}".strip() if use_context and pr.context else pr.prompt
    idx, tgt = (span_example if metric == "span" else sentence_example)(tokenizer, prompt, answer)
    if len(idx) > block_size:
        raise ValueError(f"{pr.source + ': ' if pr.source else ''}probe {pr.id}: prompt + answer is {len(idx)} "
                         f"tokens, longer than the model's context ({block_size})")
    return idx, tgt

def check_probes(tokenizer, probes, block_size, use_context=False, metric="span"):
    for pr in probes:
        for answer in pr.answers:
            probe_example(tokenizer, pr, answer, use_context, block_size, metric)

def _score_batch(model, examples, device):
    """(nll, n_tokens, exact match) per (idx, targets) example, one forward. Rows are right-padded (target
    -1): in a causal model no real position sees the padding after it."""
    x, y = collate(examples, device)  # (B, T) each
    with autocast(device):
        logits, _ = model(x)  # (B, T, V)
    at = y != -1  # (B, T); the log-softmax only at these N target positions: (N, V)
    logp, t = logits[at].float().log_softmax(-1), y[at]
    nll = torch.zeros(y.shape, device=device).masked_scatter_(at, -logp.gather(1, t[:, None])[:, 0])
    hit = torch.ones_like(at).masked_scatter_(at, logp.argmax(-1) == t)
    return zip(nll.sum(1).tolist(), at.sum(1).tolist(), hit.all(1).tolist())

@torch.inference_mode()
def _score_all(model, examples, batch_size, device):
    """_score_batch's triples for every example, in order. Sorted by length, a batch (<= batch_size rows,
    <= MAX_TOKENS padded tokens) has little padding."""
    model = unwrap(model)  # the GPT inside a compiled / DDP wrapper
    device, was_training, out = device or next(model.parameters()).device, model.training, [None] * len(examples)
    todo = sorted(range(len(examples)), key=lambda k: len(examples[k][0]))
    model.eval()
    while todo:  # the batch_size-th example (or the last) is at least as long as any in the batch
        n = max(1, min(batch_size, MAX_TOKENS // len(examples[todo[min(batch_size, len(todo)) - 1]][0])))
        for k, r in zip(todo[:n], _score_batch(model, [examples[k] for k in todo[:n]], device)):
            out[k] = r
        todo = todo[n:]
    model.train(was_training)
    return out

def score(model, tokenizer, probes, batch_size=64, device=None, use_context=False, metric="span"):
    """Per probe {"id","split","nll","n_tokens","nll_per_token","em"} of its best answer (ties: the first);
    use_context prepends probe.context (ECBD definitions)."""
    block_size, owners = unwrap(model).config.block_size, [(i, a) for i, pr in enumerate(probes) for a in pr.answers]
    examples = [probe_example(tokenizer, probes[i], a, use_context, block_size, metric) for i, a in owners]
    best, em = [(math.inf,)] * len(probes), [False] * len(probes)
    for k, ((i, _), (nll, ntok, hit)) in enumerate(zip(owners, _score_all(model, examples, batch_size, device))):
        best[i], em[i] = min(best[i], (nll / ntok, k, nll, ntok)), em[i] or hit
    return [{"id": pr.id, "split": pr.split, "nll": b[2], "n_tokens": b[3], "nll_per_token": b[0], "em": int(e)}
            for pr, b, e in zip(probes, best, em)]

def summarize(results):
    """{split: {"ppl", "em", "n"}}; ppl = exp(total answer NLL / total answer tokens)."""
    out = {}
    for split in dict.fromkeys(r["split"] for r in results):
        rs = [r for r in results if r["split"] == split]
        nll, ntok = sum(r["nll"] for r in rs), sum(r["n_tokens"] for r in rs)
        out[split] = {"ppl": math.exp(min(nll / ntok, 700.0)), "em": sum(r["em"] for r in rs) / len(rs), "n": len(rs)}
    return out

def evaluate(model, tokenizer, probes, batch_size=64, device=None, use_context=False, metric="span"):
    return summarize(score(model, tokenizer, probes, batch_size, device, use_context, metric))

def text_ppl(model, tokens, n_tokens=65536, batch_size=8, device=None) -> float:
    """exp(mean next-token NLL) over the consecutive context windows that cover the first n_tokens tokens."""
    T = min(unwrap(model).config.block_size, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"held-out text has {len(tokens)} tokens: too few to score")
    x, y = windows(tokens, list(range(0, min(len(tokens), n_tokens + 1) - T, T)) or [0], T)  # (N, T) each
    rows = _score_all(model, list(zip(x, y)), batch_size, device)
    return math.exp(min(sum(r[0] for r in rows) / sum(r[1] for r in rows), 700.0))

def format_table(summary):
    lines = [f"{'split':<16} {'n':>6} {'ppl':>10} {'em':>7}"]
    for split in summary:
        s = summary[split]
        lines.append(f"{split:<16} {s['n']:>6} {s['ppl']:>10.3f} {s['em']:>7.3f}")
    return "\n".join(lines)

def main(argv=None):
    ap = Parser(prog="probe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--init", required=True, help="run folder, ckpt .pt, local HF folder or hub name of the model to score")
    a("--probes", nargs="+", default=[], help="probe files (.jsonl TempLAMA/ECBD, .csv TemporalWiki, .tsv)")
    a("--text", help="also the perplexity of this held-out text (file, folder, CSV; PATH@N for a prefix)")
    a("--text-tokens", type=int, default=65536, help="--text: tokens scored (consecutive context windows)")
    a("--metric", choices=METRICS, default="span", help="span: perplexity of the answer given the prompt "
      "(the paper's); sentence: of the whole 'subject relation object' sentence (TemporalWiki's scorer)")
    a("--tokenizer", help="'gpt2' or a tokenizer.json; default: from --init")
    a("--json", help="write summary and per-probe results to this JSON file")
    a("--context", action="store_true", help="prepend each probe's context (ECBD definition)")
    a("--batch-size", type=int, default=64, help="(probe, answer) rows per forward pass")
    a("--device", default="auto", help="cpu, cuda, mps or auto")
    args = ap.parse_args(argv)
    if not (args.probes or args.text) or min(args.batch_size, args.text_tokens) < 1:
        ap.error("need --probes and/or --text; --batch-size and --text-tokens must be >= 1")
    with input_errors("probe.py"):
        if args.json:
            check_output(args.json, "--json")  # before the slow part
        device = pick_device(args.device)
        probes = read_probe_files(args.probes)  # same-named splits of two files never merge
        model = load_model(args.init, device)  # first: a wrong --init is the likelier mistake
        tokenizer = load_tokenizer(args.tokenizer or args.init)
        if tokenizer.n_vocab > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_vocab} tokens, the model only {model.config.vocab_size}")
        results = score(model, tokenizer, probes, args.batch_size, device, args.context, args.metric)
        out = dict(init=args.init, probes=args.probes, context=args.context, metric=args.metric,
                   summary=summarize(results))
        if results:
            print(f"{args.metric} perplexity and exact match per split:\n" + format_table(out["summary"]))
        if args.text:
            out.update(text=args.text, text_ppl=text_ppl(model, load_tokens(args.text, tokenizer), args.text_tokens,
                                                         device=device))
            print(f"held-out text perplexity of {args.text}: {out['text_ppl']:.3f}")
        if args.json:
            write_text(args.json, json.dumps(dict(out, results=results), indent=1))
    return out["summary"]

if __name__ == "__main__":
    main()
