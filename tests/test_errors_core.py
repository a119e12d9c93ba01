"""Bad input, round 2, on the method's files: input read as it means (a byte-order mark, a symlinked
folder), silently wrong input refused (an unknown tokenizer, a reversed date range, a file given twice,
list-valued fields, --control without TGL), a bad PATH@N, a resume on changed data. Each a one-line
error that names the file or flag (exit 2) or the right result."""
import json
import os

import pytest

import data
from experiments import probe_files
import probe
import train

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--log-every", "1", "--threads", "1", "--steps", "2"]


@pytest.fixture
def w(tmp_path):
    words = [f"w{i}" for i in range(30)]
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(words[(i + j) % 30] for j in range(20))
                                                   for i in range(30)))
    data.WordTokenizer.build([" ".join(words)]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "probes.jsonl").write_text(
        json.dumps({"query": "w1 w2 _X_.", "answer": [{"name": "w3"}], "id": "p0", "date": "2018"}) + "\n" +
        json.dumps({"query": "w4 w5 _X_.", "answer": [{"name": "w6"}], "id": "p1", "date": "2019-Q1"}) + "\n")
    return tmp_path


def one_line(capsys, fn, argv, *names):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert all(n in err[0] for n in names), err
    return err[0]


def train_argv(w, *extra, out="run"):
    return ["--data", str(w / "text.txt"), "--out", str(w / out), "--tokenizer", str(w / "tokenizer.json")] + \
        TINY + list(extra)


def test_unknown_tokenizer_name_is_refused_not_gpt2(w, capsys):
    one_line(capsys, train.main, train_argv(w, "--tokenizer", "gtp2"), "gtp2")
    with pytest.raises(ValueError, match="gtp2"):
        data.load_tokenizer("gtp2")
    assert data.load_tokenizer("gpt2").name == "gpt2"  # a hub name is GPT-2 BPE


def test_probe_specs_read_as_they_mean(w, capsys):
    p = str(w / "probes.jsonl")
    assert {x.id for x in probe_files.read_probes(p + "@2018..2019")} == {"p0", "p1"}  # 2019-Q1 is in 2019
    assert [x.id for x in probe_files.read_probes(p + "@2019")] == ["p1"]
    one_line(capsys, probe.main, ["--init", str(w), "--probes", p + "@2019..2016"], "2019..2016", "reversed")
    one_line(capsys, probe.main, ["--init", str(w), "--probes", p, p], "probes.jsonl", "twice")
    one_line(capsys, probe.main, ["--init", str(w), "--probes", p, p + ":other"], "twice")
    (w / "list.jsonl").write_text(json.dumps({"query": ["w1 _X_."], "answer": "w2"}) + "\n")
    one_line(capsys, probe.main, ["--init", str(w), "--probes", str(w / "list.jsonl")], "list.jsonl:1", "'query'")
    (w / "rel.jsonl").write_text(json.dumps({"query": "w1 _X_.", "answer": "w2", "relation": {"a": 1}}) + "\n")
    one_line(capsys, probe.main, ["--init", str(w), "--probes", str(w / "rel.jsonl")], "rel.jsonl:1", "'relation'")


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "t.txt").write_bytes("\ufeffAnn plays.\n\nBob sings.\n".encode("utf-8"))
    assert list(data.iter_documents(tmp_path / "t.txt")) == ["Ann plays.", "Bob sings."]
    (tmp_path / "d.csv").write_bytes("\ufefftext\nAnn plays.\n".encode("utf-8"))
    assert list(data.iter_documents(tmp_path / "d.csv")) == ["Ann plays."]
    (tmp_path / "0801-0901_changed.csv").write_bytes("\ufeffsubject,relation,object\nAnn,plays for,Rovers\n".encode())
    [p] = probe_files.read_probes(str(tmp_path / "0801-0901_changed.csv"))
    assert (p.prompt, p.answers, p.split) == ("Ann plays for", ["Rovers"], "changed")


def test_a_symlinked_subfolder_is_read_once_even_in_a_loop(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "b.txt").write_text("Bob sings.")
    top = tmp_path / "texts"
    top.mkdir()
    (top / "a.txt").write_text("Ann plays.")
    os.symlink(real, top / "linked")
    os.symlink(top, real / "loop")  # texts/linked/loop -> texts: must not recurse forever
    assert list(data.iter_documents(top)) == ["Ann plays.", "Bob sings."]


def test_control_without_tgl_and_bad_token_counts_are_flag_errors(w, capsys):
    one_line(capsys, train.main, train_argv(w, "--control", "complement"), "--control")
    for spec in ("@xyz", "@20,seed=x", "@-5", "@0"):
        one_line(capsys, train.main, train_argv(w, "--data", str(w / "text.txt") + spec), spec, "token count")
    assert data.parse_text_spec(str(w / "text.txt") + "@2k") == (str(w / "text.txt"), 2000)


def test_resume_refuses_changed_data(w, capsys):
    train.main(train_argv(w, "--save-every", "1"))
    with open(w / "text.txt", "a") as f:
        f.write("\n\nw1 w2 w3 w4 w5")
    err = one_line(capsys, train.main, train_argv(w, "--resume", "--steps", "3"), "text.txt", "changed")
    assert "--overwrite" in err
    summary = train.main(train_argv(w, "--overwrite", "--steps", "3"))
    assert summary["steps"] == 3
