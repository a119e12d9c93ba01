"""Export a model to the Hugging Face layout: config.json + model.safetensors (LoRA merged) + the tokenizer
files, loadable by transformers' AutoModelForCausalLM / AutoTokenizer with the same logits and token ids.

    python -m experiments.export --init runs/lora --out runs/lora/hf              # tokenizer from the run
    python -m experiments.export --init gpt2 --tokenizer gpt2 --out hf/gpt2 --overwrite

checkpoint.py reads such a folder back (--init FOLDER anywhere in the project).
"""
import argparse
import copy
import glob
import json
import os
import shutil

import torch

from checkpoint import CKPT_NAME, load_checkpoint, load_model
from common import Parser, _dead, atomic_path, check_output, input_errors, read_json, write_text
from data import load_tokenizer
from experiments.hf import ST_DTYPES, to_hf
from model import GPT, merge_lora
from experiments.tools import folder_lock, remove_dead_temporaries

# what an export writes; --overwrite removes these first, so that no file of an earlier export (a word
# vocabulary's tokenizer.json next to GPT-2's vocab.json, say) is read in place of the new one
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
         "special_tokens_map.json")


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """The format experiments.hf.read_safetensors reads, written atomically. Tensors must be F32, F16 or BF16."""
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


def _fresh(folder, names):
    """The low-level writers never replace a model's files: export() stages into an empty folder and moves
    in what it may replace."""
    there = [f for f in names if os.path.exists(os.path.join(folder, f))]
    if there:
        raise ValueError(f"{folder} already holds {there[0]}; export into it with experiments.export "
                         "(--overwrite to replace it)")


