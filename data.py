"""Data: tokenizers, text -> cached token arrays, batches of windows, probe files (the synthetic world: world.py).

    python data.py tokenize --text data/world/t0.txt --tokenizer data/world
    python data.py probes --probes data/world/probes/*.jsonl  # counts per split
"""
import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import Parser, atomic_path, fail, not_utf8, read_json, write_text
from experiments.tools import Progress  # temporary

# ----------------------------------------------------------------------------- tokenizers


class GPT2Tokenizer:
    """GPT-2 BPE through tiktoken (offline when TIKTOKEN_CACHE_DIR holds its files)."""
    name = "gpt2"

    def __init__(self):
        import requests
        import tiktoken
        try:  # tiktoken downloads its two files once, then reads them from its cache
            self.enc = tiktoken.get_encoding("gpt2")
        except (requests.RequestException, OSError) as e:
            raise ValueError("the GPT-2 BPE files could not be downloaded (no network?): copy tiktoken's cache from a "
                             f"machine with internet and set TIKTOKEN_CACHE_DIR to it ({type(e).__name__})") from None
        self.n_vocab, self.eot = self.enc.n_vocab, self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # "<|endoftext|>" in text stays plain text

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def fingerprint(self):
        return self.name


class WordTokenizer:
    """Closed word-level vocabulary: words and punctuation marks are tokens, anything not in
    the vocabulary becomes <unk>. Small softmax = fast from-scratch models on a CPU."""
    name = "word"
    SPECIALS = ("<eot>", "<unk>")
    PATTERN = re.compile(r"<eot>|<unk>|\w+|[^\w\s]")

    def __init__(self, vocab):
        self.vocab = list(vocab)
        if tuple(self.vocab[:2]) != self.SPECIALS:
            raise ValueError(f"word vocabulary must start with {', '.join(self.SPECIALS)}, starts with {self.vocab[:2]}")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.n_vocab, self.eot, self.unk = len(self.vocab), 0, 1

    @classmethod
    def build(cls, texts, min_count=1):
        counts = Counter(w for t in texts for w in cls.PATTERN.findall(t) if w not in cls.SPECIALS)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(cls.SPECIALS) + words)

    def encode(self, text):
        return [self.index.get(w, self.unk) for w in self.PATTERN.findall(text)]

    def decode(self, ids):
        text = " ".join(self.vocab[i] for i in ids)
        return re.sub(r" ([.,;:!?')])|([(']) ", r"\1\2", text)  # no space before '.' etc.

    def fingerprint(self):
        return hashlib.sha1("\n".join(self.vocab).encode()).hexdigest()[:12]

    def save(self, path):
        write_text(path, json.dumps({"type": "word", "vocab": self.vocab}, ensure_ascii=False))

    @classmethod
    def load(cls, path):
        """Our tokenizer.json ({"type": "word"}) or the Hugging Face one save_hf writes."""
        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a word tokenizer file")
        model = d.get("model") if isinstance(d.get("model"), dict) else {}
        if model.get("type") == "WordLevel":
            return cls(sorted(model["vocab"], key=model["vocab"].get))
        if d.get("type") != "word" or not isinstance(d.get("vocab"), list):
            raise ValueError(f"{path}: not a word tokenizer file")
        try:
            return cls(d["vocab"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def load_tokenizer(spec):
    """'gpt2' -> GPT-2 BPE; a tokenizer.json, or a folder holding one -> WordTokenizer;
    any other folder (an HF checkpoint, a GPT-2 run) or hub name -> GPT-2 BPE."""
    p = Path(str(spec))
    if p.is_file() and p.suffix == ".pt":  # a checkpoint file: look next to it
        p = p.parent
    if p.is_file():
        return WordTokenizer.load(p)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        try:
            return WordTokenizer.load(p / "tokenizer.json")
        except ValueError:  # an HF tokenizer.json: that is GPT-2 BPE for our models
            pass
    return GPT2Tokenizer()



# ----------------------------------------------------------------------------- token arrays
# Real corpora are big (a TemporalWiki diff set is ~350M GPT-2 tokens, a snapshot billions), so text
# is streamed document by document and tokens go straight to the cache file: memory stays flat.

TEXT_SUFFIXES = (".txt", ".csv")
CSV_FIELD_LIMIT = 2 ** 31 - 1  # TemporalWiki rows exceed csv's default 131,072 characters per field


def _source_files(path):
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{p}: folder holds no .txt or .csv files")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such text file or folder")
    if p.suffix.lower() not in TEXT_SUFFIXES:
        raise ValueError(f"{p}: unknown text format '{p.suffix}' (use .txt, a TemporalWiki .csv, or a folder of them)")
    return [p]


def _txt_docs(path):
    """Documents of a .txt file: blocks of text between blank lines."""
    block = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).strip()
                block = []
    if block:
        yield "".join(block).strip()


