"""data.py: tokenizers, token cache, Batcher, probe readers (real and hand-written files),
span alignment (the synthetic world: test_world.py)."""
import csv
import json

import numpy as np
import pytest
import torch

from data import Batcher, GPT2Tokenizer, WordTokenizer, load_tokenizer, load_tokens, span_example
from experiments.probe_files import Probe, read_probes
from samples import DATA

TWIKI = DATA / "twiki_probes"
TEMPLAMA = DATA / "templama_format"


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def words(tok, ids):  # a word tokenizer's ids as text, one space between tokens
    return " ".join(tok.vocab[i] for i in ids)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path

# ----------------------------------------------------------------------------- tokenizers


def test_gpt2_tokenizer_roundtrip(gpt2):
    ids = gpt2.encode("Hello world, <|endoftext|> stays text")
    assert gpt2.enc.decode(ids) == "Hello world, <|endoftext|> stays text"
    assert gpt2.eot == 50256 and gpt2.n_vocab == 50257 and gpt2.eot not in ids


def test_word_tokenizer_build_save_load(tmp_path):
    tok = WordTokenizer.build(["Ann plays for Rovers.", "Bob plays for Rovers United."])
    assert tok.vocab[:2] == ["<eot>", "<unk>"] and tok.eot == 0
    assert set(tok.vocab[2:6]) == {".", "plays", "for", "Rovers"}  # most frequent first
    ids = tok.encode("Ann plays for Zorro United.")
    assert tok.unk in ids and ids.count(tok.unk) == 1
    assert words(tok, tok.encode("Bob plays for Rovers.")) == "Bob plays for Rovers ."
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert isinstance(back, WordTokenizer) and back.vocab == tok.vocab
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), WordTokenizer)
    assert back.encode("Ann <eot> Bob") == [tok.index["Ann"], 0, tok.index["Bob"]]


def test_load_tokenizer_falls_back_to_gpt2(tmp_path):
    assert isinstance(load_tokenizer("gpt2"), GPT2Tokenizer)
    assert isinstance(load_tokenizer(tmp_path), GPT2Tokenizer)  # a folder without tokenizer.json
    write(tmp_path / "tokenizer.json", json.dumps({"model": {"type": "BPE"}}))  # an HF file, not GPT-2's:
    with pytest.raises(ValueError, match="not a byte-level BPE"):  # read exactly or refused, never GPT-2 BPE
        load_tokenizer(tmp_path)

# ----------------------------------------------------------------------------- token arrays


def test_load_tokens_cache_and_rebuild(tmp_path):
    src = write(tmp_path / "a.txt", "one two three.\n\nfour five.\n")
    tok = WordTokenizer.build(["one two three four five six ."])
    arr = load_tokens(src, tok)
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
    assert words(tok, arr.tolist()) == "one two three . <eot> four five . <eot>"
    caches = list(tmp_path.glob("*.tokens.bin"))
    assert len(caches) == 1
    assert list(load_tokens(src, tok)) == list(arr) and list(tmp_path.glob("*.tokens.bin")) == caches
    write(src, "one two three.\n\nfour five six.\n")  # same size class, new content: rebuilt
    assert words(tok, load_tokens(src, tok).tolist()).endswith("four five six . <eot>")
    assert len(list(tmp_path.glob("a.txt.word-*.tokens.bin"))) == 2  # a cache per content
    tok2 = WordTokenizer.build(["one two"])  # another tokenizer: another array
    assert tok2.unk in load_tokens(src, tok2).tolist()


def test_load_tokens_folder(tmp_path, gpt2):
    (tmp_path / "src").mkdir()
    write(tmp_path / "src" / "b.txt", "Second file.")
    write(tmp_path / "src" / "a.txt", "First file.")
    arr = load_tokens(tmp_path / "src", gpt2)
    assert gpt2.enc.decode(arr.tolist()) == "First file.<|endoftext|>Second file.<|endoftext|>"
    assert list(tmp_path.glob("src.gpt2-*.tokens.bin"))  # next to the folder
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "missing.txt", gpt2)

# ----------------------------------------------------------------------------- Batcher


def test_batcher_deterministic_shifted_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = Batcher(tokens, 16, 4, seed=1), Batcher(tokens, 16, 4, seed=1)
    x, y = a.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    assert torch.equal(x, b.next()[0])
    assert not torch.equal(a.next()[0], Batcher(tokens, 16, 4, seed=2).next()[0])
    state = a.state_dict()
    assert all(type(v) is int for v in state.values())
    torch.save(state, "/dev/null")  # plain types: fine for weights_only checkpoints
    expect = [a.next()[0] for _ in range(3)]
    c = Batcher(tokens, 16, 4, seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(e, c.next()[0]) for e in expect)