def save_hf(model: GPT, folder, tokenizer=None):
    """config.json + model.safetensors in the model family's own layout (experiments/hf.py), as current
    transformers writes them, into a folder that holds neither. The model itself keeps its adapters: a
    merged copy is written. Another family's tokenizer gives config.json its BOS and EOS ids."""
    _fresh(folder, ("config.json", "model.safetensors"))
    c = model.config
    if getattr(model, "lora", None):
        model = merge_lora(copy.deepcopy(model))
    sd, cfg = to_hf(model)  # refused if no Hugging Face class computes what the model computes
    # the GPT-2 BPE's <|endoftext|> is 50256; another vocabulary must say "none", or transformers
    # fills in GPT-2's default ids, which lie outside it
    eot = 50256 if c.vocab_size == 50257 else None
    bos, eos = (tokenizer.bos, tokenizer.eot) if getattr(tokenizer, "name", "") == "hf" else (eot, eot)
    cfg.update(bos_token_id=bos, eos_token_id=eos,
               dtype=str(model.transformer.wte.weight.dtype).removeprefix("torch."))
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), sd, metadata={"format": "pt"})
    write_text(os.path.join(folder, "config.json"), json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------- tokenizers

def save_tokenizer(tokenizer, folder, model_max_length=1024):
    """The tokenizer files AutoTokenizer.from_pretrained(folder) reads, for data.py's GPT2Tokenizer
    ("gpt2"), WordTokenizer ("word") or another family's tokenizer.json (experiments/hf_tokenizer.py: its
    files as given), into a folder that holds none of FILES' tokenizer files; data.load_tokenizer(folder)
    reads them back too."""
    _fresh(folder, FILES[2:])
    os.makedirs(folder, exist_ok=True)
    if tokenizer.name == "gpt2":
        _save_gpt2(tokenizer, folder, model_max_length)
    elif tokenizer.name == "word":
        _save_word(tokenizer, folder, model_max_length)
    elif tokenizer.name == "hf":
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
    else:
        raise ValueError(f"no Hugging Face export for the tokenizer {tokenizer.name!r} (gpt2, word or hf)")


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

MARKER = "export.json"  # written last: says which --init this folder is a finished export of


def _stages(folder):
    return glob.glob(os.path.join(glob.escape(str(folder)), ".export.*.tmp"))


def check_out(folder, init, overwrite=False):
    """Before any slow work: `folder` may receive an export of `init` (None: a model from elsewhere).
    Refused (ValueError naming --out) when it is a file, cannot be created, or holds anything but a
    finished export of this same `init`, unless overwrite: another model's weights, config or tokenizer
    are never replaced unasked."""
    folder = str(folder)
    check_output(folder, "--out", "dir")  # it, or the folder above it, can be written
    if not os.path.isdir(folder) or overwrite:
        return
    mine = {os.path.basename(p) for p in _stages(folder)}
    have = sorted(set(os.listdir(folder)) - mine)
    if not have:
        return
    try:
        same = init is not None and (_marker(folder) or {}).get("init") == _source(init)
    except (ValueError, OSError, AttributeError):
        same = False
    if not same or not set(have) <= {*FILES, MARKER}:
        some = ", ".join(have[:3]) + ", ..." * (len(have) > 3)
        raise ValueError(f"--out {folder} already holds files ({some}) not exported from this --init; pass "
                         "--overwrite to replace its model and tokenizer files, or pick an empty folder")


def _marker(folder) -> dict | None:
    """The folder's export.json; else that of an export killed while moving its files in (a dead writer's
    staging folder holds it: it moves last), so that the same command finishes that export."""
    dead = [p for p in _stages(folder) if (pid := p.rsplit(".", 2)[-2]).isdigit() and _dead(pid)]
    for m in [os.path.join(folder, MARKER)] + [os.path.join(p, MARKER) for p in dead]:
        if os.path.isfile(m):
            return read_json(m)
    return None


def source_run(init):
    """What a tgl checkpoint --init (a run folder or its .pt) is: its update and train.py's run-defining
    flags (its own --init, data, lr, ...), as JSON reads them back; None for another --init. export.json
    records it, so that an export of a run folder that trained on, or was trained again, is told stale."""
    path = os.path.join(init, CKPT_NAME) if os.path.isdir(init) else init
    if not (os.path.isfile(path) and path.endswith(".pt")):
        return None
    ck = load_checkpoint(path, mmap=True)  # mapped: the weights are not read
    ck = ck if isinstance(ck, dict) else {}
    return json.loads(json.dumps({"step": ck.get("step"), "train_config": ck.get("train_config")}, default=str))


def _source(init) -> str:
    """--init as the marker records it: a path made absolute, a hub name as given."""
    return os.path.abspath(init) if os.path.exists(init) else str(init)


def export(model: GPT, tokenizer, folder, overwrite=False, init=None):
    """Model and tokenizer files into one folder (check_out's rules). Written whole into a staging folder
    first, then moved in file by file: a refusal or crash half-way leaves the earlier files as they were;
    FILES of an earlier export that this one does not write go (a word vocabulary's tokenizer.json beside
    GPT-2's vocab.json would be read in place of the new one)."""
    check_out(folder, init, overwrite)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"--tokenizer: the tokenizer has {tokenizer.n_vocab} tokens, "
                         f"the model only {model.config.vocab_size}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {folder}: cannot create it ({e.strerror})") from None
    remove_dead_temporaries(folder, ".export", ".tmp")  # dead writers' staging folders
    stage = os.path.join(folder, f".export.{os.getpid()}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        save_hf(model, stage, tokenizer)
        save_tokenizer(tokenizer, stage, model.config.block_size)
        new = set(os.listdir(stage))
        source = _source(init) if init is not None else None
        run = source_run(init) if init is not None else None
        write_text(os.path.join(stage, MARKER), json.dumps({"init": source, "run": run, "files": sorted(new)}))
        if os.path.exists(marker := os.path.join(folder, MARKER)):
            os.remove(marker)  # the folder is mixed until the last move: not a finished export meanwhile
        for f in sorted(new):  # killed from here on: _marker finds the staged marker, the same command redoes it
            os.replace(os.path.join(stage, f), os.path.join(folder, f))
        for f in set(FILES) - new:
            if os.path.exists(os.path.join(folder, f)):
                os.remove(os.path.join(folder, f))
        os.replace(os.path.join(stage, MARKER), marker)  # last: the folder is a finished export
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_tokenizer(spec):
    """--tokenizer: 'gpt2', a tokenizer.json, or a folder holding tokenizer.json or vocab.json; anything else
    would silently become GPT-2 BPE (data.load_tokenizer's fallback)."""
    if spec is None or spec == "gpt2" or os.path.isfile(spec):
        return
    if os.path.isdir(spec) and any(os.path.isfile(os.path.join(spec, f)) for f in ("tokenizer.json",
                                                                                      "vocab.json")):
        return
    why = "is a folder without tokenizer.json or vocab.json" if os.path.isdir(spec) else "does not exist"
    raise ValueError(f"--tokenizer {spec}: {why}; give 'gpt2', a tokenizer.json or a folder holding one")


def main(argv=None):
    ap = Parser(prog="export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="run folder, ckpt .pt, Hugging Face folder or hub name")
    ap.add_argument("--out", required=True, help="folder to write (refused if it holds other files than an "
                    "earlier export of this --init, unless --overwrite)")
    ap.add_argument("--tokenizer", help="'gpt2' or a tokenizer.json; default: the one of --init")
    ap.add_argument("--overwrite", action="store_true", help="write into an --out that already holds files "
                    "(an earlier export's files are replaced, others are left alone)")
    args = ap.parse_args(argv)
    with input_errors("export.py"), folder_lock(args.out):  # a second export into --out is refused at once
        check_out(args.out, args.init, args.overwrite)
        check_tokenizer(args.tokenizer)
        model = load_model(args.init)  # a run's adapters are merged on load
        export(model, load_tokenizer(args.tokenizer or args.init), args.out, args.overwrite, init=args.init)
    print(f"exported {args.init} to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
