"""experiments/hf_tokenizer.py: the byte-level BPE tokenizer.json of other families (GPT-NeoX, Llama 3,
Qwen2, SmolLM2), built here with the tokenizers library in each family's style, gives
transformers.AutoTokenizer's ids on a multilingual test set, with and without the special tokens; the
BOS goes where AutoTokenizer puts it; SentencePiece files and a missing package are one line; a run
keeps its tokenizer, and an export is read back by AutoTokenizer with the same ids."""
import json
import sys

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import checkpoint as C
import data
import probe
import trace as tgl_trace
import train
from experiments import export
from experiments.hf_tokenizer import HFTokenizer

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
TRAIN = ["The quick brown fox jumps over the lazy dog; it's 2024 and we'll see 12345 foxes.",
         "Grüße aus München! Die Bären über Öl, Äpfel und Übermut.", "東京は日本の首都です。北京是中国的首都。",
         "こんにちは、世界！カタカナとひらがな。", "مرحبا بالعالم، هذه جملة عربية.", "Emoji 😀🚀🎉 and ✓ marks",
         "def f(x):\n    return x + 1  # comment\n\n\tif x:  pass\n", "    leading   spaces\t\ttabs\r\n"]
TESTS = ["Hello world", "Grüße, Bärbel! Über 3 Äpfel für 4,50 €.", "东京和北京都是大城市。", "日本語のテキストです",
         "اللغة العربية جميلة", "party 🎉🎉 time 😀!", "1234567 3.14159 -42 1e-9 2024-06-30",
         "  leading,   runs   of spaces\t\tand tabs\n\n\nnewlines  \n", "for i in range(10):\n    print(i ** 2)\n",
         "don't IT'S we'll I'M 'quoted'", "x\r\ny  \n", "unseen: ğüşıöç ŽŠČ ÿ ß"]


def build(folder, style):
    """A small BPE trained on TRAIN, in `style`'s pipeline, with the tokenizer_config its family ships."""
    tok, specials = Tokenizer(models.BPE()), ["<|endoftext|>", "<|padding|>"]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("neox", "smollm2"))
    split = {"llama3": LLAMA3, "qwen2": QWEN2}.get(style)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        ([pre_tokenizers.Split(Regex(split), behavior="isolated")] if split else [])
        + ([pre_tokenizers.Digits(individual_digits=True)] if style == "smollm2" else []) + [byte_level])
    if style in ("neox", "qwen2"):
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    if style == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN * 3, trainer)
    post = processors.ByteLevel(trim_offsets=False)
    if style == "llama3":  # Llama 3's tokenizer.json: BOS by a template after the ByteLevel offsets fix
        post = processors.Sequence([post, processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", 0)])])
    tok.post_processor = post
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cls = {"neox": "GPTNeoXTokenizer", "llama3": "PreTrainedTokenizerFast", "qwen2": "Qwen2Tokenizer",
           "smollm2": "GPT2Tokenizer"}[style]
    eos = specials[1] if style == "llama3" else specials[0]
    config = {"tokenizer_class": cls, "eos_token": eos, "bos_token": None if style == "qwen2" else specials[0]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


STYLES = ["neox", "llama3", "qwen2", "smollm2"]


@pytest.mark.parametrize("style", STYLES)
def test_ids_equal_autotokenizer(tmp_path, style):
    from transformers import AutoTokenizer
    folder = build(tmp_path / style, style)
    ours, hf = data.load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(ours, HFTokenizer) and ours.name == "hf"
    assert ours.bos == (0 if style == "llama3" else None)  # only Llama 3 prepends a BOS
    assert ours.eot == hf.eos_token_id and ours.n_vocab == len(hf)
    n_ids = 0
    for s in TESTS:
        ids = ours.encode(s)
        assert ids == hf(s, add_special_tokens=False)["input_ids"], s
        assert hf(s)["input_ids"] == ([ours.bos] if ours.bos is not None else []) + ids, s  # with the specials
        assert ours.decode(ids) == hf.decode(ids) == s, s  # a round trip
        n_ids += len(ids)
    assert n_ids < 0.8 * len("".join(TESTS).encode())  # the merges act: not bytes alone
    # the examples' tokens begin as AutoTokenizer(prompt) with add_special_tokens=True
    idx, tgt = data.span_example(ours, "Grüße aus", "München")
    assert idx[:len(hf("Grüße aus")["input_ids"])] == hf("Grüße aus")["input_ids"]
    assert idx + [t for t in tgt[-1:]] == hf("Grüße aus München")["input_ids"]
    idx, tgt = data.sentence_example(ours, "Grüße aus", "München")
    want = hf("Grüße aus München")["input_ids"]
    assert idx + tgt[-1:] == (want if ours.bos is not None else [ours.eot] + want)


def test_special_text_in_data_is_plain_text(tmp_path):
    from transformers import AutoTokenizer
    folder = build(tmp_path / "l3", "llama3")
    ours = data.load_tokenizer(str(folder / "tokenizer.json"))  # the file itself names its folder
    s = "end <|end_of_text|> and <|begin_of_text|> again"
    assert ours.eot not in ours.encode(s) and ours.bos not in ours.encode(s)  # as tiktoken's encode_ordinary
    split = AutoTokenizer.from_pretrained(str(folder), split_special_tokens=True)
    assert ours.encode(s) == split(s, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(s)) == s


def test_token_stream_puts_bos_and_eos_around_each_document(tmp_path):
    tok = data.load_tokenizer(str(build(tmp_path / "l3", "llama3")))
    (tmp_path / "t.txt").write_text("Grüße aus München.\n\n東京は日本の首都です。\n")
    stream = data.load_tokens(str(tmp_path / "t.txt"), tok).tolist()
    assert stream == [0, *tok.encode("Grüße aus München."), 1, 0, *tok.encode("東京は日本の首都です。"), 1]
    other = data.load_tokenizer(str(build(tmp_path / "q", "qwen2")))
    assert other.fingerprint != tok.fingerprint and other.bos is None
    assert data.load_tokens(str(tmp_path / "t.txt"), other).tolist()[-1] == other.eot


def test_gpt2_folders_keep_tiktoken(tmp_path):
    """A GPT-2 / GPT-Neo folder whose tokenizer.json is GPT-2's own stays tiktoken's "gpt2" (token caches
    and --resume unchanged); a hub GPT-2 name downloads nothing."""
    gpt2 = data.GPT2Tokenizer()
    vocab = {chr(0x120) + "the": 262, **{f"t{i}": i for i in range(50256) if i != 262}, "<|endoftext|>": 50256}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    assert data.load_tokenizer(str(tmp_path)).fingerprint == gpt2.fingerprint == "gpt2"
    assert data.load_tokenizer("EleutherAI/gpt-neo-125m").name == "gpt2"


def test_sentencepiece_and_foreign_files_are_refused(tmp_path):
    sp = tmp_path / "llama2"
    sp.mkdir()
    (sp / "tokenizer.model").write_bytes(b"\x0a\x05spm")
    with pytest.raises(ValueError, match=r"llama2/tokenizer\.model: a SentencePiece tokenizer"):
        data.load_tokenizer(str(sp))
    # Llama 2 / Mistral's tokenizer.json: BPE with byte fallback behind a Metaspace pre-tokenizer
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(sp / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"llama2/tokenizer\.json: a SentencePiece tokenizer"):
        data.load_tokenizer(str(sp))
    (tmp_path / "bpe").mkdir()
    (tmp_path / "bpe" / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(ValueError, match="not a byte-level BPE tokenizer"):
        data.load_tokenizer(str(tmp_path / "bpe"))
    folder = build(tmp_path / "noeos", "neox")
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no EOS token"):
        data.load_tokenizer(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "eos_token_id": 0}))
    assert data.load_tokenizer(str(folder)).eot == 0  # config.json's eos_token_id, as transformers reads it
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "add_bos_token": True}))
    with pytest.raises(ValueError, match="add_bos_token is True, but tokenizer.json's post_processor adds no BOS"):
        data.load_tokenizer(str(folder))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="a gpt_neox model without tokenizer.json"):
        data.load_tokenizer(str(folder))
    with pytest.raises(ValueError, match="no such file or folder, nor a hub name"):
        data.load_tokenizer(str(tmp_path / "typo"))


