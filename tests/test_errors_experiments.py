"""Bad input to the scripts under experiments/ (issue 18, round 2): export, compare, plot, demo, bench. Each
case: exit code 2, one line on stderr naming the file or flag, no traceback, nothing on disk lost or half
written. Tiny models built in process; no training, no network."""
import json
import os

import pytest
import torch

import checkpoint as C
import model as M
from data import WordTokenizer
from experiments import bench, compare, demo, export, plot

UNITS = ["embed", "h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp", "ln_f"]


def one_line_error(capsys, fn, argv, name):
    """fn(argv) must exit 2 with one stderr line naming `name`, no traceback; returns the line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and "error" in err[0] and "Traceback" not in err[0] and "usage" not in err[0], err
    assert name in err[0], err
    return err[0]


def tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    return M.GPT(M.GPTConfig(block_size=16, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Two exported models (a, b: different weights) to export from, and a file."""
    d = tmp_path_factory.mktemp("exp")
    tok = WordTokenizer.build(["Ann plays for Kugo Rovers ."])
    for name, seed in (("a", 0), ("b", 1)):
        export.export(tiny_model(tok.n_vocab, seed), tok, d / name)
    (d / "a_file").write_text("x")
    return d


# ----------------------------------------------------------------------------- 1. export

def test_export_never_replaces_another_models_files(hf, tmp_path, capsys):
    only_st = tmp_path / "only_st"
    only_st.mkdir()
    (only_st / "model.safetensors").write_bytes(b"the user's weights")
    other = tmp_path / "other"
    export.main(["--init", str(hf / "b"), "--out", str(other)])
    before = {f: (other / f).read_bytes() for f in os.listdir(other)}
    for out in (only_st, other):
        one_line_error(capsys, export.main, ["--init", str(hf / "a"), "--out", str(out)], "--overwrite")
    assert (only_st / "model.safetensors").read_bytes() == b"the user's weights"
    assert {f: (other / f).read_bytes() for f in os.listdir(other)} == before
    one_line_error(capsys, export.main, ["--init", str(hf / "a"), "--out", str(hf / "a_file")], "--out")
    under_a_file = str(hf / "a_file" / "sub")
    one_line_error(capsys, export.main, ["--init", str(hf / "a"), "--out", under_a_file], "--out")
    one_line_error(capsys, export.main, ["--init", str(hf / "a"), "--out", ""], "--out")
    with pytest.raises(ValueError, match="--overwrite"):  # the function twiki.py's --export-hf may call
        export.export(C.load_model(str(hf / "a")), WordTokenizer.load(hf / "a" / "tokenizer.json"), other)
    with pytest.raises(ValueError, match="already holds config.json"):  # the low-level writer too
        export.save_hf(tiny_model(20), other)
    assert {f: (other / f).read_bytes() for f in os.listdir(other)} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    export.main(["--init", str(hf / "a"), "--out", str(empty)])  # an empty folder: fine
    export.main(["--init", str(hf / "a"), "--out", str(empty)])  # a rerun of the same --init replaces its own
    assert (empty / "model.safetensors").read_bytes() == (hf / "a" / "model.safetensors").read_bytes()


