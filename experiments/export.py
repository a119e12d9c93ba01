"""Export a model to the Hugging Face layout: config.json + model.safetensors (LoRA merged) + the tokenizer
files, loadable by transformers' AutoModelForCausalLM / AutoTokenizer with the same logits and token ids.

    python -m experiments.export --init runs/lora --out runs/lora/hf              # tokenizer from the run
    python -m experiments.export --init gpt2 --tokenizer gpt2 --out hf/gpt2 --overwrite

model.py reads such a folder back (--init FOLDER anywhere in the project).
"""
import argparse
import copy
import json
import os

import torch

from common import Parser, atomic_path, input_errors, write_text
from data import load_tokenizer
from model import CONV1D, HF_NAMES, ST_DTYPES, GPT, load_model, merge_lora

# what an export writes; --overwrite removes these first, so that no file of an earlier export (a word
# vocabulary's tokenizer.json next to GPT-2's vocab.json, say) is read in place of the new one
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
         "special_tokens_map.json")


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """The format model.read_safetensors reads, written atomically. Tensors must be F32, F16 or BF16."""
    names = {v: k for k, v in ST_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written (F32, F16, BF16 only)")
        t = t.detach().cpu().contiguous()
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(blobs[-1])])
        offset += len(blobs[-1])
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so that the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        f.writelines(blobs)


