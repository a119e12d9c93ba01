"""Held-out text perplexity: how well a model still models plain text (the TemporalWiki driver's `val ppl`
column: forgetting beyond the probes). exp(mean NLL) of consecutive windows, scored by probe.py's scorer.

    python -m experiments.textppl --init runs/x --text runs/twiki/stage1/data/val.csv --json runs/x/val.json
"""
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

import data
from experiments import probe_files
import probe
from common import POS, check_output, flag, input_errors, parse_config, write_text
from model import pick_device, unwrap


@dataclass
class TextConfig:
    init: str = flag(None, "run folder, ckpt.pt, HF folder or hub name", required=True)
    text: str = flag(None, "held-out text: .txt, .csv, a folder (PATH@N: a prefix)", required=True)
    text_tokens: int = flag(65536, "tokens scored (from the start)", type=POS)
    tokenizer: str = flag(None, "data.load_tokenizer's (default: --init's)")
    json: str = flag(None, "also write {text_ppl, scored_tokens, unk_tokens, flags} to this JSON file")
    batch_size: int = flag(8, "windows per forward", type=POS)
    device: str = flag("auto", "cpu, cuda, mps or auto")


def text_ppl(model, tokens, n_tokens=65536, batch_size=8, device=None):
    """exp(mean NLL) of the first n_tokens targets (fewer if the text is shorter), in consecutive windows of
    the model's context; the last window is cut to end exactly there. -> (ppl, targets scored)"""
    T, n = unwrap(model).config.block_size, min(n_tokens, len(tokens) - 1)
    if n < 1:
        raise ValueError(f"--text: {len(tokens)} tokens, too few to score")
    rows = [(tokens[s:min(s + T, n)].astype(np.int64), tokens[s + 1:min(s + T, n) + 1].astype(np.int64))
            for s in range(0, n, T)]  # (inputs, targets) of each window
    nll, scored, _ = map(sum, zip(*probe.score_rows(model, rows, batch_size, device)))
    return math.exp(min(nll / scored, 700.0)), scored


def check_known(tokens, tok, spec):
    """A word vocabulary reads unknown words as <unk>: a text of nothing else would score <unk>'s ppl."""
    unk = getattr(tok, "unk", None)
    if unk is not None and not set(np.unique(tokens).tolist()) - {unk, tok.eot}:
        raise ValueError(f"--text {spec}: only unknown words (<unk>) to the word vocabulary of the model: "
                         "score text in its language, or build the vocabulary from it")
    return int(np.count_nonzero(tokens == unk)) if unk is not None else 0


def main(argv=None) -> float:
    cfg = parse_config(TextConfig, "experiments.textppl", __doc__, argv)
    with input_errors("experiments.textppl"):
        probe_files.check_files([cfg.text], [])
        if cfg.json:
            check_output(cfg.json, "--json")
        device = pick_device(cfg.device)
        model, tok = probe.load_with_tokenizer(cfg.init, cfg.tokenizer, device)
        tokens = data.load_tokens(cfg.text, tok)
        unk = check_known(tokens[:cfg.text_tokens + 1], tok, cfg.text)
        ppl, scored = text_ppl(model, tokens, cfg.text_tokens, cfg.batch_size, device)
        if cfg.json:  # text_tokens: asked; scored_tokens: scored (fewer only if the text is shorter)
            write_text(cfg.json, json.dumps(dict(asdict(cfg), text_ppl=ppl, scored_tokens=scored,
                                                 unk_tokens=unk), indent=1))
        print(f"text ppl: {ppl:.6g} ({scored:,} tokens scored{f', {unk:,} of them <unk>' if unk else ''})")
    return ppl


if __name__ == "__main__":
    main()