def _csv_docs(path):
    """Documents of a TemporalWiki CSV (diff set, snapshot part, *_subset.csv): the `text` column,
    one document per row, pandas quoting. Anything without a `text` column is refused, never
    read as plain text (that would train on the header and the quotes)."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, None) or []]
        if "text" not in header:
            raise ValueError(f"{path}:1: no 'text' column (header: {','.join(header)[:80]!r}); "
                             "text CSVs need one, as TemporalWiki's have")
        col = header.index("text")
        for row in rows:
            if len(row) != len(header):
                raise ValueError(f"{path}:{rows.line_num}: expected {len(header)} fields, got {len(row)}")
            if row[col].strip():
                yield row[col].strip()


def iter_documents(path):
    """Every document of a text source (.txt, TemporalWiki .csv, or a folder of either), streamed."""
    for f in _source_files(path):
        try:
            yield from (_csv_docs(f) if f.suffix.lower() == ".csv" else _txt_docs(f))
        except UnicodeDecodeError as e:  # name the file: the codec's message names only a byte
            raise not_utf8(f, e) from None


def parse_text_spec(spec):
    """'PATH' -> (PATH, None, None); 'PATH@20M' -> its first 20M tokens; 'PATH@20M,seed=3' -> a seeded
    sample of 20M tokens. Lets --data / --replay-data / --text take a sample of a snapshot."""
    spec = str(spec)
    m = re.fullmatch(r"(.+)@(\d+(?:\.\d+)?)([kMG]?)(?:,seed=(\d+))?", spec)
    if Path(spec).exists() or not m:
        return spec, None, None
    n = int(float(m.group(2)) * {"": 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}[m.group(3)])
    return m.group(1), n, (int(m.group(4)) if m.group(4) is not None else None)


def _write_tokens(docs, tokenizer, f, dtype, max_tokens, progress, total_chars):
    """Tokenize docs into the open binary file f, eot after each document, flushing every ~1M tokens;
    stop at max_tokens. Returns the number of tokens written."""
    buf, n, chars = [], 0, 0
    for doc in docs:
        buf.extend(tokenizer.encode(doc))
        buf.append(tokenizer.eot)
        chars += len(doc)
        if max_tokens and n + len(buf) >= max_tokens:
            del buf[max_tokens - n:]
        if len(buf) >= 1 << 20 or (max_tokens and n + len(buf) >= max_tokens):
            np.asarray(buf, dtype=dtype).tofile(f)
            n, buf = n + len(buf), []
            progress.update(n, total=max_tokens or int(n * total_chars / max(chars, 1)))  # ETA: tokens per char so far
            if max_tokens and n >= max_tokens:
                return n
    np.asarray(buf, dtype=dtype).tofile(f)
    return n + len(buf)


def _sample_docs(path, max_tokens, seed, chars_per_token):
    """A seeded random set of document indices holding about max_tokens tokens (estimated from
    characters), for a sample of a corpus that is too big to tokenize whole. One pass counts the
    documents' lengths without tokenizing (fast); the caller grows the estimate if it fell short."""
    progress = Progress(f"counting the documents of {path}", unit="documents")
    lengths = np.fromiter((len(d) for i, d in enumerate(iter_documents(path)) if progress.update(i) or True), np.int64)
    progress.close(len(lengths))
    order = np.random.default_rng(seed).permutation(len(lengths))
    k = int(np.searchsorted(np.cumsum(lengths[order]), max_tokens * chars_per_token)) + 1
    keep = np.zeros(len(lengths), dtype=bool)
    keep[order[:k]] = True
    return keep, k >= len(lengths)


def _tokenize_to(tmp, path, tokenizer, dtype, max_tokens, sample_seed):
    """Stream the tokens of `path` (all, a prefix, or a seeded sample of max_tokens) into file tmp."""
    total_chars = sum(f.stat().st_size for f in _source_files(path))  # bytes ~ characters, for the ETA
    ratio, keep, everything = 4.0, None, True  # ~4 characters per GPT-2 token in English text
    while True:
        if sample_seed is not None:
            keep, everything = _sample_docs(path, max_tokens, sample_seed, ratio)
        docs = iter_documents(path) if keep is None else (d for i, d in enumerate(iter_documents(path)) if keep[i])
        progress = Progress(f"tokenizing {path}", unit="tokens")
        with open(tmp, "wb") as f:
            n = _write_tokens(docs, tokenizer, f, dtype, max_tokens, progress, total_chars)
        progress.close(n)
        if everything or n >= max_tokens:
            return n
        ratio *= 1.2 * max_tokens / max(n, 1)  # the sample fell short: take more documents, same seed