def test_batcher_rank_sharding():
    tokens = np.arange(5000, dtype=np.uint16)
    one = Batcher(tokens, 8, 6, seed=0)
    ranks = [Batcher(tokens, 8, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x1, y1 = one.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(x1, torch.cat([p[0] for p in parts])) and torch.equal(y1, torch.cat([p[1] for p in parts]))
    with pytest.raises(ValueError):
        Batcher(np.arange(5), 8, 2, seed=0)

# ----------------------------------------------------------------------------- readers: real files


def test_read_twiki_real_files():
    files = sorted(TWIKI.glob("*.csv"))
    assert len(files) == 8
    for f in files:
        probes = read_probes(f)
        with open(f, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        assert len(probes) == len(rows) == 40  # tests/data keeps each file's header and first 40 rows
        want = "unchanged" if "unchanged" in f.name else "changed"
        assert {p.split for p in probes} == {want}
        assert probes[0].prompt == f"{rows[0][0]} {rows[0][1]}" and probes[0].answers == [rows[0][2]]
    assert read_probes(f"{files[0]}:x")[0].split == "x"


def test_read_templama_real_records():
    probes = read_probes(TEMPLAMA / "example_records_from_notebook.jsonl")
    assert [p.id for p in probes] == ["Q233510_P54_2019-Q1", "Q233510_P54_2010"]
    assert all(p.prompt == "Alex Morgan plays for" and p.relation == "P54" for p in probes)
    assert probes[0].answers == ["United States women's national soccer team", "Orlando Pride"]
    assert probes[1].answers == ["United States women's national soccer team"]
    with pytest.raises(ValueError, match="templama_templates.csv:1"):  # a template table, not probes
        read_probes(TEMPLAMA / "templama_templates.csv")

# ----------------------------------------------------------------------------- readers: hand-written


def test_read_hand_written_formats(tmp_path):
    tl = write(tmp_path / "upd.jsonl", json.dumps({"query": "Ann plays for _X_.", "answer": {"name": "Rovers"},
                                                   "id": "a1", "relation": "P54"}) + "\n\n")
    assert read_probes(tl) == [Probe("a1", "Ann plays for", ["Rovers"], "upd", "P54")]
    ecbd = write(tmp_path / "new.jsonl", json.dumps({
        "ex_id": "e1", "masked_sentence": "Zed was born in <extra_id_0> in 1990.", "span_type": "NP",
        "answer_str": "<extra_id_0> Oslo <extra_id_1>", "definition": "Zed is a singer."}) + "\n")
    p = read_probes(f"{ecbd}:new_entities")[0]
    assert (p.id, p.prompt, p.answers, p.split) == ("e1", "Zed was born in", ["Oslo"], "new_entities")
    own = write(tmp_path / "mine.jsonl", json.dumps({"query": "The sky is _X_.", "answer": "blue"}) + "\n" +
                json.dumps({"query": "Grass is _X_.", "answer": "green", "split": "colors"}) + "\n")
    assert [(p.prompt, p.answers, p.split) for p in read_probes(own)] == [
        ("The sky is", ["blue"], "mine"), ("Grass is", ["green"], "colors")]
    tw = write(tmp_path / "x_changed.csv", 'subject,relation,object\n"Smith, John",employer,"Acme, Inc"\n')
    assert read_probes(tw) == [Probe("x_changed:2", "Smith, John employer", ["Acme, Inc"], "changed", "employer")]


@pytest.mark.parametrize("name,text,msg", [
    ("a.jsonl", '{"query": "A _X_.", "answer": ["B"]}\n{"query": "broken"\n', r"a\.jsonl:2: not valid JSON"),
    ("b.jsonl", '{"query": "A plays for B.", "answer": ["B"]}\n', r"b\.jsonl:1: query has no _X_"),
    ("c.jsonl", '\n{"query": "A _X_.", "answer": [{"name": ""}]}\n', r"c\.jsonl:2: empty or malformed answer"),
    ("d.jsonl", '{"sentence": "x"}\n', r"d\.jsonl:1: unknown probe format"),
    ("e.jsonl", '{"masked_sentence": "A <extra_id_0>.", "answer_str": "<extra_id_0> <extra_id_1>"}\n',
     r"e\.jsonl:1: empty or malformed answer_str"),
    ("f.csv", "subject,relation,object\nA,r,B\nA,r\n", r"f\.csv:3: expected 3 fields"),
    ("g.csv", "subject,relation,object\nA,r,\n", r"g\.csv:2: empty subject or object"),
    ("j.txt", "anything\n", r"unknown probe format '\.txt'"),
    ("k.jsonl", "[1, 2]\n", r"k\.jsonl:1: expected a JSON object"),
])
def test_read_broken_files(tmp_path, name, text, msg):
    with pytest.raises(ValueError, match=msg):
        read_probes(write(tmp_path / name, text))

# ----------------------------------------------------------------------------- span examples


def test_span_example_gpt2_leading_space(gpt2):
    idx, tgt = span_example(gpt2, "The capital of France is", "Paris")
    full = gpt2.encode("The capital of France is Paris")
    answer = [t for t in tgt if t != -1]
    assert answer == gpt2.encode(" Paris") != gpt2.encode("Paris")
    assert idx == full[:-1] and len(idx) == len(tgt)
    assert tgt[:len(full) - len(answer) - 1] == [-1] * (len(full) - len(answer) - 1)
    assert span_example(gpt2, "The capital of France is ", "Paris")[1] == tgt  # trailing space: same
    idx, tgt = span_example(gpt2, "", "Paris")  # no prompt: end-of-text is the context
    assert idx[0] == gpt2.eot and [t for t in tgt if t != -1] == gpt2.encode("Paris")
    with pytest.raises(ValueError):
        span_example(gpt2, "x", "  ")


def test_span_example_word_tokenizer():
    tok = WordTokenizer.build(["Ann plays for Kugo Rovers ."])
    idx, tgt = span_example(tok, "Ann plays for", "Kugo Rovers")
    assert words(tok, idx) == "Ann plays for Kugo"
    assert tgt == [-1, -1, tok.index["Kugo"], tok.index["Rovers"]]

# ----------------------------------------------------------------------------- CLI


def test_probes_cli_error(tmp_path, capsys):
    from experiments import realdata
    with pytest.raises(SystemExit) as e:
        realdata.main(["probes", "--probes", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
