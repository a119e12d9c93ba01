"""Bad input, round 3 (issue 24): silently wrong reads (an unclosed CSV quote, *_subset.csv in a --data
folder, all-<unk> probes and text, --text-tokens that were not what was scored), the driver's exports
(another model in --export-hf's folder, a re-export killed while moving its files in) and errors found only
after the slow work. Each case: the right result, or exit 2 with one line naming the file or flag, before
anything slow; tiny models and files built here."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
from experiments import probe_files
import probe
import train
import trace as tgl_trace
from checkpoint import save_checkpoint
from experiments import export, fetch, realdata, textppl, twiki, world
from httpserver import HF, zip_bytes
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(30)]
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--log-every", "1", "--threads", "1", "--steps", "3"]


def one_line_error(capsys, fn, argv, name):
    with pytest.raises(SystemExit) as e:
        fn([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and "error" in err[0] and "Traceback" not in err[0], err
    assert name in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A word vocabulary, a text, a probe file, a tiny trained run."""
    d = tmp_path_factory.mktemp("round3")
    (d / "text.txt").write_text("\n\n".join(" ".join(WORDS[(i + j) % 30] for j in range(20)) for i in range(30)))
    data.WordTokenizer.build([" ".join(WORDS)]).save(str(d / "tokenizer.json"))
    (d / "probes.jsonl").write_text(json.dumps({"query": "w1 w2 _X_.", "answer": [{"name": "w3"}], "id": "p0"}) + "\n")
    train.main([str(a) for a in ["--data", d / "text.txt", "--out", d / "run", "--tokenizer", d / "tokenizer.json", *TINY]])
    return d


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may create files in: root writes anywhere a mode forbids, but not in sysfs."""
    if os.geteuid() == 0:
        yield "/sys"
        return
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    yield str(d)
    d.chmod(0o755)

# ----------------------------------------------------------------------------- 1. an unclosed CSV quote


def test_an_unclosed_csv_quote_is_refused_naming_the_line_it_opens(w, tmp_path, capsys):
    closed = tmp_path / "closed.csv"  # TemporalWiki's text fields hold newlines inside closed quotes
    closed.write_text('id,text\n1,"w1 w2\n\nw3 ""w4"""\n2,w5 w6\n')
    assert list(data.iter_documents(closed)) == ['w1 w2\n\nw3 "w4"', "w5 w6"]
    at_end = tmp_path / "at_end.csv"  # the quote opened on line 3 swallowed every row after it
    at_end.write_text('id,text\n1,w1 w2\n2,"w3 w4\n3,w5 w6\n4,w7 w8\n')
    with pytest.raises(ValueError, match=f"{at_end}:3: "):
        list(data.iter_documents(at_end))
    closed_later = tmp_path / "closed_later.csv"  # a later quote closes it: still not what was meant
    closed_later.write_text('id,text\n1,"w1 w2\n2,w3 w4\n3,"w5 w6"\n')
    with pytest.raises(ValueError, match=f"{closed_later}:2: "):
        list(data.iter_documents(closed_later))
    tok = ["--tokenizer", w / "tokenizer.json"]
    one_line_error(capsys, realdata.main, ["tokenize", "--text", at_end, *tok], f"{at_end}:3")
    one_line_error(capsys, train.main, ["--data", at_end, "--out", tmp_path / "r", *tok, *TINY], f"{at_end}:3")
    assert not (tmp_path / "r").exists()
    probes = tmp_path / "0801-0901_changed.csv"  # probe files share the reader
    probes.write_text('subject,relation,object\nw1,w2,"w3\nw4,w5,w6\n')
    with pytest.raises(ValueError, match=f"{probes}:2: "):
        probe_files.read_probes(str(probes))