def _source_hash(files, root, tokenizer, max_tokens, sample_seed):
    h = hashlib.sha1(f"{tokenizer.fingerprint()}|{max_tokens}|{sample_seed}".encode())
    progress, done = Progress(f"hashing {root}", sum(f.stat().st_size for f in files)), 0
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        fh = hashlib.sha1()
        with open(f, "rb") as src:  # in chunks: a snapshot does not fit in memory
            for chunk in iter(lambda: src.read(1 << 24), b""):
                fh.update(chunk)
                done += len(chunk)
                progress.update(done)
        h.update(fh.digest())
    progress.close(done)
    return h.hexdigest()[:16]


def load_tokens(path, tokenizer, cache_dir=None, max_tokens=None, sample_seed=None):
    """Text source -> 1-D token array (a memmap), documents separated by eot.

    A source is a .txt file (documents are blocks between blank lines), a TemporalWiki .csv (the
    `text` column, one document per row), or a folder of either. max_tokens keeps only the first
    max_tokens tokens, or with sample_seed a seeded random sample of documents (in corpus order)
    holding max_tokens tokens; 'PATH@20M' / 'PATH@20M,seed=3' say the same in the path.
    The array is cached as a raw uint16/uint32 file next to the source (or in cache_dir, or
    ~/.cache/tgl when the source folder is read-only) under a name holding a hash of the source
    bytes, the tokenizer and the prefix/sample, so an edit of either re-tokenizes; written to a
    temporary file then renamed (atomic).
    """
    if max_tokens is None:
        path, max_tokens, sample_seed = parse_text_spec(path)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"{path}: the number of tokens to take must be positive, got {max_tokens}")
    files = _source_files(path)
    digest = _source_hash(files, Path(path).parent, tokenizer, max_tokens, sample_seed)
    dtype = np.uint16 if tokenizer.n_vocab <= 2 ** 16 else np.uint32
    part = "" if max_tokens is None else f".n{max_tokens}" + ("" if sample_seed is None else f".s{sample_seed}")
    stem = f"{Path(path).name}.{tokenizer.name}{part}"
    dirs = [Path(cache_dir)] if cache_dir else [Path(path).parent, Path.home() / ".cache" / "tgl"]
    for d in dirs:
        out = d / f"{stem}-{digest}.tokens.bin"
        if out.is_file():
            return np.memmap(out, dtype=dtype, mode="r")
    d = _writable_dir(dirs + [Path(tempfile.gettempdir()) / "tgl"])
    out = d / f"{stem}-{digest}.tokens.bin"
    with atomic_path(out) as tmp:
        if _tokenize_to(tmp, path, tokenizer, dtype, max_tokens, sample_seed) == 0:
            raise ValueError(f"{path}: no text")
    for old in d.glob(f"{stem}-*.tokens.bin"):  # stale caches of the same source
        if old != out:
            old.unlink(missing_ok=True)
    return np.memmap(out, dtype=dtype, mode="r")


def _writable_dir(dirs):
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".tgl-write-test.{os.getpid()}"
            probe.touch()
            probe.unlink()
            return d
        except OSError:
            continue  # read-only: try the next folder
    raise OSError(f"no writable folder for the token cache among {', '.join(map(str, dirs))}")


def random_starts(n_tokens: int, n: int, block_size: int, seed) -> np.ndarray:
    """The one window sampler: n start offsets of (block_size + 1)-token windows, drawn from a
    generator seeded by `seed` (an int, or a list such as [seed, step]), the same for the same seed."""
    if n_tokens < block_size + 1:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
                         "use a smaller --block-size or more text")
    return np.random.default_rng(seed).integers(0, n_tokens - block_size, size=n)


def windows(tokens, starts, block_size: int):
    """(x, y) = (B, T) inputs and (B, T) next-token targets of the windows that begin at `starts`."""
    w = np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)  # (B, T+1)
    return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:]))


class Batcher:
    """Random windows of block_size + 1 tokens as (x, y), deterministic for a seed.

    Batch k is drawn from a generator seeded by (seed, k): the global batch of
    batch_size * world_size windows, of which this rank takes its slice. So 2 ranks x B/2
    see exactly what 1 rank x B sees, and the state is just the step counter (exact resume).
    """

    def __init__(self, tokens, block_size, batch_size, seed, rank=0, world_size=1):
        random_starts(len(tokens), 0, block_size, seed)  # too short a text fails here, not at the first batch
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size, self.step = seed, rank, world_size, 0

    def next(self):
        starts = random_starts(len(self.tokens), self.batch_size * self.world_size, self.block_size, [self.seed, self.step])
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.step += 1
        return windows(self.tokens, starts, self.block_size)

    def state_dict(self):
        return {"seed": int(self.seed), "step": int(self.step)}

    def load_state_dict(self, d):
        self.seed, self.step = int(d["seed"]), int(d["step"])