def test_export_overwrite_keeps_old_files_until_the_new_ones_are_complete(hf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    export.main(["--init", str(hf / "b"), "--out", str(out)])
    (out / "notes.txt").write_text("keep me")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def crash(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "save_tokenizer", crash)  # dies after the weights are written
    one_line_error(capsys, export.main, ["--init", str(hf / "a"), "--out", str(out), "--overwrite"], "space")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # no stage left, nothing replaced
    monkeypatch.undo()
    one_line_error(capsys, export.main, ["--init", str(hf / "a"), "--out", str(out), "--overwrite",
                                         "--tokenizer", str(tmp_path / "typo.json")], "--tokenizer")
    export.main(["--init", str(hf / "a"), "--out", str(out), "--overwrite"])
    assert (out / "model.safetensors").read_bytes() == (hf / "a" / "model.safetensors").read_bytes()
    assert (out / "notes.txt").read_text() == "keep me" and not list(out.glob(".export.*"))


# ----------------------------------------------------------------------------- 2. compare

@pytest.mark.parametrize("content,name", [
    ([1, 2], "list.json"),
    ({"probes": 3}, "num.json"),  # train.py's summary.json whose probes is a number
    ({"summary": {"new": {"ppl": "3.2", "em": 0.5, "n": 2}}}, "str.json"),
    ({"summary": {"new": {"em": 0.5, "n": 2}}}, "miss.json"),
    ({"summary": {"new": {"ppl": 3.2, "em": 50, "n": 2}}}, "pct.json"),  # em is a fraction 0..1
    ({"rows": [{"stage": 1}]}, "rows.json"),
])
def test_compare_wrong_shapes_name_the_file(tmp_path, capsys, content, name):
    (tmp_path / name).write_text(json.dumps(content))
    one_line_error(capsys, compare.main, [str(tmp_path / name)], name)


def test_compare_refuses_flags_and_prints_em_in_percent(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"probes": {"new": {"ppl": 3.25, "em": 0.125, "n": 8}}}))
    first = {"step": 1, "probes": {"new": {"ppl": 4.0, "em": 0.5, "n": 8}}}
    torn = '{"step": 2, "pro'  # a run still writing, or killed mid-line
    (run / "metrics.jsonl").write_text(json.dumps(first) + "\n" + torn)
    for flag in ("--init", "--probes"):
        one_line_error(capsys, compare.main, [str(run), flag, "gpt2"], flag)
    table = compare.main([str(run / "summary.json"), str(run)]).splitlines()
    assert "EM %" in table[0] and "3.25 / 12.5" in table[1] and "4.00 / 50.0" in table[1], table


# ----------------------------------------------------------------------------- 3. plot

def metrics_line(step, **kw):
    return json.dumps(dict(dict(step=step, loss=2.0 / step, grad_norms={u: 1.0 for u in UNITS}), **kw))


@pytest.mark.parametrize("line", [
    '{"step": "1", "loss": 2.0}', '{"step": 1, "loss": "2.0"}', "[1, 2]", '{"step": 1}',
    '{"step": 1, "loss": 2.0, "probes": [1]}', '{"step": 1, "loss": 2.0, "grad_norms": {"embed": "x"}}',
    '{"step": 1, "loss": 2.0, "probes": {"new": {"ppl": null}}}', "{not json"])
def test_plot_rows_of_the_wrong_types_name_file_and_line(tmp_path, capsys, line):
    path = tmp_path / "metrics.jsonl"
    path.write_text(metrics_line(1) + "\n" + line + "\n" + metrics_line(3) + "\n")
    one_line_error(capsys, plot.main, [str(path)], f"{path}:2")


def test_plot_outputs_checked_first_and_written_as_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(metrics_line(1) + "\n" + metrics_line(2) + "\n" + '{"step": 3, "lo')
    (tmp_path / "adir").mkdir()
    nope = str(tmp_path / "nope")  # not a run: had plot.py read first, the error would name it
    one_line_error(capsys, plot.main, [nope, "--png", str(tmp_path / "missing" / "f.png")], "--png")
    one_line_error(capsys, plot.main, [nope, "--out", str(tmp_path / "missing" / "f.txt")], "--out")
    one_line_error(capsys, plot.main, [str(run), "--png", str(tmp_path / "adir")], "--png")
    one_line_error(capsys, plot.main, [str(run), "--png", str(tmp_path / "fig")], ".png")
    assert sorted(os.listdir(tmp_path)) == ["adir", "run"]  # no adir.png, no fig.png
    line = one_line_error(capsys, plot.main, [str(run), "--units", "h.0.atn"], "--units")
    assert "h.0.attn" in line and "ln_f" in line  # the known units
    runs = plot.main([str(run), "--png", str(tmp_path / "f.png"), "--units", "embed"])  # torn line: left out
    assert [p[0] for p in runs["run"]["loss"]] == [1, 2] and "grad h.0.mlp" not in runs["run"]
    out = capsys.readouterr()
    assert f"wrote {tmp_path / 'f.png'}" in out.out and "unfinished last line" in out.err
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("trace", [
    {"rgn": {u: 1.0 for u in UNITS}, "splits": [1]},
    {"rgn": {u: 1.0 for u in UNITS}, "splits": {"all": {"rgn": {u: "1" for u in UNITS}}}},
    {"rgn": {u: 1.0 for u in UNITS}, "selection": {"select": "bogus"}},
    {"rgn": {"embed": 1.0}},  # no layer to rank
    {"rgn": {u: 1.0 for u in UNITS}, "selection": 3},
])
def test_plot_malformed_trace_is_one_line(tmp_path, capsys, trace):
    (tmp_path / "t.json").write_text(json.dumps(trace))
    one_line_error(capsys, plot.main, ["--trace", str(tmp_path / "t.json")], "t.json")


