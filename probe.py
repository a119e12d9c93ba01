"""Score knowledge probes: perplexity and greedy exact match per split.

A probe counts its best answer (lowest NLL per token; exact match if any); ppl = exp(NLL / tokens).
"""
import json
import math
from dataclasses import asdict, dataclass

import torch

import data
from checkpoint import load_model
from common import POS, check_output, flag, input_errors, parse_config, write_text
from experiments import probe_files  # the data sets' probe files
from model import autocast, pick_device, unwrap

METRICS = ("span", "sentence")
MAX_TOKENS = 4096  # padded tokens per forward: GPT-2's fp32 logits < 0.8 GB

@dataclass
class ProbeConfig:
    init: str = flag(None, "run folder, ckpt.pt, HF folder or hub name", required=True)
    probes: list = flag([], "probe files (see probe_files.read_probes)", nargs="+", required=True)
    metric: str = flag("span", "score the answer span (paper) or sentence", choices=METRICS)
    tokenizer: str = flag(None, "data.load_tokenizer's (default: --init's)")
    json: str = flag(None, "also write the results to this JSON file")
    batch_size: int = flag(64, f"answers per forward (at most {MAX_TOKENS} tokens)", type=POS)
    device: str = flag("auto", "cpu, cuda, mps or auto")

def probe_example(tokenizer, pr, answer, block_size, metric="span"):
    """(idx, targets): span: the answer (paper); sentence: every token (TemporalWiki)."""
    if metric not in METRICS:
        raise ValueError(f"--metric {metric}: want span or sentence")
    example = data.span_example if metric == "span" else data.sentence_example
    idx, tgt = example(tokenizer, pr.prompt, answer)
    where = f"{pr.source + ': ' if pr.source else ''}probe {pr.id}"
    if len(idx) > block_size:
        raise ValueError(f"{where}: {len(idx)} tokens, longer than the model's context ({block_size})")
    if {*tokenizer.encode(answer)} == {getattr(tokenizer, "unk", None)}:  # <unk>'s score, not the fact's
        raise ValueError(f"{where}: {answer!r} is only <unk> (unknown words): drop the probe")
    return idx, tgt

def check_probes(tokenizer, probes, block_size, metric="span"):
    owners = [(i, a) for i, pr in enumerate(probes) for a in pr.answers]
    return owners, [probe_example(tokenizer, probes[i], a, block_size, metric) for i, a in owners]

@torch.inference_mode()
def score_rows(model, examples, batch_size, device):
    """(nll, n_tokens, em) per (idx, targets), in order."""
    model, out = unwrap(model), {}
    device, was_training = device or next(model.parameters()).device, model.training
    # shortest first: rows of similar length share a batch, so little of it is padding
    todo = sorted(range(len(examples)), key=lambda k: len(examples[k][0]))
    model.eval()
    while todo:
        # as many rows as fit MAX_TOKENS padded tokens; the batch's last row is its longest (sorted)
        longest = len(examples[todo[min(batch_size, len(todo)) - 1]][0])
        n = max(1, min(batch_size, MAX_TOKENS // longest))
        x, y = data.collate([examples[k] for k in todo[:n]], device)  # (B, T); causal: padding changes no nll
        with autocast(device):
            logits, _ = model(x)  # (B, T, V)
        at = y != -1  # (B, T): the N target positions; log-softmax there only (V is large)
        logp, t = logits[at].float().log_softmax(-1), y[at]  # (N, V), (N,)
        nll = torch.zeros(y.shape, device=device).masked_scatter_(at, -logp.gather(1, t[:, None])[:, 0])
        # greedy exact match: every target token is the argmax (non-targets count as hits)
        hit = torch.ones_like(at).masked_scatter_(at, logp.argmax(-1) == t)
        out.update(zip(todo[:n], zip(nll.sum(1).tolist(), at.sum(1).tolist(), hit.all(1).tolist())))
        todo = todo[n:]
    model.train(was_training)
    return [out[k] for k in range(len(examples))]

def score(model, tokenizer, probes, batch_size=64, device=None, metric="span"):
    """Per probe: its best answer's (ties: the first) nll, n_tokens, nll_per_token, em."""
    owners, examples = check_probes(tokenizer, probes, unwrap(model).config.block_size, metric)
    rows = score_rows(model, examples, batch_size, device)  # one per (probe, gold answer)
    best = [(math.inf,)] * len(probes)  # per probe: (nll per token, row, nll, n_tokens) of its best answer
    em = [False] * len(probes)
    for row, ((i, _), (nll, n, hit)) in enumerate(zip(owners, rows)):
        best[i] = min(best[i], (nll / n, row, nll, n))  # equal nll per token: the earlier row wins
        if hit:  # a probe is an exact match if any of its gold answers is
            em[i] = True
    return [dict(id=pr.id, split=pr.split, nll=b[2], n_tokens=b[3], nll_per_token=b[0], em=int(e))
            for pr, b, e in zip(probes, best, em)]

def summarize(results):  # {split: {"ppl", "em", "n"}}
    splits = {}
    for r in results:
        splits.setdefault(r["split"], []).append(r)
    return {split: dict(ppl=math.exp(min(sum(r["nll"] for r in rs) / sum(r["n_tokens"] for r in rs), 700.0)),
                        em=sum(r["em"] for r in rs) / len(rs), n=len(rs)) for split, rs in splits.items()}

def evaluate(model, tokenizer, probes, batch_size=64, device=None, metric="span"):
    return summarize(score(model, tokenizer, probes, batch_size, device, metric))

def table(summary):
    w = max([5, *map(len, summary)])
    rows = [f"{k:<{w}} {s['n']:>6} {s['ppl']:>10.6g} {100 * s['em']:>6.1f}" for k, s in summary.items()]
    head = [f"{'split':<{w}}      n        ppl   EM %"] if rows else []
    return "\n".join(head + rows)

def load_with_tokenizer(init: str, tokenizer: str | None, device):
    """--init's model and the tokenizer for its text (--tokenizer, else --init's), checked to fit."""
    model, tok = load_model(init, device), data.load_tokenizer(tokenizer or init)
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"--tokenizer: {tok.n_vocab} tokens, the model {model.config.vocab_size}")
    return model, tok

def main(argv=None):
    cfg = parse_config(ProbeConfig, "probe.py", __doc__, argv)
    with input_errors("probe.py"):
        if cfg.json:
            check_output(cfg.json, "--json")
        device, probes = pick_device(cfg.device), probe_files.read_probe_files(cfg.probes)
        model, tok = load_with_tokenizer(cfg.init, cfg.tokenizer, device)
        results = score(model, tok, probes, cfg.batch_size, device, cfg.metric)
        out = dict(asdict(cfg), summary=summarize(results))
        if cfg.json:
            write_text(cfg.json, json.dumps(dict(out, results=results), indent=1))
        print(table(out["summary"]))
    return out["summary"]

if __name__ == "__main__":
    main()