# ----------------------------------------------------------------------------- probes


@dataclass
class Probe:
    id: str
    prompt: str
    answers: list
    split: str
    relation: str = ""
    context: str = ""  # e.g. ECBD definition; prepended to the prompt when scoring with context
    date: str = ""  # as the data gives it: a year ('2019'), a quarter ('2019-Q1'), a month pair ('0801-0901')
    year: int = 0  # the year of `date`, 0 where the data has none
    source: str = field(default="", compare=False)  # the file it was read from, so that errors can name it


SENTINEL = re.compile(r"<extra_id_\d+>")
TWIKI_PAIR = re.compile(r"(\d{4}-\d{4})_(changed|unchanged)")  # TemporalWiki: 0801-0901_changed.csv
# TempLAMA's P286 head coach, P6 head of government and P488 chair put the object first:
# '_X_ is the head coach of Chelsea F.C..'. A causal LM cannot be asked for a span before the
# subject, so these are rewritten object-last as Dynamic TempLAMA's `_improved` templates do:
# 'The head coach of Chelsea F.C. is _X_.'
OBJECT_FIRST = re.compile(r"_X_ is (the .+?)\.?")


def _split_from_name(path):
    """TemporalWiki's 0801-0901_changed.csv -> 'changed' (diag_changed stays itself); else the stem."""
    m = re.fullmatch(r"(.*)_(changed|unchanged)", Path(path).stem.lower())
    return m.group(2) if m and "diag" not in m.group(1) else Path(path).stem


def _year(date):
    return int(date[:4]) if date[:4].isdigit() else 0


def _answer_names(ans, where):
    items = ans if isinstance(ans, list) else [ans]
    names = [a.get("name") if isinstance(a, dict) else a for a in items]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{where}: empty or malformed answer {ans!r}")
    return [n.strip() for n in names]


def object_last(query):
    """An object-first TempLAMA query rewritten with the object last, or None if it has no such form."""
    m = OBJECT_FIRST.fullmatch(query.strip())
    return f"{m.group(1)[0].upper()}{m.group(1)[1:]} is _X_." if m else None


def _templama(rec, where, split, notes):
    query = str(rec["query"])
    if "_X_" not in query:
        raise ValueError(f"{where}: query has no _X_ slot: {query!r}")
    if not query.split("_X_")[0].strip():  # object first: never score after an empty prompt
        query = object_last(query)
        notes["rewritten object-first" if query else "skipped object-first"] += 1
        if not query:
            return None
    rid, date = str(rec.get("id", where)), str(rec.get("date") or "")
    return Probe(rid, query.split("_X_")[0].rstrip(), _answer_names(rec.get("answer"), where), split,
                 str(rec.get("relation", "")), date=date, year=_year(date))


def ecbd_definition(definition, where):
    """ECBD's definition: a list of sentences with [ENT_START]/[ENT_END] around the entity; joined
    with spaces and the markers stripped, as ECBD's own code does. A plain string is taken as is."""
    if isinstance(definition, list) and all(isinstance(s, str) for s in definition):
        definition = " ".join(s.strip() for s in definition)
    elif definition is not None and not isinstance(definition, str):
        raise ValueError(f"{where}: definition must be a list of sentences or a string")
    return re.sub(r"\[ENT_(START|END)\]", "", definition or "").strip()


def _ecbd(rec, where, split):
    sent = str(rec["masked_sentence"])
    if "<extra_id_0>" not in sent:
        raise ValueError(f"{where}: masked_sentence has no <extra_id_0>")
    answer = SENTINEL.sub("", str(rec.get("answer_str", ""))).strip()
    if not answer:
        raise ValueError(f"{where}: empty answer_str")
    prompt = sent.split("<extra_id_0>")[0].rstrip()
    date = str(rec.get("year") or "")
    return Probe(str(rec.get("ex_id", where)), prompt, [answer], split, str(rec.get("span_type", "")),
                 ecbd_definition(rec.get("definition"), where), date=date, year=_year(date))


