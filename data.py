"""Tokenizers, salient-span examples, random windows, cached token arrays (probe files:
experiments/probe_files.py; real data sets' downloads and splits: experiments/realdata.py)."""
import csv
import hashlib
import itertools
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from common import atomic_path, not_utf8, read_json, write_text

class GPT2Tokenizer:
    """GPT-2 BPE by tiktoken (offline if TIKTOKEN_CACHE_DIR holds its files)."""
    name = fingerprint = "gpt2"
    bos = None  # Llama 3's: experiments/hf_tokenizer.py

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except OSError as e:  # requests' errors are OSErrors
            raise ValueError(f"no GPT-2 BPE files ({type(e).__name__}): set TIKTOKEN_CACHE_DIR") from None
        self.n_vocab, self.eot = self.enc.n_vocab, self.enc.eot_token
        self.encode = self.enc.encode_ordinary  # "<|endoftext|>" in text is plain text

class WordTokenizer:
    """A closed word vocabulary, else <unk>: a small softmax, fast to train on a CPU."""
    name, bos = "word", None
    SPECIALS = ("<eot>", "<unk>")
    PATTERN = re.compile(r"<eot>|<unk>|\w+|[^\w\s]")

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.n_vocab, self.eot, self.unk = len(self.vocab), 0, 1
        self.fingerprint = hashlib.sha1("\n".join(self.vocab).encode()).hexdigest()[:12]

    @classmethod
    def build(cls, texts):
        counts = Counter(w for t in texts for w in cls.PATTERN.findall(t) if w not in cls.SPECIALS)
        return cls(list(cls.SPECIALS) + sorted(counts, key=lambda w: (-counts[w], w)))

    def encode(self, text):
        return [self.index.get(w, self.unk) for w in self.PATTERN.findall(text)]

    def save(self, path):
        write_text(path, json.dumps({"type": "word", "vocab": self.vocab}, ensure_ascii=False))

    @classmethod
    def load(cls, path):
        d = read_json(path)
        v = d.get("vocab") or (d.get("model") or {}).get("vocab") if isinstance(d, dict) else None
        v = sorted(v, key=v.get) if isinstance(v, dict) else v  # export.py's HF WordLevel {word: id}
        if not isinstance(v, list) or tuple(v[:2]) != cls.SPECIALS:
            raise ValueError(f"{path}: not a word tokenizer (a vocab list starting <eot>, <unk>)")
        return cls(v)

def load_tokenizer(spec):
    """A tokenizer.json, or a folder or .pt next to one -> WordTokenizer; another family's: hf_tokenizer.py;
    else GPT-2 BPE."""
    p = Path(spec)
    p = p.parent if p.is_file() and (p.suffix == ".pt" or p.name == "tokenizer.json") else p
    if p.is_file():
        return WordTokenizer.load(p)
    try:
        if (p / "tokenizer.json").is_file():
            return WordTokenizer.load(p / "tokenizer.json")
    except ValueError:  # not ours
        pass
    from experiments.hf_tokenizer import family_tokenizer  # plumbing: hub names, HF files
    return family_tokenizer(spec, p) or GPT2Tokenizer()

def span_example(tokenizer, prompt, answer):
    """(idx, targets) of prompt + answer, targets -1 but on the answer: the signal is the gradient of the
    *knowledge* (a fact's object, a masked entity), not of template words any LM predicts. Tokenized together,
    so GPT-2 gets ' Paris' as in running text; an empty prompt becomes end-of-text."""
    prompt, answer = prompt.rstrip(), answer.strip()
    if not answer:
        raise ValueError("empty answer")
    p = tokenizer.encode(prompt) if prompt else []
    glue = " " if prompt else ""  # 'is' + ' Paris': the space belongs to the answer's first token
    full = tokenizer.encode(prompt + glue + answer)
    if full[:len(p)] != p:  # a merge across the boundary: fall back to separate encodings
        full = p + tokenizer.encode(glue + answer)
    first = [tokenizer.bos] if tokenizer.bos is not None else [] if p else [tokenizer.eot]
    p, full = first + p, first + full  # BOS as AutoTokenizer adds it
    return full[:-1], [-1] * (len(p) - 1) + full[len(p):]

