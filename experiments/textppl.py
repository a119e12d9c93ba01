"""Held-out text perplexity: how well a model still models plain text (the TemporalWiki driver's `val ppl`
column: forgetting beyond the probes). exp(mean NLL) of consecutive windows, scored by probe.py's scorer.

    python -m experiments.textppl --init runs/x --text runs/twiki/stage1/data/val.csv --json runs/x/val.json
"""
import json
import math
from dataclasses import asdict, dataclass

import data
import probe
from common import POS, check_output, flag, input_errors, parse_config, write_text
from model import pick_device, unwrap


@dataclass
class TextConfig:
    init: str = flag(None, "run folder, ckpt.pt, HF folder or hub name", required=True)
    text: str = flag(None, "held-out text: .txt, .csv, a folder (PATH@N: a prefix)", required=True)
    text_tokens: int = flag(65536, "tokens scored (from the start)", type=POS)
    tokenizer: str = flag(None, "data.load_tokenizer's (default: --init's)")
    json: str = flag(None, "also write {text_ppl, flags} to this JSON file")
    batch_size: int = flag(8, "windows per forward", type=POS)
    device: str = flag("auto", "cpu, cuda, mps or auto")


def text_ppl(model, tokens, n_tokens=65536, batch_size=8, device=None):
    """exp(mean NLL) of consecutive windows over the first n_tokens."""
    T = min(unwrap(model).config.block_size, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"--text: {len(tokens)} tokens, too few to score")
    x, y = data.windows(tokens, list(range(0, min(len(tokens), n_tokens + 1) - T, T)) or [0], T)
    nll, n, _ = map(sum, zip(*probe.score_rows(model, list(zip(x, y)), batch_size, device)))
    return math.exp(min(nll / n, 700.0))


def main(argv=None) -> float:
    cfg = parse_config(TextConfig, "experiments.textppl", __doc__, argv)
    with input_errors("experiments.textppl"):
        data.check_files([cfg.text], [])
        if cfg.json:
            check_output(cfg.json, "--json")
        device = pick_device(cfg.device)
        model, tok = probe.load_with_tokenizer(cfg.init, cfg.tokenizer, device)
        ppl = text_ppl(model, data.load_tokens(cfg.text, tok), cfg.text_tokens, cfg.batch_size, device)
        if cfg.json:
            write_text(cfg.json, json.dumps(dict(asdict(cfg), text_ppl=ppl), indent=1))
        print(f"text ppl: {ppl:.6g}")
    return ppl


if __name__ == "__main__":
    main()