def test_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
    folder = build(tmp_path / "neox", "neox")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ValueError, match=r"tokenizer\.json: reading it needs the tokenizers package: "
                                         r"pip install tokenizers"):
        data.load_tokenizer(str(folder))
    from experiments import realdata
    (tmp_path / "t.txt").write_text("some text\n")
    with pytest.raises(SystemExit) as e:
        realdata.main(["tokenize", "--text", str(tmp_path / "t.txt"), "--tokenizer", str(folder)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "pip install tokenizers" in err


def test_run_keeps_its_tokenizer_and_export_loads_in_autotokenizer(tmp_path):
    """train.py from a family's tokenizer: the run folder keeps the files, so probe.py and export find the
    same tokenizer there; the export loads in AutoTokenizer with the same ids."""
    from transformers import AutoTokenizer
    folder = build(tmp_path / "l3", "llama3")
    (tmp_path / "t.txt").write_text("\n\n".join(TRAIN * 4))
    (tmp_path / "p.jsonl").write_text(json.dumps({"query": "Grüße aus _X_.", "answer": "München"}) + "\n")
    run = tmp_path / "run"
    train.main(["--init", "scratch", "--tokenizer", str(folder), "--data", str(tmp_path / "t.txt"), "--out", str(run),
                "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32", "--steps", "2",
                "--batch-size", "2", "--device", "cpu", "--probes", str(tmp_path / "p.jsonl")])
    assert (run / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    kept = data.load_tokenizer(str(run))
    assert kept.fingerprint == data.load_tokenizer(str(folder)).fingerprint and kept.bos == 0
    summary = probe.main(["--init", str(run), "--probes", str(tmp_path / "p.jsonl"), "--device", "cpu"])
    assert summary  # probe.py scored it with the kept tokenizer, and trace.py traces with it
    d = tgl_trace.main(["--init", str(run), "--probes", str(tmp_path / "p.jsonl"), "--text", str(tmp_path / "t.txt"),
                        "--out", str(tmp_path / "trace.json"), "--n-lm", "2", "--device", "cpu"])
    assert d["counts"]["span"] == {"p": 1} and all(v > 0 for v in d["span_norm"].values())
    from experiments.sample import sample
    said = sample(C.load_model(str(run)), kept, "Grüße aus", max_new_tokens=3)
    assert isinstance(said, str) and said == kept.decode(kept.encode(said))  # decoded by the family's decoder
    export.main(["--init", str(run), "--out", str(tmp_path / "hf")])
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for s in TESTS:
        assert hf(s)["input_ids"] == [kept.bos] + kept.encode(s), s
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert data.load_tokenizer(str(tmp_path / "hf")).fingerprint == kept.fingerprint
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())  # the family's ids, not GPT-2's 50256
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (kept.bos, kept.eot)