def sentence_example(tokenizer, prompt, answer):
    """(idx, targets) of 'prompt answer' after end-of-text (or BOS), every token a target (TemporalWiki's)."""
    prompt, answer = prompt.rstrip(), answer.strip()
    if not answer:
        raise ValueError("empty answer")
    start = tokenizer.eot if tokenizer.bos is None else tokenizer.bos
    full = [start] + tokenizer.encode(f"{prompt} {answer}" if prompt else answer)
    return full[:-1], full[1:]

def random_starts(n_tokens, n, block_size, seed):
    """n starts of (block_size + 1)-token windows, the same for the same seed."""
    if n_tokens < block_size + 1:
        raise ValueError(f"the text has {n_tokens} tokens, not more than --block-size {block_size}")
    return np.random.default_rng(seed).integers(0, n_tokens - block_size, size=n)

def windows(tokens, starts, block_size):
    """(B, T) inputs x and next-token targets y of the windows at `starts`."""
    w = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()

def collate(examples, device):
    """Right-pad [(idx, targets)] to (B, T); padding has target -1 (causal: real logits unchanged)."""
    B, T = len(examples), max(len(idx) for idx, _ in examples)
    x, y = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1)
    for b, (idx, tgt) in enumerate(examples):
        x[b, :len(idx)], y[b, :len(tgt)] = torch.as_tensor(idx), torch.as_tensor(tgt)
    return x.to(device), y.to(device)

class Batcher:
    """Batch k: this rank's slice of batch_size * world_size random (x, y) windows seeded (seed, k). So 2
    ranks x B/2 see what 1 rank x B sees, and k is the state (exact resume)."""

    def __init__(self, tokens, block_size, batch_size, seed, rank=0, world_size=1):
        random_starts(len(tokens), 0, block_size, seed)  # too short a text fails now, not at batch 1
        self.tokens, self.block_size, self.seed, self.step = tokens, block_size, seed, 0
        self.n, self.mine = batch_size * world_size, slice(rank * batch_size, (rank + 1) * batch_size)

    def next(self):
        starts = random_starts(len(self.tokens), self.n, self.block_size, [self.seed, self.step])[self.mine]
        self.step += 1
        return windows(self.tokens, starts, self.block_size)

    def state_dict(self):
        return {"seed": int(self.seed), "step": self.step}

    def load_state_dict(self, d):
        self.seed, self.step = int(d["seed"]), int(d["step"])

class Stream:
    """train.py's batches. Mix-Review (He et al. 2021) fights forgetting: the last n_replay(step) rows replay
    old text, a share that decays over training. Both samplers draw every step, used or not, so a step's data
    depend on the step alone (exact resume)."""

    def __init__(self, tokens, replay, cfg, block_size, rank=0, world=1):  # cfg: train.Config
        self.rows, self.cfg = cfg.batch_size // world, cfg  # rows: this rank's share of the batch
        self.new = Batcher(tokens, block_size, self.rows, cfg.seed, rank, world)
        self.old = None  # Mix-Review's sampler of old text
        if replay is not None:
            self.old = Batcher(replay, block_size, self.rows, cfg.seed + 1, rank, world)

    def n_replay(self, step):  # rows * ratio at step 0, decaying geometrically to rows * ratio * decay
        if self.old is None:
            return 0
        c = self.cfg
        return round(self.rows * c.replay_ratio * c.replay_decay ** (step / c.steps))

    def next(self, step):
        x, y = self.new.next()  # (rows, T) each
        if self.old is not None:
            n = self.n_replay(step)
            old_x, old_y = self.old.next()
            x = torch.cat([x[:self.rows - n], old_x[:n]])
            y = torch.cat([y[:self.rows - n], old_y[:n]])
        return x, y

    def state_dict(self):
        return {"new": self.new.state_dict(), "old": None if self.old is None else self.old.state_dict()}

    def load_state_dict(self, d):
        self.new.load_state_dict(d["new"])
        if self.old is not None:
            self.old.load_state_dict(d["old"])

