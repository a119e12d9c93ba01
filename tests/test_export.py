"""experiments/export.py: what transformers loads is what we wrote (model logits, tokenizer ids), LoRA merged
into a copy, the script's refusals. transformers is the reference, imported inside tests only."""
from dataclasses import asdict

import pytest
import torch

import data
import checkpoint as C
import model as M
from data import WordTokenizer
from experiments import export
from experiments import hf as H

VOCAB = 61
IDX = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))


def tiny(arch="gpt2", vocab=VOCAB):
    torch.manual_seed(0)
    if arch == "gpt2":
        return M.GPT(M.GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16))
    return M.GPT(M.GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, arch="gpt_neo",
                             qkv_bias=False, scale_attn=False, attention_layers=["global", "local"], window_size=3))


def logits(model, idx):
    with torch.no_grad():
        out = model.eval()(idx)
    return out[0] if isinstance(out, tuple) else out.logits


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_export_round_trip_through_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM
    model = tiny(arch)
    M.add_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p))  # LoRA B too, so the merge is exercised
    want = logits(model, IDX)
    export.save_hf(model, tmp_path / "out")
    assert model.transformer.h[0].attn.c_attn.lora_A is not None  # the live model keeps its adapters
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(ref).__name__ == {"gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM"}[arch]
    assert (logits(ref, IDX) - want).abs().max() < 1e-4
    back = H.load_hf(str(tmp_path / "out"))  # and our own loader reads what we wrote
    assert back.config.attention_layers == model.config.attention_layers
    assert (logits(back, IDX) - want).abs().max() < 1e-4
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_model_transformers_has_no_class_for_is_refused(tmp_path):
    model = tiny()
    model.config.attention_layers = ["global", "local"]  # GPT-2 weights with a local layer: neither format
    with pytest.raises(ValueError, match="no Hugging Face model matches"):
        export.save_hf(model, tmp_path / "x")


# ----------------------------------------------------------------------------- tokenizers

TEXTS = ["Hello world", "  leading spaces,   runs of them\tand tabs\n\nand newlines\n",
         "naïve café 東京 😀 Ünïcödé",
         "1234567 3.14159 -42 1e-9", "don't it's we'll I'M 'quoted'", "aaaaaaaaaaaaaaaa", "x\r\ny  \n"]


def test_gpt2_export_encodes_like_tiktoken(tmp_path):
    from transformers import AutoTokenizer
    gpt2 = data.GPT2Tokenizer()
    export.save_tokenizer(gpt2, tmp_path, 1024)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for s in TEXTS:
        assert hf(s)["input_ids"] == gpt2.encode(s), s
        assert hf.decode(gpt2.encode(s)) == s
    assert hf.eos_token_id == gpt2.eot and len(hf) == gpt2.n_vocab
    assert isinstance(data.load_tokenizer(tmp_path), data.GPT2Tokenizer)


def test_word_export_loads_in_autotokenizer_and_back(tmp_path):
    from transformers import AutoTokenizer
    tok = WordTokenizer.build(["Hello world, it's a test. Über 42 times_x!"])
    export.save_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for s in ["Hello world, it's a test.", "Über 42 unknown words times_x!!", "  Hello\n\nworld <eot> <unk> x"]:
        assert hf(s)["input_ids"] == tok.encode(s), s
    back = data.load_tokenizer(tmp_path)  # our own loader reads the exported file as the same vocabulary
    assert isinstance(back, WordTokenizer) and back.vocab == tok.vocab


# ----------------------------------------------------------------------------- the script

def lora_run(tmp_path, tok):
    """A run folder as train.py leaves it after --method lora: ckpt.pt with adapters, tokenizer.json."""
    model = tiny(vocab=tok.n_vocab)
    M.add_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    run = tmp_path / "run"
    run.mkdir()
    C.save_checkpoint(run / C.CKPT_NAME, {"config": asdict(model.config), "model": model.state_dict(),
                                          "lora": model.lora})
    tok.save(run / "tokenizer.json")
    return run, model


def test_cli_writes_a_folder_transformers_loads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = WordTokenizer.build(["Ann plays for Kugo Rovers ."])
    run, model = lora_run(tmp_path, tok)
    want = logits(model, IDX % tok.n_vocab)
    export.main(["--init", str(run), "--out", str(tmp_path / "hf")])
    assert "exported" in capsys.readouterr().out
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (logits(ref, IDX % tok.n_vocab) - want).abs().max() < 1e-4
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))("Ann plays for Rome")["input_ids"] == \
        tok.encode("Ann plays for Rome")


def test_cli_refuses_a_used_out_folder_and_bad_input_in_one_line(tmp_path, capsys):
    tok = WordTokenizer.build(["Ann plays for Kugo Rovers ."])
    run, _ = lora_run(tmp_path, tok)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("x")
    cases = [(["--init", str(run), "--out", str(tmp_path / "used")], "--overwrite"),
             (["--init", str(run), "--out", str(tmp_path / "a_file")], "--out"),
             (["--init", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope"),
             (["--init", str(run)], "--out")]
    for argv, name in cases:
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and name in err[0] and "Traceback" not in err[0], err
    assert (tmp_path / "used" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "used" / "config.json").exists()
    export.main(["--init", str(run), "--out", str(tmp_path / "used"), "--overwrite"])
    assert (tmp_path / "used" / "config.json").is_file() and (tmp_path / "used" / "tokenizer.json").is_file()
    big = tmp_path / "big"
    export.save_hf(tiny(vocab=50257), big)  # GPT-2's vocabulary: --init big exports GPT-2 BPE files
    with pytest.raises(SystemExit):  # the word run with GPT-2's 50257 tokens: refused before anything is removed
        export.main(["--init", str(run), "--out", str(tmp_path / "used"), "--tokenizer", "gpt2", "--overwrite"])
    assert (tmp_path / "used" / "tokenizer.json").is_file()
    export.main(["--init", str(big), "--out", str(tmp_path / "used"), "--overwrite"])
    assert not (tmp_path / "used" / "tokenizer.json").exists()  # the word vocabulary's file would win in AutoTokenizer
    assert (tmp_path / "used" / "vocab.json").is_file() and (tmp_path / "used" / "notes.txt").is_file()