def test_a_snapshot_csv_with_a_short_row_or_an_open_quote_names_member_and_line(server, capsys):
    for body, line in (("id,text\n0,w1 w2\n1\n2,w3\n", 3), ('id,text\n0,w1\n1,"w2\n2,w3\n', 3)):
        server.files[HF + "Wikipedia_Full.zip"] = zip_bytes({"Wikipedia_Full/wikipedia_08_gpt2/part0.csv": body})
        err = one_line_error(capsys, realdata.main, ["fetch", "twiki-snapshot", "--max-docs", "5"],
                             f"wikipedia_08_gpt2/part0.csv:{line}")
        assert "IndexError" not in err
    assert not list((fetch.cache_root() / "twiki-snapshot").rglob("*.csv"))

# ----------------------------------------------------------------------------- 2. *_subset.csv in a folder


def test_train_data_refuses_a_folder_with_subset_files_as_tokenize_does(w, tmp_path, capsys):
    folder = tmp_path / "diffs"
    folder.mkdir()
    (folder / "wikipedia_0809_gpt2.csv").write_text("text\n" + "".join(f"{' '.join(WORDS)}\n" for _ in range(5)))
    (folder / "wikipedia_0809_subset.csv").write_text("id,text\n1,w1 w2\n")
    tok = ["--tokenizer", w / "tokenizer.json"]
    for fn, argv in ((train.main, ["--data", folder, "--out", tmp_path / "r", *tok, *TINY]),
                     (realdata.main, ["tokenize", "--text", folder, *tok])):
        assert "wikipedia_0809_subset.csv" in one_line_error(capsys, fn, argv, str(folder))
    assert not (tmp_path / "r").exists() and not list(folder.glob("*.tokens.bin"))
    train.main([str(a) for a in ["--data", folder / "wikipedia_0809_gpt2.csv", "--out", tmp_path / "r", *tok, *TINY]])

# ----------------------------------------------------------------------------- 3. all-<unk> answers and text


def test_an_answer_or_text_of_unknown_words_only_is_refused(w, tmp_path, capsys):
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"query": "w1 w2 _X_.", "answer": [{"name": "Zork Blorb"}], "id": "z9"}) + "\n")
    run = w / "run"
    for fn, argv in ((probe.main, ["--init", run, "--probes", w / "probes.jsonl", unknown]),
                     (probe.main, ["--init", run, "--probes", unknown, "--metric", "sentence"])):
        assert "z9" in one_line_error(capsys, fn, argv, str(unknown))
    summary = probe.main(["--init", str(run), "--probes", str(w / "probes.jsonl")])  # a known answer: scored
    assert sum(s["n"] for s in summary.values()) == 1
    text = tmp_path / "unknown.txt"
    text.write_text("Zork blorb quux.\n\nFrobnicate xyzzy.\n")
    one_line_error(capsys, textppl.main, ["--init", run, "--text", text], str(text))
    some = tmp_path / "some.txt"
    some.write_text(" ".join(WORDS) + " Zork\n")
    textppl.main(["--init", str(run), "--text", str(some), "--json", str(tmp_path / "t.json")])
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["unk_tokens"] == 1 and d["scored_tokens"] == 31  # 30 words, <unk>, eot: 31 targets

# ----------------------------------------------------------------------------- 4. --text-tokens is what is scored


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_text_tokens_scores_exactly_that_many_targets(w, tmp_path, n):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j) % 30] for j in range(9)) for i in range(12)))
    out = tmp_path / "t.json"
    textppl.main(["--init", str(w / "run"), "--text", str(text), "--text-tokens", str(n), "--json", str(out)])
    got = json.loads(out.read_text())
    tok, model = data.WordTokenizer.load(w / "tokenizer.json"), probe.load_model(str(w / "run")).eval()
    ids = torch.tensor(data.load_tokens(str(text), tok)[:n + 1].astype("int64"))  # n targets, windows of 16
    nll = sum(F.cross_entropy(model(ids[s:min(s + 16, n)][None])[0][0], ids[s + 1:min(s + 16, n) + 1],
                              reduction="sum").item() for s in range(0, n, 16))
    assert got["text_tokens"] == got["scored_tokens"] == n
    assert got["text_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)

# ----------------------------------------------------------------------------- 5. the driver's exports


def tiny_run(folder, seed, vocab=40):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16))
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(os.path.join(folder, "ckpt.pt"), {"config": model.config.__dict__, "model": model.state_dict(),
                                                      "step": 7})
    data.WordTokenizer.build([" ".join(WORDS)]).save(os.path.join(folder, "tokenizer.json"))
    return model