def parse_probe_spec(spec):
    """'FILE[@DATES][:SPLIT]' -> (FILE, DATES or None, SPLIT or None). DATES: '2019', '2019-Q1',
    '2018,2020' or a range '2019-Q1..2020-Q4'. A path that exists is taken literally."""
    path, dates, split = str(spec), None, None
    if not Path(path).exists() and ":" in path:
        path, split = path.rsplit(":", 1)
        if not split.strip():
            raise ValueError(f"{spec}: empty split name after ':'")
    if not Path(path).exists() and "@" in path:
        path, dates = path.rsplit("@", 1)
    return path, dates, split


def _date_matches(date, year, spec):
    """Does a probe's date fall in spec ('2019' matches 2019 and 2019-Q1..Q4; 'A..B' is inclusive)?"""
    def match(v):
        return date == v or date.startswith(v + "-") or (v.isdigit() and len(v) == 4 and year == int(v))
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("..")
        if hi and (date and (lo <= date <= hi or match(lo) or match(hi))):
            return True
        if not hi and match(lo):
            return True
    return False


def filter_dates(probes, dates, where):
    """The probes whose date matches `dates`; one clear error when none does."""
    kept = [p for p in probes if _date_matches(p.date, p.year, dates)]
    if not kept:
        have = sorted({p.date for p in probes if p.date})
        raise ValueError(f"{where}: no probe has a date in '{dates}' (" +
                         (f"dates in the file: {', '.join(have[:6])}{' ...' if len(have) > 6 else ''})" if have
                          else "the file has no dates)"))
    return kept


def _json_line(line, where):
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object per line")
    return rec


def _read_jsonl(f, path, split, default, notes):
    probes = []
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        rec = _json_line(line, where)
        s = split or rec.get("split") or default
        if "query" in rec:
            p = _templama(rec, where, s, notes)
            if p:
                probes.append(p)
        elif "masked_sentence" in rec:
            probes.append(_ecbd(rec, where, s))
        else:
            raise ValueError(f"{where}: unknown probe format (need 'query' or 'masked_sentence')")
    return probes


def _read_csv(f, path, default):
    rows = csv.reader(f)
    header = next(rows, None)
    if header is None or [h.strip() for h in header] != ["subject", "relation", "object"]:
        raise ValueError(f"{path}:1: expected header 'subject,relation,object', got {header}")
    m = TWIKI_PAIR.fullmatch(Path(path).stem.lower())
    probes = []
    for row in rows:
        where = f"{path}:{rows.line_num}"
        if len(row) != 3:
            raise ValueError(f"{where}: expected 3 fields, got {len(row)}")
        subj, rel, obj = (x.strip() for x in row)
        if not subj or not obj:
            raise ValueError(f"{where}: empty subject or object")
        probes.append(Probe(f"{Path(path).stem}:{rows.line_num}", f"{subj} {rel}", [obj], default, rel,
                            date=m.group(1) if m else ""))
    return probes


