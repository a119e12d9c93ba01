"""Score knowledge probes: answer-span perplexity and greedy exact match, per split.

    python probe.py --init runs/t0 --probes data/world/probes/updated.jsonl data/world/probes/new.jsonl
    python probe.py --init gpt2 --probes ../shared/data/twiki_probes/0801-0901_changed.csv --json out.json
    python probe.py --init runs/t1 --text heldout.csv@200000        # held-out corpus perplexity
    python probe.py --init gpt2 --probes changed.csv --metric sentence  # TemporalWiki's own metric

How a probe counts. Per answer: NLL = sum over the answer tokens of -log p(token | prompt,
earlier answer tokens), teacher-forced. With several gold answers (TempLAMA), every answer
is scored and the best one (lowest NLL per token) gives the probe's nll/n_tokens; exact match
is 1 when greedy decoding reproduces any gold answer, i.e. the argmax at every position of
some answer is that answer's token. Split perplexity = exp(total NLL / total answer tokens).

How it is fast. Probes are grouped by prompt tokens; one row holds the prompt once followed
by each answer (tree packing: an answer attends to the prompt and to itself only, and its
positions restart where the prompt ends), so several answers or several probes with the same
prompt share one prompt computation. Rows are sorted by length (little padding), and the LM
head runs only at the answer positions, not at every position of every row. Runs side by side:
python -m experiments.compare.
"""
import argparse
import json
import math

import torch

from data import read_probe_files, sentence_example, span_example, windows
from common import Parser, check_output, input_errors, write_text


METRICS = ("span", "sentence")


def probe_example(tokenizer, pr, answer, use_context, block_size, metric="span"):
    """(idx, targets) of one (probe, answer), or a ValueError if it does not fit the model's context.
    The one length rule: probe.py checks it while scoring, train.py for every probe file at start.
    metric span: the answer tokens given the prompt (the paper); sentence: every token of
    'prompt answer' (TemporalWiki's scorer, whose numbers are then comparable)."""
    prompt = f"{pr.context} {pr.prompt}".strip() if use_context and pr.context else pr.prompt
    if metric not in METRICS:
        raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    idx, tgt = (span_example if metric == "span" else sentence_example)(tokenizer, prompt, answer)
    if len(idx) > block_size:
        raise ValueError(f"{pr.source + ': ' if pr.source else ''}probe {pr.id}: prompt + answer is {len(idx)} tokens, "
                         f"longer than the model's context ({block_size})")
    return idx, tgt


def check_probes(tokenizer, probes, block_size, use_context=False, metric="span"):
    for pr in probes:
        for answer in pr.answers:
            probe_example(tokenizer, pr, answer, use_context, block_size, metric)


def _rows(tokenizer, probes, use_context, block_size, metric="span"):
    """Packed rows: list of (tokens, positions, segments, answers) where answers is a list of
    (gather positions, target tokens, probe indices). Identical (prompt, answer) pairs of
    different probes are scored once."""
    groups = {}  # prompt tokens -> {answer tokens: [probe indices]}
    for i, pr in enumerate(probes):
        for ans in pr.answers:
            idx, tgt = probe_example(tokenizer, pr, ans, use_context, block_size, metric)
            n_prompt = next(j for j, t in enumerate(tgt) if t != -1) + 1
            groups.setdefault(tuple(idx[:n_prompt]), {}).setdefault(tuple(tgt[n_prompt - 1:]), []).append(i)
    rows = []
    for prompt, answers in groups.items():
        L = len(prompt)
        row = None
        for ans, owners in answers.items():
            if row is None or len(row[0]) + len(ans) - 1 > block_size:  # full: start another row
                row = (list(prompt), list(range(L)), [0] * L, [])
                rows.append(row)
            start, seg = len(row[0]), len(row[3]) + 1
            row[0].extend(ans[:-1])  # the last answer token is only a target, never an input
            row[1].extend(range(L, L + len(ans) - 1))
            row[2].extend([seg] * (len(ans) - 1))
            row[3].append(([L - 1] + list(range(start, start + len(ans) - 1)), list(ans), owners))
    return rows