def test_export_hf_refuses_another_models_folder_and_redoes_a_stale_export(tmp_path, capsys):
    out, hf = tmp_path / "o", tmp_path / "hf"
    base = ["--init", "gpt2", "--out", str(out), "--methods", "full", "--tgl", "none", "--stages", "1",
            "--export-hf", str(hf)]
    cfg = twiki.parse_args(base)
    run = twiki.run_dir(cfg, 1, "full-none")
    tiny_run(run, 0)
    tiny_run(tmp_path / "other", 1)
    dest = hf / "stage1" / "full-none"
    export.main(["--init", str(tmp_path / "other"), "--out", str(dest)])
    weights = (dest / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert "other" in one_line_error(capsys, twiki.main, base + ["--plan"], "--export-hf")  # before anything slow
    assert not twiki.exported(cfg, 1, "full-none") and (dest / "model.safetensors").read_bytes() == weights
    over = twiki.parse_args(base + ["--overwrite"])
    twiki.check_exports(over)  # the driver's --overwrite replaces it
    export.main(twiki.export_argv(over, 1, "full-none")[3:])  # what export_all runs
    assert twiki.exported(cfg, 1, "full-none")
    marker = json.loads((dest / "export.json").read_text())
    assert marker["init"] == os.path.abspath(run) and marker["run"] == {"step": 7, "train_config": None}
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    save_checkpoint(run / "ckpt.pt", dict(ck, step=9))  # the run trained on: its export is stale
    assert not twiki.exported(cfg, 1, "full-none")
    save_checkpoint(run / "ckpt.pt", dict(ck, train_config={"init": "another"}))  # trained again, same step
    assert not twiki.exported(cfg, 1, "full-none")
    twiki.check_exports(cfg)  # an export of the same run folder: re-exported, no --overwrite needed
    export.main(twiki.export_argv(cfg, 1, "full-none")[3:])
    assert twiki.exported(cfg, 1, "full-none")


KILL_AFTER_TWO_MOVES = """
import os, signal, sys
sys.path.insert(0, {root!r})
from experiments import export
real, moved = os.replace, []
def replace(a, b):
    real(a, b)
    staged = [os.path.basename(os.path.dirname(p)).startswith(".export.") for p in (a, b)]
    if staged == [True, False]:  # from the staging folder into --out
        moved.append(b)
        if len(moved) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
export.main(["--init", {init!r}, "--out", {out!r}])
"""


def test_a_reexport_killed_while_moving_in_is_finished_by_the_same_command(tmp_path, capsys):
    tiny_run(tmp_path / "run", 0)
    out = tmp_path / "hf"
    argv = ["--init", str(tmp_path / "run"), "--out", str(out)]
    export.main(argv)
    clean = {f: (out / f).read_bytes() for f in os.listdir(out) if f != "export.json"}
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_MOVES.format(root=ROOT, init=argv[1], out=argv[3])],
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert not (out / "export.json").exists() and list(out.glob(".export.*.tmp"))  # killed half-way
    export.main(argv)  # the identical command
    assert not list(out.glob(".export.*.tmp")) and (out / "export.json").is_file()
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f != "export.json"} == clean
    tiny_run(tmp_path / "other", 1)  # another --init is still refused there without --overwrite
    one_line_error(capsys, export.main, ["--init", str(tmp_path / "other"), "--out", str(out)], "--overwrite")

# ----------------------------------------------------------------------------- 6. errors found after the slow work