def _read_tsv(f, path, split, default):
    probes = []
    for n, line in enumerate(f, 1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        where = f"{path}:{n}"
        if len(parts) not in (2, 3):
            raise ValueError(f"{where}: expected prompt<TAB>answer[<TAB>split], got {len(parts)} fields")
        if not parts[1].strip():
            raise ValueError(f"{where}: empty answer")
        s = split or (parts[2].strip() if len(parts) == 3 else default)
        probes.append(Probe(f"{Path(path).stem}:{n}", parts[0].rstrip(), [parts[1].strip()], s))
    return probes


def read_probes(path, split=None, dates=None):
    """Read a probe file; the format comes from the extension and the record keys:
    .jsonl/.json: TempLAMA / Dynamic TempLAMA (`query`, `date`) or ECBD (`masked_sentence`, `year`);
    .csv: TemporalWiki `subject,relation,object` (prompt 'subject relation', split from the
    file name); .tsv: `prompt<TAB>answer[<TAB>split]`. The split defaults to the file's stem.
    `path` may be 'FILE@DATES:SPLIT' (see parse_probe_spec); `dates` keeps only probes of those dates.
    A file holding several dates (TempLAMA has a row per year, with different answers) gets one
    split per date ('test@2019'), so no year's answer is scored against another's."""
    path, spec_dates, spec_split = parse_probe_spec(path)
    split, dates = split or spec_split, dates or spec_dates
    default = split or _split_from_name(path)
    ext = Path(path).suffix.lower()
    notes = Counter()
    if ext not in (".jsonl", ".json", ".csv", ".tsv"):
        raise ValueError(f"{path}: unknown probe format '{ext}' (use .jsonl, .json, .csv or .tsv)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if ext == ".csv":
                probes = _read_csv(f, path, default)
            elif ext == ".tsv":
                probes = _read_tsv(f, path, split, default)
            else:
                probes = _read_jsonl(f, path, split, default, notes)
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    for p in probes:
        p.source = path
    if notes:
        print(f"{path}: " + ", ".join(f"{k} queries: {v}" for k, v in sorted(notes.items())), file=sys.stderr)
    if dates:
        probes = filter_dates(probes, dates, path)
    if not split and ext != ".csv" and len({p.date for p in probes}) > 1:
        for p in probes:
            p.split = f"{p.split}@{p.date}"
    return probes


def _label(path, depth):
    """The last `depth` parts of path, without the extension: 'ecbd2020/np_spans_test'."""
    p = Path(path).with_suffix("")
    return "/".join(p.parts[-depth:])


def read_probe_files(specs):
    """Read several probe files (specs as read_probes takes them). Splits never merge silently: when
    files' default split names collide (TemporalWiki's four *_changed.csv, ECBD's np_spans_test.json
    of two year folders), each of those files' split is renamed after the file, with as many parent
    folders as it takes to tell them apart ('0801-0901_changed', 'ecbd2020/np_spans_test').
    'FILE:SPLIT' names a split explicitly; explicit names may merge on purpose."""
    per_file = [(parse_probe_spec(s), read_probes(s)) for s in specs]
    for (path, _, _), probes in per_file:
        if not probes:  # never a silent skip: an empty file (or filter) would quietly drop a split
            raise ValueError(f"{path}: holds no probes")
    owners = {}
    for (path, _, split), probes in per_file:
        for name in {p.split for p in probes}:
            owners.setdefault(name, set()).add(path)
    clash = {path for (path, _, split), probes in per_file if not split
             and any(len(owners[p.split]) > 1 for p in probes)}
    if not clash:
        return [p for _, probes in per_file for p in probes]
    depth = next((k for k in range(1, 99) if len({_label(c, k) for c in clash}) == len(clash)), 99)
    out = []
    for (path, _, split), probes in per_file:
        default = _split_from_name(path)
        for p in probes:
            if path in clash and (p.split == default or p.split.startswith(default + "@")):
                p.split = _label(path, depth) + p.split[len(default):]
            out.append(p)
    print("probe splits named after their files to keep them apart: " +
          ", ".join(sorted({_label(c, depth) for c in clash})), file=sys.stderr)
    return out


def sentence_example(tokenizer, prompt, answer):
    """(idx, targets) for the whole probe sentence 'prompt answer', every token a target after an
    end-of-text token: what TemporalWiki's own scorer measures (probe.py --metric sentence). The
    span metric (span_example) is the paper's: template words any LM predicts do not dilute it."""
    prompt, answer = prompt.rstrip(), answer.strip()
    if not answer:
        raise ValueError("empty answer")
    full = [tokenizer.eot] + tokenizer.encode(f"{prompt} {answer}" if prompt else answer)
    return full[:-1], full[1:]


def span_example(tokenizer, prompt, answer):
    """(idx, targets) for a salient span: prompt + answer tokens, targets -1 except where the
    next token is an answer token. Prompt and answer are tokenized together (with a space
    between; trailing spaces of the prompt are dropped), so GPT-2 gets ' Paris' as in running
    text, not 'Paris'. An empty prompt is
    replaced by the end-of-text token, so the first answer token still has a context."""
    # Why only the answer has targets: the paper's signal is the gradient of the *knowledge* (the object of
    # a fact, the masked entity span), not of the template words around it, which any LM already predicts.
    prompt, answer = prompt.rstrip(), answer.strip()
    if not answer:
        raise ValueError("empty answer")
    p = tokenizer.encode(prompt) if prompt else []
    glue = " " if prompt else ""  # 'is' + ' Paris': the space belongs to the answer's first token
    full = tokenizer.encode(prompt + glue + answer)
    if full[:len(p)] != p:  # a merge across the boundary: fall back to separate encodings
        full = p + tokenizer.encode(glue + answer)
    if not p:
        p, full = [tokenizer.eot], [tokenizer.eot] + full
    idx = full[:-1]
    targets = [-1] * (len(p) - 1) + full[len(p):]
    return idx, targets

# ----------------------------------------------------------------------------- splits from real data
# The method's probe files: updated / new / unchanged facts between two dates, each with a disjoint
# seeded diagnostic file (diag_*) for tracing. Outputs keep the input formats, so read_probes reads them.


def _jsonl_records(path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rec = _json_line(line, f"{path}:{n}")
                if "query" not in rec or "date" not in rec:
                    raise ValueError(f"{path}:{n}: expected a (Dynamic) TempLAMA record with 'query' and 'date'")
                yield rec, f"{path}:{n}"


def _diag_split(groups, kind, diag_frac, seed):
    """groups: {key: [records]} -> (eval records, diagnostic records), disjoint by key, seeded."""
    keys = sorted(groups)
    random.Random(f"{seed}:{kind}").shuffle(keys)
    n_diag = round(diag_frac * len(keys))
    return ([r for k in sorted(keys[n_diag:]) for r in groups[k]], [r for k in sorted(keys[:n_diag]) for r in groups[k]])


def temporal_splits(files, t0, t1):
    """(Dynamic) TempLAMA records at date t1, by how their answer set differs from t0's:
    {'updated': ..., 'new': ..., 'unchanged': ...}, each {(relation, query): [record]}."""
    if t0 >= t1:
        raise ValueError(f"--from {t0} must come before --to {t1}")
    at = {t0: {}, t1: {}}
    dates = set()
    for path in files:
        for rec, where in _jsonl_records(path):
            dates.add(str(rec["date"]))
            if str(rec["date"]) in at:
                at[str(rec["date"])][(str(rec.get("relation", "")), rec["query"])] = (rec, where)
    for t in (t0, t1):
        if not at[t]:
            raise ValueError(f"{', '.join(map(str, files))}: no record has date {t} "
                             f"(dates: {', '.join(sorted(dates)[:8])}{' ...' if len(dates) > 8 else ''})")
    kinds = {"updated": {}, "new": {}, "unchanged": {}}
    for key, (rec, where) in at[t1].items():
        if key not in at[t0]:
            kind = "new"
        else:
            old, new = (set(_answer_names(r.get("answer"), w)) for r, w in (at[t0][key], (rec, where)))
            kind = "unchanged" if old == new else "updated"
        kinds[kind][key] = [rec]
    return kinds


def twiki_pairs(folders):
    """TemporalWiki probe CSVs by month pair: {'0801-0901': {'changed': path, 'unchanged': path}}."""
    pairs = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*.csv")):
            m = TWIKI_PAIR.fullmatch(f.stem.lower())
            if m:
                if m.group(2) in pairs.get(m.group(1), {}):
                    raise ValueError(f"{f}: a second {m.group(0)}.csv (first: {pairs[m.group(1)][m.group(2)]})")
                pairs.setdefault(m.group(1), {})[m.group(2)] = f
    if not pairs:
        raise ValueError(f"{', '.join(map(str, folders))}: no TemporalWiki MMNN-MMNN_changed.csv / _unchanged.csv")
    return pairs


def _write_jsonl(path, recs):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))


def _write_twiki(path, rows):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["subject", "relation", "object"]] + rows)
    write_text(path, buf.getvalue())


