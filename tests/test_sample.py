"""experiments/sample.py: the text is model.GPT.generate's continuation, greedy by default, seeded when
sampled; a run folder's own tokenizer is used; bad input is one line."""
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from checkpoint import save_checkpoint
from data import WordTokenizer
from experiments import sample
from model import GPT, GPTConfig
from test_errors_experiments import one_line_error

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Ann plays for Kugo Rovers . Bob works at Acme Labs , in Oslo . Cid lives in Rome ."


@pytest.fixture
def run(tmp_path):
    """A tiny random GPT saved as train.py saves a run: ckpt.pt and tokenizer.json."""
    tok = WordTokenizer.build([TEXT])
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():  # a sharper model than GPT-2's init: its greedy tokens differ from step to step
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    folder = tmp_path / "run"
    folder.mkdir()
    state = {"config": asdict(model.config), "model": model.state_dict(), "lora": None}
    save_checkpoint(folder / "ckpt.pt", state)
    tok.save(folder / "tokenizer.json")
    return folder, model, tok


def test_greedy_text_is_generate_decoded(run, capsys):
    folder, model, tok = run
    text = sample.main(["--init", str(folder), "--prompt", "Ann plays for", "--max-new-tokens", "20"])
    assert capsys.readouterr().out == "Ann plays for" + text + "\n"
    ids = tok.encode("Ann plays for")
    want = model.generate(torch.tensor([ids]), 20)[0, len(ids):].tolist()
    assert tok.encode(text) == want and len(want) == 20 and len(set(want)) > 1
    assert sample.main(["--init", str(folder), "--prompt", "Ann plays for", "--max-new-tokens", "20"]) == text


def test_sampling_follows_the_seed(run):
    folder = str(run[0])
    argv = ["--init", folder, "--prompt", "Bob works at", "--max-new-tokens", "12", "--temperature", "2"]
    draws = [sample.main(argv + ["--seed", str(s)]) for s in (0, 0, 1, 2, 3)]
    assert draws[0] == draws[1]  # the same seed, the same text
    assert len(set(draws[1:])) > 1  # other seeds, other text
    greedy = sample.main(["--init", folder, "--prompt", "Bob works at", "--max-new-tokens", "12"])
    assert sample.main(argv + ["--top-k", "1"]) == greedy


def test_decode_word_spacing():
    tok = WordTokenizer.build([TEXT])
    ids = tok.encode("Bob works at Acme Labs , in Oslo .")
    assert sample.decode(tok, ids) == " Bob works at Acme Labs, in Oslo."


def test_bad_input_is_one_line(run, capsys, tmp_path):
    folder = str(run[0])
    one_line_error(capsys, sample.main, ["--init", folder, "--prompt", "Ann", "--top-k", "3"], "--top-k")
    one_line_error(capsys, sample.main, ["--init", str(tmp_path / "nope"), "--prompt", "Ann"], "nope")
    one_line_error(capsys, sample.main, ["--init", folder, "--prompt", "Ann", "--temperature", "-1"],
                   "--temperature")
    one_line_error(capsys, sample.main, ["--init", folder, "--prompt", "Ann", "--tokenizer", "gpt2"],
                   "--tokenizer")  # GPT-2 BPE's 50,257 tokens do not fit this model's word vocabulary


def test_module_runs_from_the_command_line(run):
    folder, _, tok = run
    prompt = "Cid lives in Narnia"
    argv = ["--init", str(folder), "--prompt", prompt, "--max-new-tokens", "3"]
    command = [sys.executable, "-m", "experiments.sample", *argv]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(prompt) and len(tok.encode(out.stdout[len(prompt):])) == 3
    assert "<unk>" in out.stderr  # Narnia is not in the vocabulary, and the user is told
    assert "<unk>" in out.stderr  # Narnia is not in the vocabulary, and the user is told