def test_unwritable_outputs_are_refused_before_the_run(w, read_only, capsys):
    run, probes = str(w / "run"), str(w / "probes.jsonl")
    for fn, argv, flag in (
            (tgl_trace.main, ["--init", run, "--probes", probes, "--text", w / "text.txt", "--out"], "--out"),
            (probe.main, ["--init", run, "--probes", probes, "--json"], "--json"),
            (textppl.main, ["--init", run, "--text", w / "text.txt", "--json"], "--json")):
        err = one_line_error(capsys, fn, argv + [os.path.join(read_only, "x.json")], flag)
        assert "cannot write" in err
    out = os.path.join(read_only, "run", "sub")  # a folder: refused before training, not at its first write
    err = one_line_error(capsys, train.main, ["--data", str(w / "text.txt"), "--out", out, "--steps", "1"], "--out")
    assert "cannot write" in err and not os.path.exists(out)


def test_twiki_block_size_beyond_the_models_context_is_refused_first(server, tmp_path, capsys):
    init = tmp_path / "init"
    export.save_hf(GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), init)
    argv = ["--init", str(init), "--out", str(tmp_path / "o"), "--block-size", "128", "--stages", "1"]
    err = one_line_error(capsys, twiki.main, argv, "--block-size 128")
    assert "64" in err and not server.log and not (tmp_path / "o").exists()
    run = tmp_path / "run"
    tiny_run(run, 0)  # a run folder's context: from its ckpt.pt
    assert twiki.init_context(str(run)) == 16 and twiki.init_context(str(run / "ckpt.pt")) == 16


def test_a_tokenizer_changed_under_resume_is_named(w, tmp_path, capsys):
    tok = tmp_path / "tok.json"
    tok.write_text((w / "tokenizer.json").read_text())
    argv = ["--data", w / "text.txt", "--out", tmp_path / "r", "--tokenizer", tok, "--save-every", "1", *TINY]
    train.main([str(a) for a in argv])
    vocab = json.loads(tok.read_text())
    v = vocab["vocab"]
    tok.write_text(json.dumps(dict(vocab, vocab=v[:2] + [v[3], v[2]] + v[4:])))  # two words' ids swapped
    err = one_line_error(capsys, train.main, argv + ["--resume", "--steps", "4"], "tokenizer")
    assert "text.txt" not in err


def test_bad_summary_of_a_run_whose_optimizer_was_dropped_names_what_to_move(tmp_path):
    out = tmp_path / "o"
    cfg = twiki.parse_args(["--init", "gpt2", "--out", str(out), "--methods", "full", "--tgl", "none"])
    one, two = twiki.run_dir(cfg, 1, "full-none"), twiki.run_dir(cfg, 2, "full-none")
    for r in (one, two):
        r.mkdir(parents=True)
    (one / "summary.json").write_text("[]")
    with pytest.raises(ValueError, match="train.py --resume writes it again"):
        twiki.finished(one)
    (one / "optimizer-dropped").write_text("dropped")
    with pytest.raises(ValueError) as e:
        twiki.finished(one)
    assert f"move away {one} and {two}" in str(e.value) and "cannot resume" in str(e.value)


def test_tokenize_names_a_bad_at_spec(w, capsys):
    tok = ["--tokenizer", w / "tokenizer.json"]
    err = one_line_error(capsys, realdata.main, ["tokenize", "--text", f"{w / 'text.txt'}@lots", *tok], "@lots")
    assert "not a .txt or .csv" not in err
    realdata.main(["tokenize", "--text", f"{w / 'text.txt'}@20", *map(str, tok)])
    assert capsys.readouterr().out.strip().endswith("20 tokens (word, vocab 32)")


def test_world_update_frac_too_small_for_a_probe_is_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "w"
    argv = ["--out", str(out), "--n-entities", "40", "--heldout-words", "200", "--update-frac"]
    err = one_line_error(capsys, world.main, argv + ["0.001"], "--update-frac 0.001")
    assert not out.exists()
    least = err.split("at least --update-frac ")[1].split()[0]
    meta = world.main(argv + [least])
    assert all(n > 0 for n in meta["counts"]["probes"].values())