def make_splits(kind, inputs, out, t0=None, t1=None, diag_frac=0.25, seed=0, ecbd_file="np_spans_test.json"):
    """Write the probe files of `kind` (templama, twiki, ecbd) under out; returns {relative path: count}."""
    out, counts = Path(out), {}
    if kind == "templama":
        if not (t0 and t1):
            raise ValueError("templama splits need --from and --to dates (e.g. 2019 2020, or 2019-Q4 2020-Q4)")
        files = [f for i in inputs for f in (sorted(g for g in Path(i).iterdir() if g.suffix in (".json", ".jsonl"))
                                             if Path(i).is_dir() else [Path(i)])]
        for name, groups in temporal_splits(files, str(t0), str(t1)).items():
            ev, dg = _diag_split(groups, name, diag_frac, seed)
            for fname, recs in ((f"{name}.jsonl", ev), (f"diag_{name}.jsonl", dg)):
                out.mkdir(parents=True, exist_ok=True)
                _write_jsonl(out / fname, recs)
                counts[fname] = len(recs)
    elif kind == "twiki":
        for pair, files in sorted(twiki_pairs(inputs).items()):
            for name, f in sorted(files.items()):
                with open(f, encoding="utf-8", newline="") as fh:
                    rows = [r for r in csv.reader(fh)]
                if not rows or [h.strip() for h in rows[0]] != ["subject", "relation", "object"]:
                    raise ValueError(f"{f}:1: expected header 'subject,relation,object'")
                ev, dg = _diag_split({i: [r] for i, r in enumerate(rows[1:])}, f"{pair}_{name}", diag_frac, seed)
                (out / pair).mkdir(parents=True, exist_ok=True)
                for fname, recs in ((f"{pair}/{name}.csv", ev), (f"{pair}/diag_{name}.csv", dg)):
                    _write_twiki(out / fname, recs)
                    counts[fname] = len(recs)
    elif kind == "ecbd":
        years = sorted(f for i in inputs for f in Path(i).glob(f"*/{ecbd_file}"))
        if not years:
            raise ValueError(f"{', '.join(map(str, inputs))}: no YEAR/{ecbd_file} (ECBD's layout: one folder per year)")
        for f in years:
            groups = {}
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        rec = _json_line(line, f"{f}:{n}")
                        _ecbd(rec, f"{f}:{n}", "new")  # validates the record
                        groups.setdefault(str(rec.get("entity_span_str", n)), []).append(rec)  # diag by entity
            ev, dg = _diag_split(groups, f"{f.parent.name}_new", diag_frac, seed)
            (out / f.parent.name).mkdir(parents=True, exist_ok=True)
            for fname, recs in ((f"{f.parent.name}/new.jsonl", ev), (f"{f.parent.name}/diag_new.jsonl", dg)):
                _write_jsonl(out / fname, recs)
                counts[fname] = len(recs)
    else:
        raise ValueError(f"unknown splits kind {kind!r} (templama, twiki or ecbd)")
    return counts


