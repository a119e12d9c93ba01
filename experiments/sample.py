"""Sample text from any model: read what a base model and a continually pretrained run now say.

    python -m experiments.sample --init out/demo/seed0/base --prompt "The builders of Nuheino used"
    python -m experiments.sample --init out/demo/seed0/runs/full+fp --prompt "The builders of Nuheino used"
    python -m experiments.sample --init gpt2 --prompt "The river" --temperature 0.8 --top-k 40 --seed 1

Greedy by default: the same text every call, the likeliest token at each step (what probe.py's exact
match asks of an answer). --temperature > 0 samples instead, --top-k from the k likeliest tokens only,
--seed fixes the draw. The model is model.GPT.generate's; --init and --tokenizer are read as probe.py
reads them (probe.load_with_tokenizer).
"""
import re
import sys
from dataclasses import dataclass

import torch

import data
import probe
from common import POS, flag, input_errors, number, parse_config
from model import pick_device, unwrap

PROG = "experiments.sample"


@dataclass
class SampleConfig:
    init: str = flag(None, "run folder, ckpt.pt, HF folder or hub name", required=True)
    prompt: str = flag(None, "the text to continue ('': from a document's start)", required=True)
    max_new_tokens: int = flag(30, "tokens to generate", type=POS)
    temperature: float = flag(0.0, "0: greedy; > 0: sample from softmax(logits / T)", type=number("[0, inf)"))
    top_k: int = flag(None, "sample from the k likeliest tokens only (with --temperature > 0)", type=POS)
    seed: int = flag(0, "the sampling seed (no effect when greedy)")
    tokenizer: str = flag(None, "data.load_tokenizer's (default: --init's)")
    device: str = flag("auto", "cpu, cuda, mps or auto")


def decode(tokenizer, ids) -> str:
    """Token ids -> text, with a leading space where the text would have one after a prompt."""
    if hasattr(tokenizer, "decode"):  # another family's BPE (experiments/hf_tokenizer.py)
        return tokenizer.decode(ids)
    if isinstance(tokenizer, data.GPT2Tokenizer):
        return tokenizer.enc.decode(ids)  # BPE tokens carry their own spaces
    # a word vocabulary lost the spacing: a space before each word, none before punctuation
    return "".join(w if re.fullmatch(r"[.,;:!?)]", w) else " " + w for w in (tokenizer.vocab[i] for i in ids))


def sample(model, tokenizer, prompt: str, max_new_tokens=30, temperature=0.0, top_k=None, seed=0) -> str:
    """The model's continuation of `prompt`, as text (greedy by default)."""
    model = unwrap(model)
    device = next(model.parameters()).device
    ids = ([] if tokenizer.bos is None else [tokenizer.bos]) + tokenizer.encode(prompt)  # BOS as the family's
    ids = ids or [tokenizer.eot]  # nothing to continue: start a document
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, generator)
    return decode(tokenizer, out[0, len(ids):].tolist())


def main(argv=None) -> str:
    cfg = parse_config(SampleConfig, PROG, __doc__, argv)
    with input_errors(PROG):
        if cfg.top_k is not None and cfg.temperature == 0:
            raise ValueError(f"--top-k {cfg.top_k}: needs --temperature > 0 (0: greedy)")
        model, tok = probe.load_with_tokenizer(cfg.init, cfg.tokenizer, pick_device(cfg.device))
        unknown = getattr(tok, "unk", None)
        if unknown is not None and unknown in tok.encode(cfg.prompt):
            print(f"{PROG}: note: words of --prompt outside the vocabulary read as <unk>", file=sys.stderr)
        text = sample(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed)
    print(cfg.prompt + text if cfg.prompt else text.lstrip())
    return text


if __name__ == "__main__":
    main()