def _source_files(path):
    p, ext, files, seen = Path(path), (".txt", ".csv"), [], set()
    for d, sub, names in os.walk(p, followlinks=True):  # symlinked folders too, each real one once
        real = os.path.realpath(d)
        if real in seen:
            sub.clear()
            continue
        seen.add(real)
        files += [Path(d, f) for f in names if Path(f).suffix.lower() in ext]
    files = sorted(files) if p.is_dir() else [p]
    if not files or files[0].suffix.lower() not in ext:
        raise ValueError(f"{p}: not a .txt or .csv file, nor a folder of them")
    sub = [f.name for f in files if f.name.endswith("_subset.csv")] if p.is_dir() else []
    if sub:
        raise ValueError(f"{p}: holds TemporalWiki's *_subset.csv ({', '.join(sub)}): give its diff set file")
    return files

def iter_documents(path):
    """Documents of a .txt (blocks between blank lines), a TemporalWiki .csv (`text`) or a folder."""
    for f in _source_files(path):
        if f.suffix.lower() == ".csv":
            docs = (r["text"] for _, r in _csv_records(_lines(f), f, ["text"]))
        else:
            docs = ("".join(b) for blank, b in itertools.groupby(_lines(f, None), str.isspace) if not blank)
        yield from filter(None, map(str.strip, docs))

def _lines(path, newline=""):
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield from f
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None

def _csv_records(lines, path, columns):
    csv.field_size_limit(2 ** 31 - 1)  # TemporalWiki rows pass csv's default limit
    rows, start = csv.reader(lines, strict=True), 1  # strict: an unclosed quote is an error
    try:
        header, start = [h.strip() for h in next(rows, [])], 2
        missing = [repr(c) for c in columns if c not in header]
        if missing:  # else a CSV read as text trains on its header and quotes
            raise ValueError(f"{path}:1: no {', '.join(missing)} column")
        for row in rows:
            if len(row) != len(header):
                raise ValueError(f"{path}:{start}: expected {len(header)} fields, got {len(row)}")
            yield rows.line_num, dict(zip(header, row))
            start = rows.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}:{start}: {e}: fix the quotes of this row") from None

def parse_text_spec(spec):
    """'PATH' -> (PATH, None); 'PATH@20M' -> (PATH, 20_000_000): its first 20M tokens."""
    path, at, n = str(spec).rpartition("@")
    if Path(spec).exists() or not at:
        return str(spec), None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kMG]?)", n)
    count = int(float(m[1]) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m[2]]) if m else 0
    if count == 0:
        raise ValueError(f"{spec}: no such file, and '@{n}' is not a token count like 20M")
    return path, count

def load_tokens(spec, tokenizer):
    """Text -> token memmap, eot after each document (BOS before), streamed (billions of tokens, flat memory): all or
    the first N of 'PATH@N'. Cached next to the text (else ~/.cache/tgl), keyed by bytes, tokenizer and N."""
    path, n = parse_text_spec(spec)
    root, h = Path(path).parent, hashlib.sha1(f"{tokenizer.fingerprint}|{n}".encode())
    for f in _source_files(path):
        with open(f, "rb") as src:
            h.update(str(f.relative_to(root)).encode() + hashlib.file_digest(src, "sha1").digest())
    name = f"{Path(path).name}.{tokenizer.name}{f'.n{n}' if n else ''}-{h.hexdigest()[:16]}.tokens.bin"
    dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32
    d = root if os.access(root, os.W_OK) else Path.home() / ".cache/tgl"
    if not (d / name).is_file():
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / name) as tmp, open(tmp, "wb") as out:
            k = 0
            for doc in iter_documents(path):
                ids = ([] if tokenizer.bos is None else [tokenizer.bos]) + tokenizer.encode(doc)
                ids = (ids + [tokenizer.eot])[:n - k if n else None]
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                k += len(ids)
                if k == n:
                    break
            if k == 0:
                raise ValueError(f"{path}: no text")
    return np.memmap(d / name, dtype=dtype, mode="r")