# ----------------------------------------------------------------------------- CLI


def _real_data_parsers(sub):
    """The subcommands for real data: tokenize, probes, fetch, splits."""
    t = sub.add_parser("tokenize", help="tokenize (and cache) a text file or folder, print the count")
    t.add_argument("--text", required=True, help="a .txt file, a TemporalWiki .csv (text column), or a folder of them")
    t.add_argument("--tokenizer", default="gpt2", help="'gpt2', a tokenizer.json, or a folder holding one")
    t.add_argument("--max-tokens", type=int, help="only N tokens: the first N, or a sample with --sample-seed")
    t.add_argument("--sample-seed", type=int, help="with --max-tokens: a seeded random sample of whole documents")
    t.add_argument("--cache-dir", help="folder for the token cache (default: next to the text)")
    p = sub.add_parser("probes", help="read probe files and print counts per split")
    p.add_argument("--probes", nargs="+", required=True,
                   help="probe files (.jsonl, .json, .csv, .tsv); FILE@DATES:SPLIT selects dates and names the split")
    p.add_argument("--date", help="keep only probes of these dates: 2019, 2019-Q1, 2018,2020 or 2019..2020")
    from experiments import fetch
    fetch.add_arguments(sub.add_parser("fetch", help="download a public data set into $TGL_CACHE/data"))
    s = sub.add_parser("splits", help="write updated/new/unchanged (+ diag_*) probe files from real data")
    s.add_argument("kind", choices=("templama", "twiki", "ecbd"), help="templama covers Dynamic TempLAMA too")
    s.add_argument("--input", nargs="+", required=True,
                   help="templama: .json/.jsonl files or folders; twiki: folders of MMNN-MMNN_*.csv; ecbd: the root")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--from", dest="t0", help="templama: the first date (e.g. 2019, or 2019-Q4)")
    s.add_argument("--to", dest="t1", help="templama: the second date; probes are its records")
    s.add_argument("--diag-frac", type=float, default=0.25, help="fraction of each split kept apart for tracing")
    s.add_argument("--seed", type=int, default=0, help="seed of the diagnostic sample")
    s.add_argument("--ecbd-file", default="np_spans_test.json", help="ecbd: the file taken from each year folder")


def _run_real_data(args):
    if args.cmd == "tokenize":
        tok = load_tokenizer(args.tokenizer)
        if args.sample_seed is not None and args.max_tokens is None:
            raise ValueError("--sample-seed needs --max-tokens")
        n = len(load_tokens(args.text, tok, args.cache_dir, args.max_tokens, args.sample_seed))
        print(f"{args.text}: {n:,} tokens ({tok.name}, vocab {tok.n_vocab})")
    elif args.cmd == "probes":
        probes = [p for p in read_probe_files(args.probes)]
        if args.date:
            probes = filter_dates(probes, args.date, " ".join(args.probes))
        for s, n in sorted(Counter(pr.split for pr in probes).items()):
            print(f"{s:>16} {n:6d}")
    elif args.cmd == "fetch":
        from experiments import fetch
        fetch.run(args)
    else:
        if not 0 <= args.diag_frac < 1:
            raise ValueError("--diag-frac must be in [0, 1)")
        counts = make_splits(args.kind, args.input, args.out, args.t0, args.t1, args.diag_frac, args.seed, args.ecbd_file)
        for name, n in counts.items():
            print(f"{name:>32} {n:6d}")
        print(f"probe files in {args.out}")


def main(argv=None):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _real_data_parsers(sub)
    args = ap.parse_args(argv)
    try:
        _run_real_data(args)
    except (ValueError, OSError) as e:
        fail(str(e), prog="data.py")


if __name__ == "__main__":
    main()
