"""Score knowledge probes (perplexity and greedy exact match per split) and held-out text.

An answer's NLL = sum of -log p(token | prompt, earlier answer tokens); exact match: each is the argmax. A
probe counts its best answer (lowest NLL per token; exact match if any). Split perplexity = exp(total NLL /
total answer tokens).
"""
import json
import math

import torch

import data
from common import Parser, check_output, input_errors, write_text
from model import autocast, load_model, pick_device, unwrap

METRICS = ("span", "sentence")
MAX_TOKENS = 4096  # padded tokens per forward: GPT-2's fp32 logits < 0.8 GB

def probe_example(tokenizer, pr, answer, use_context, block_size, metric="span"):
    """(idx, targets): span scores the answer (the paper), sentence every token (TemporalWiki)."""
    if metric not in METRICS:
        raise ValueError(f"--metric {metric}: want span or sentence")
    prompt = f"{pr.context} {pr.prompt}".strip() if use_context and pr.context else pr.prompt
    idx, tgt = (data.span_example if metric == "span" else data.sentence_example)(tokenizer, prompt, answer)
    if len(idx) > block_size:
        raise ValueError(f"{pr.source + ': ' if pr.source else ''}probe {pr.id}: {len(idx)} tokens, "
                         f"longer than the model's context ({block_size})")
    return idx, tgt

def check_probes(tokenizer, probes, block_size, use_context=False, metric="span"):
    for pr in probes:
        for answer in pr.answers:
            probe_example(tokenizer, pr, answer, use_context, block_size, metric)

@torch.inference_mode()
def _score_all(model, examples, batch_size, device):
    """(nll, n_tokens, exact match) per (idx, targets), in order."""
    model, out = unwrap(model), {}
    device, was_training = device or next(model.parameters()).device, model.training
    todo = sorted(range(len(examples)), key=lambda k: len(examples[k][0]))
    model.eval()
    while todo:  # <= batch_size rows, <= MAX_TOKENS tokens; sorted: the last row is the longest
        n = max(1, min(batch_size, MAX_TOKENS // len(examples[todo[min(batch_size, len(todo)) - 1]][0])))
        x, y = data.collate([examples[k] for k in todo[:n]], device)  # (B, T); causal: padding changes no nll
        with autocast(device):
            logits, _ = model(x)  # (B, T, V)
        at = y != -1  # (B, T); the log-softmax only at these N target positions: (N, V)
        logp, t = logits[at].float().log_softmax(-1), y[at]
        nll = torch.zeros(y.shape, device=device).masked_scatter_(at, -logp.gather(1, t[:, None])[:, 0])
        hit = torch.ones_like(at).masked_scatter_(at, logp.argmax(-1) == t)
        out.update(zip(todo[:n], zip(nll.sum(1).tolist(), at.sum(1).tolist(), hit.all(1).tolist())))
        todo = todo[n:]
    model.train(was_training)
    return [out[k] for k in range(len(examples))]

def score(model, tokenizer, probes, batch_size=64, device=None, use_context=False, metric="span"):
    """Per probe: its best answer's (ties: the first) nll, n_tokens, nll_per_token, em."""
    block_size = unwrap(model).config.block_size
    owners = [(i, a) for i, pr in enumerate(probes) for a in pr.answers]
    examples = [probe_example(tokenizer, probes[i], a, use_context, block_size, metric) for i, a in owners]
    best, em = [(math.inf,)] * len(probes), [False] * len(probes)
    for k, ((i, _), (nll, n, hit)) in enumerate(zip(owners, _score_all(model, examples, batch_size, device))):
        best[i], em[i] = min(best[i], (nll / n, k, nll, n)), em[i] or hit
    return [dict(id=pr.id, split=pr.split, nll=b[2], n_tokens=b[3], nll_per_token=b[0], em=int(e))
            for pr, b, e in zip(probes, best, em)]

def summarize(results):  # {split: {"ppl", "em", "n"}}
    splits = {}
    for r in results:
        splits.setdefault(r["split"], []).append(r)
    return {split: dict(ppl=math.exp(min(sum(r["nll"] for r in rs) / sum(r["n_tokens"] for r in rs), 700.0)),
                        em=sum(r["em"] for r in rs) / len(rs), n=len(rs)) for split, rs in splits.items()}

def evaluate(model, tokenizer, probes, batch_size=64, device=None, use_context=False, metric="span"):
    return summarize(score(model, tokenizer, probes, batch_size, device, use_context, metric))

def text_ppl(model, tokens, n_tokens=65536, batch_size=8, device=None):
    """exp(mean next-token NLL) over consecutive context windows covering the first n_tokens."""
    T = min(unwrap(model).config.block_size, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"held-out text: {len(tokens)} tokens, too few to score")
    x, y = data.windows(tokens, list(range(0, min(len(tokens), n_tokens + 1) - T, T)) or [0], T)  # (N, T)
    nll, n, _ = map(sum, zip(*_score_all(model, list(zip(x, y)), batch_size, device)))
    return math.exp(min(nll / n, 700.0))

def main(argv=None):
    ap = Parser(description=__doc__)
    a = ap.add_argument
    a("--init", required=True, help="run folder, ckpt .pt, HF folder or hub name")
    a("--probes", nargs="+", default=[])
    a("--text", help="held-out text (PATH@N: a prefix)")
    a("--text-tokens", type=int, default=65536)
    a("--metric", choices=METRICS, default="span", help="span: the answer; sentence: all")
    a("--tokenizer", help="default: --init's")
    a("--json")
    a("--context", action="store_true", help="ECBD: prepend the probe's context")
    a("--batch-size", type=int, default=64)
    a("--device", default="auto")
    args = ap.parse_args(argv)
    if not (args.probes or args.text):
        ap.error("need --probes and/or --text")
    with input_errors("probe.py"):
        if args.json:
            check_output(args.json, "--json")
        device, probes = pick_device(args.device), data.read_probe_files(args.probes)
        model, tok = load_model(args.init, device), data.load_tokenizer(args.tokenizer or args.init)
        if tok.n_vocab > model.config.vocab_size:
            raise ValueError(f"tokenizer: {tok.n_vocab} tokens, model: {model.config.vocab_size}")
        results = score(model, tok, probes, args.batch_size, device, args.context, args.metric)
        out = dict(vars(args), summary=summarize(results))
        if args.text:
            tokens = data.load_tokens(args.text, tok)
            out["text_ppl"] = text_ppl(model, tokens, args.text_tokens, device=device)
        print(json.dumps(out, indent=1))
        if args.json:
            write_text(args.json, json.dumps(dict(out, results=results), indent=1))
    return out["summary"]

if __name__ == "__main__":
    main()