def _token_nll(lm_head, h, targets, chunk=128):
    """Per row of h (N, C): -log p(target) and whether the target is the argmax. The LM head
    runs only on these rows, `chunk` at a time, so the (chunk, V) logits stay cache-sized."""
    nll, ok = [], []
    for i in range(0, len(h), chunk):
        logits = lm_head(h[i:i + chunk]).float()  # (n, V)
        t = targets[i:i + chunk]
        nll.append(torch.logsumexp(logits, -1) - logits.gather(1, t[:, None]).squeeze(1))
        ok.append(logits.argmax(-1) == t)
    return torch.cat(nll), torch.cat(ok)


def score(model, tokenizer, probes, batch_size=64, device=None, use_context=False, metric="span"):
    """Per probe {"id","split","nll","n_tokens","nll_per_token","em"} (best gold answer).
    batch_size counts packed rows; use_context prepends probe.context (ECBD definitions);
    metric: span (the answer tokens) or sentence (every token, see probe_example)."""
    from model import autocast, unwrap
    model = unwrap(model)  # the GPT inside a compiled / DDP wrapper
    device = device or next(model.parameters()).device
    rows = sorted(_rows(tokenizer, probes, use_context, model.config.block_size, metric), key=lambda r: len(r[0]))
    best = [None] * len(probes)  # (nll per token, nll, n_tokens)
    em = [0] * len(probes)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(rows), batch_size):
                chunk = rows[b:b + batch_size]
                T = max(len(r[0]) for r in chunk)
                idx = torch.zeros(len(chunk), T, dtype=torch.long)
                pos = torch.zeros(len(chunk), T, dtype=torch.long)
                seg = torch.full((len(chunk), T), -1, dtype=torch.long)  # -1 = padding
                rb, rt, tg, aid = [], [], [], []  # row, position, target, answer number
                answers = []
                for i, (toks, p, s, ans) in enumerate(chunk):
                    idx[i, :len(toks)], pos[i, :len(toks)], seg[i, :len(toks)] = map(torch.tensor, (toks, p, s))
                    for gather, target, owners in ans:
                        rb += [i] * len(gather)
                        rt += gather
                        tg += target
                        aid += [len(answers)] * len(gather)
                        answers.append(owners)
                mask = None  # one answer per row: plain causal attention (faster kernel)
                if seg.max() > 1:
                    causal = torch.ones(T, T, dtype=torch.bool).tril()
                    mask = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0))  # (B, T, T)
                    mask = mask.to(device)
                tg = torch.tensor(tg, device=device)
                aid = torch.tensor(aid, device=device)
                with autocast(str(device)):
                    h = model.hidden(idx.to(device), pos.to(device), mask)  # (B, T, C)
                    at = (torch.tensor(rb, device=device), torch.tensor(rt, device=device))
                    tok_nll, tok_ok = _token_nll(model.lm_head, h[at], tg)  # answer positions only
                nll = torch.zeros(len(answers), device=device).index_add_(0, aid, tok_nll).tolist()
                ntok = torch.zeros(len(answers), device=device).index_add_(0, aid, torch.ones_like(tok_nll)).tolist()
                nok = torch.zeros(len(answers), device=device).index_add_(0, aid, tok_ok.float()).tolist()
                for a, owners in enumerate(answers):
                    for i in owners:
                        cand = (nll[a] / ntok[a], nll[a], int(ntok[a]))
                        if best[i] is None or cand[0] < best[i][0]:
                            best[i] = cand
                        em[i] |= int(nok[a] == ntok[a])
    finally:
        model.train(was_training)
    return [{"id": pr.id, "split": pr.split, "nll": bst[1], "n_tokens": bst[2], "nll_per_token": bst[0], "em": e}
            for pr, bst, e in zip(probes, best, em)]


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