def save_hf(model: GPT, folder):
    """config.json + model.safetensors, laid out as current transformers writes them. The model itself
    keeps its adapters: a merged copy is written."""
    c = model.config
    if getattr(model, "lora", None):
        model = merge_lora(copy.deepcopy(model))
    sd = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    layers = c.attention_layers or ["global"] * c.n_layer
    cfg = {hf: getattr(c, ours) for ours, hf in HF_NAMES.get(c.arch, {}).items()}
    if c.arch == "gpt2" and c.qkv_bias and "local" not in layers:
        sd = {k: v.t() if k.endswith(CONV1D) else v for k, v in sd.items()}  # GPT-2's Conv1D: (in, out)
        cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                   attn_pdrop=c.dropout, embd_pdrop=c.dropout, resid_pdrop=c.dropout)
    elif c.arch == "gpt_neo" and not c.qkv_bias and not c.scale_attn:
        for i in range(c.n_layer):  # our c_attn (q, k, v stacked) -> GPT-Neo's separate q, k, v
            p = f"transformer.h.{i}.attn."
            for part, t in zip("qkv", sd.pop(p + "c_attn.weight").split(c.n_embd)):
                sd[f"{p}attention.{part}_proj.weight"] = t
            for kind in ("weight", "bias"):
                sd[f"{p}attention.out_proj.{kind}"] = sd.pop(f"{p}c_proj.{kind}")
        cfg.update(architectures=["GPTNeoForCausalLM"], model_type="gpt_neo", attention_types=[[layers, 1]],
                   embed_dropout=c.dropout, attention_dropout=c.dropout, resid_dropout=c.dropout)
    else:
        raise ValueError(f"no Hugging Face model matches arch={c.arch}, qkv_bias={c.qkv_bias}, "
                         f"scale_attn={c.scale_attn}, attention_layers={c.attention_layers}")
    # the GPT-2 BPE's <|endoftext|> is 50256; another vocabulary must say "none", or transformers
    # fills in GPT-2's default ids, which lie outside it
    eot = 50256 if c.vocab_size == 50257 else None
    cfg.update(activation_function="gelu_new", tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
               dtype=str(model.transformer.wte.weight.dtype).removeprefix("torch."))
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), sd, metadata={"format": "pt"})
    write_text(os.path.join(folder, "config.json"), json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------- tokenizers

def save_tokenizer(tokenizer, folder, model_max_length=1024):
    """The tokenizer files AutoTokenizer.from_pretrained(folder) reads, for data.py's GPT2Tokenizer
    ("gpt2") or WordTokenizer ("word"); data.load_tokenizer(folder) reads them back too."""
    os.makedirs(folder, exist_ok=True)
    if tokenizer.name == "gpt2":
        _save_gpt2(tokenizer, folder, model_max_length)
    elif tokenizer.name == "word":
        _save_word(tokenizer, folder, model_max_length)
    else:
        raise ValueError(f"no Hugging Face export for the tokenizer {tokenizer.name!r} (gpt2 or word)")


def _save_gpt2(tokenizer, folder, model_max_length):
    """vocab.json, merges.txt, tokenizer_config.json: tiktoken's gpt2 encoding is built from exactly these
    two files; here they are rebuilt from its ranks, so that AutoTokenizer encodes like tiktoken."""
    ranks = tokenizer.enc._mergeable_ranks  # token bytes -> id; ids 0..50255 are GPT-2's encoder.json ids
    b2u = _bytes_to_unicode()
    spell = lambda t: "".join(b2u[b] for b in t)  # noqa: E731 (GPT-2 spells bytes as printable chars)
    vocab = {spell(t): i for t, i in ranks.items()}
    vocab["<|endoftext|>"] = tokenizer.eot
    merges = [" ".join(spell(p) for p in _last_merge(ranks, t)) for t, _ in
              sorted(((t, i) for t, i in ranks.items() if len(t) > 1), key=lambda x: x[1])]
    write_text(os.path.join(folder, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    write_text(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    write_text(os.path.join(folder, "special_tokens_map.json"), json.dumps(special))
    write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps(dict(
        special, tokenizer_class="GPT2Tokenizer", model_max_length=model_max_length, add_prefix_space=False)))


def _bytes_to_unicode():
    """GPT-2's map of the 256 byte values to printable characters, as in its encoder.py."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes keep their own character
    return {b: chr(c) for b, c in zip(bs, cs)}


def _last_merge(ranks, token):
    """The pair of tokens whose merge made `token`: byte-pair encoding of its bytes with the merges
    that came before it leaves exactly two parts."""
    parts, top = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        r, i = min((ranks.get(parts[i] + parts[i + 1], top), i) for i in range(len(parts) - 1))
        if r >= top:
            raise ValueError(f"cannot rebuild the merge of token {token!r}")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _save_word(tokenizer, folder, model_max_length):
    """tokenizer.json in the Hugging Face tokenizers format (a WordLevel model behind the same split into
    words and punctuation marks) and tokenizer_config.json."""
    special = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, w in enumerate(tokenizer.SPECIALS)]
    split = {"type": "Split", "pattern": {"Regex": tokenizer.PATTERN.pattern}, "behavior": "Isolated", "invert": False}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, split]},
            "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": tokenizer.index, "unk_token": "<unk>"}}
    write_text(os.path.join(folder, "tokenizer.json"), json.dumps(spec, ensure_ascii=False))
    write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eot>", "unk_token": "<unk>",
        "model_max_length": model_max_length}))


# ----------------------------------------------------------------------------- the script

def export(model: GPT, tokenizer, folder, overwrite=False):
    """Model and tokenizer files into one folder; with overwrite, an earlier export's FILES go first."""
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_vocab} tokens, the model only {model.config.vocab_size}")
    for f in FILES if overwrite else ():
        if os.path.exists(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
    save_hf(model, folder)
    save_tokenizer(tokenizer, folder, model.config.block_size)


def main(argv=None):
    ap = Parser(prog="export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="run folder, ckpt .pt, Hugging Face folder or hub name")
    ap.add_argument("--out", required=True, help="folder to write (refused if it holds files, unless --overwrite)")
    ap.add_argument("--tokenizer", help="'gpt2' or a tokenizer.json; default: the one of --init")
    ap.add_argument("--overwrite", action="store_true", help="write into an --out that already holds files "
                    "(an earlier export's files are replaced, others are left alone)")
    args = ap.parse_args(argv)
    with input_errors("export.py"):
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out}: is a file, want a folder")
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
            raise ValueError(f"--out {args.out} already holds files; pass --overwrite to write into it")
        model = load_model(args.init)  # a run's adapters are merged on load
        export(model, load_tokenizer(args.tokenizer or args.init), args.out, args.overwrite)
    print(f"exported {args.init} to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