# ----------------------------------------------------------------------------- 4. demo

def test_demo_flags_checked_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the demo started work on bad flags")
    monkeypatch.setattr(demo, "one_seed", no_work)
    (tmp_path / "a_file").write_text("x")
    out = ["--quick", "--out", str(tmp_path / "d")]
    cases = [(["--quick", "--out", str(tmp_path / "a_file")], "--out"),
             (["--quick", "--out", str(tmp_path / "a_file" / "sub")], "--out"),
             (out + ["--seeds", "-1"], "--seeds"), (out + ["--seeds", "0", "0"], "--seeds"),
             (out + ["--seeds", "x"], "--seeds"), (out + ["--jobs", "0"], "--jobs"),
             (out + ["--threads", "-2"], "--threads"), (out + ["--steps", "0"], "--steps"),
             (out + ["--lr", "nan"], "--lr"), (out + ["--lora-lr", "0"], "--lora-lr"),
             (out + ["--lora-rank", "0"], "--lora-rank"),
             (out + ["--pretrain-steps", "-5"], "--pretrain-steps"),
             (out + ["--results", str(tmp_path / "missing" / "r.md")], "--results"),
             (out + ["--results", str(tmp_path)], "--results"),
             (out + ["--results", str(tmp_path / "r.json")], "--results"),
             (out + ["--world=mars"], "--world")]
    for argv, name in cases:
        one_line_error(capsys, demo.main, argv, name)
    assert (tmp_path / "a_file").read_text() == "x" and not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------- 5. bench

def test_bench_errors_are_one_line_naming_the_flag(capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench_train", lambda **kw: pytest.fail("ran with a bad flag"))
    for argv, name in [(["train", "--device", "foo"], "--device"),
                       (["train", "--device", "cpu:1"], "--device"),
                       (["train", "--device", "cuda:99"], "--device"), (["train", "--steps", "0"], "--steps"),
                       (["train", "--n-head", "3"], "--n-head"), (["train", "--seed", "-1"], "--seed"),
                       (["train", "--nope"], "--nope"), (["bogus"], "bogus")]:
        one_line_error(capsys, bench.main, argv, name)
    if not torch.cuda.is_available():
        one_line_error(capsys, bench.main, ["train", "--device", "cuda"], "--device")


# ----------------------------------------------------------------------------- 6. other hostile input

def test_empty_binary_and_folder_inputs(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "run").mkdir()  # a folder without metrics.jsonl
    for name in ("empty.jsonl", "bin.jsonl", "run"):
        one_line_error(capsys, plot.main, [str(tmp_path / name)], name)
        one_line_error(capsys, compare.main, [str(tmp_path / name)], name)
    for name in ("empty.json", "bin.jsonl", "folder.json"):
        one_line_error(capsys, plot.main, ["--trace", str(tmp_path / name)], name)
    one_line_error(capsys, compare.main, [str(tmp_path / "empty.json")], "empty.json")
    one_line_error(capsys, export.main, ["--init", str(tmp_path / "bin.jsonl"), "--out", str(tmp_path / "o")],
                   "bin.jsonl")
    assert not (tmp_path / "o").exists()