@torch.inference_mode()
def text_ppl(model, tokens, n_tokens=65536, batch_size=8, device=None) -> float:
    """Held-out text perplexity: exp(mean next-token NLL) over consecutive, non-overlapping windows of
    the model's context covering the first n_tokens tokens of `tokens` (the same windows every time)."""
    from model import autocast, unwrap
    model = unwrap(model)
    device = device or next(model.parameters()).device
    T = min(model.config.block_size, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"held-out text has {len(tokens)} tokens: too few to score")
    starts = list(range(0, min(len(tokens), n_tokens + 1) - T, T)) or [0]
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    try:
        for b in range(0, len(starts), batch_size):
            x, y = windows(tokens, starts[b:b + batch_size], T)  # (B, T) each
            with autocast(str(device)):
                _, loss = model(x.to(device), y.to(device))  # mean NLL over the B * T targets
            total, count = total + loss.float().item() * y.numel(), count + y.numel()
    finally:
        model.train(was_training)
    return math.exp(min(total / count, 700.0))

# ----------------------------------------------------------------------------- reports


ORDER = ("updated", "new", "unchanged", "changed")  # the paper's splits first, then the rest as read


def ordered(splits):
    splits = list(dict.fromkeys(splits))
    return sorted(splits, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), splits.index(s)))


def format_table(summary):
    lines = [f"{'split':<16} {'n':>6} {'ppl':>10} {'em':>7}"]
    for split in ordered(summary):
        s = summary[split]
        lines.append(f"{split:<16} {s['n']:>6} {s['ppl']:>10.3f} {s['em']:>7.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = Parser(prog="probe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--init", help="run folder, ckpt .pt, local HF folder or hub name of the model to score")
    a("--probes", nargs="+", default=[], help="probe files (.jsonl TempLAMA/ECBD, .csv TemporalWiki, .tsv)")
    a("--text", help="also score the corpus perplexity of this held-out text (file, folder, CSV; PATH@N for a prefix)")
    a("--text-tokens", type=int, default=65536, help="--text: tokens scored (consecutive windows of the context)")
    a("--metric", choices=METRICS, default="span", help="span: perplexity of the answer given the prompt (the "
      "paper's); sentence: of the whole 'subject relation object' sentence (TemporalWiki's own scorer)")
    a("--tokenizer", default=None, help="tokenizer ('gpt2' or tokenizer.json); default: from --init")
    a("--json", default=None, help="write summary and per-probe results to this JSON file")
    a("--context", action="store_true", help="prepend each probe's context (ECBD definition)")
    a("--batch-size", type=int, default=64, help="packed rows per forward pass")
    a("--device", default="auto", help="cpu, cuda, mps or auto")
    args = ap.parse_args(argv)
    if not args.init or not (args.probes or args.text):
        ap.error("need --init and --probes and/or --text")
    if args.batch_size < 1 or args.text_tokens < 1:
        ap.error("--batch-size and --text-tokens must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    with input_errors("probe.py"):
        if args.json:
            check_output(args.json, "--json")  # before the slow part
        from data import load_tokenizer, load_tokens
        from model import load_model, pick_device
        device = pick_device(args.device)
        probes = read_probe_files(args.probes)  # same-named splits of two files never merge
        model = load_model(args.init, device)  # first: a wrong --init is the likelier mistake
        tokenizer = load_tokenizer(args.tokenizer or args.init)
        if tokenizer.n_vocab > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_vocab} tokens, the model only {model.config.vocab_size}")
        results = score(model, tokenizer, probes, args.batch_size, device, args.context, args.metric) if probes else []
        summary = summarize(results)
        out = {"init": args.init, "probes": args.probes, "context": args.context, "metric": args.metric, "summary": summary}
        if summary:
            print(f"{args.metric} perplexity and exact match per split:\n" + format_table(summary))
        if args.text:
            out["text"], out["text_ppl"] = args.text, text_ppl(model, load_tokens(args.text, tokenizer), args.text_tokens, device=device)
            print(f"held-out text perplexity of {args.text}: {out['text_ppl']:.3f}")
        if args.json:
            write_text(args.json, json.dumps(dict(out, results=results), indent=1))
    return summary


if __name__ == "__main__":
    main()
