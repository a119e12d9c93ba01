"""Bad input, every script: exit code 2, one line on stderr that names the file or flag, no traceback.
Also: resume refuses changed run flags, a finished run's summary is reproduced, crash leftovers are
cleaned. The cases are classes of careless input, one or more examples each; tiny configs, in process."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import probe
import train
import trace as tgl_trace
from experiments import compare, export
from checkpoint import save_checkpoint
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--tokenizer", "word", "--log-every", "1", "--threads", "1", "--steps", "3"]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A word vocabulary, a text, probes, a tiny trained run, a trace, and some broken files."""
    d = tmp_path_factory.mktemp("errors")
    words = [f"w{i}" for i in range(30)]
    (d / "text.txt").write_text("\n\n".join(" ".join(words[(i + j) % 30] for j in range(20)) for i in range(30)))
    import data
    data.WordTokenizer.build([" ".join(words)]).save(str(d / "tokenizer.json"))
    (d / "probes.jsonl").write_text(json.dumps({"query": "w1 w2 _X_.", "answer": [{"name": "w3"}], "id": "p0"}) + "\n")
    (d / "long.jsonl").write_text(json.dumps({"query": " ".join(words) + " _X_.", "answer": [{"name": "w3"}], "id": "p9"}) + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (d / "a_file").write_text("x")
    train.main(["--data", str(d / "text.txt"), "--out", str(d / "run"), "--tokenizer", str(d / "tokenizer.json")] + TINY)
    units = ["embed", "h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp", "ln_f"]
    (d / "trace_str.json").write_text(json.dumps({"rgn": {u: "3" for u in units}}))
    (d / "trace_nan.json").write_text(json.dumps({"rgn": {u: 1.0 for u in units}}).replace("1.0}", "NaN}"))
    (d / "trace_ok.json").write_text(json.dumps({"rgn": {u: float(i) for i, u in enumerate(units)}}))
    (d / "vocab_bad.json").write_text(json.dumps({"type": "word", "vocab": ["a", "b"]}))
    torch.save({"model": {"transformer.wte.weight": torch.zeros(2, 2)}, "model_args": {"n_layer": 2}}, d / "nanogpt.pt")
    (d / "truncated").mkdir()
    (d / "truncated" / "ckpt.pt").write_bytes((d / "run" / "ckpt.pt").read_bytes()[:300])
    hf = d / "hf_bad"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 16, "vocab_size": 40, "n_layer": 1,
                                                "n_head": 3, "n_embd": 16}))
    (d / "hf_binary").mkdir()
    (d / "hf_binary" / "config.json").write_bytes(b"\xff{")
    return d


def one_line_error(capsys, fn, argv, name):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and "error" in err[0] and "Traceback" not in err[0], err
    assert name in err[0], err
    return err[0]


def train_argv(w, *extra, out="x"):
    return ["--data", str(w / "text.txt"), "--out", str(w / out), "--tokenizer", str(w / "tokenizer.json"),
            "--init", str(w / "run")] + TINY + list(extra)


TRAIN_FLAG_CASES = [  # (extra flags, what the one line must name)
    (["--init", "scratch", "--n-embd", "16", "--n-head", "3"], "--n-embd"),
    (["--beta1", "1"], "--beta1"),
    (["--beta2", "1.5"], "--beta2"),
    (["--method", "lora", "--lora-rank", "0"], "--lora-rank"),
    (["--dropout", "2"], "--dropout"),
    (["--threads", "-1"], "--threads"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--block-size", "-4"], "--block-size"),
    (["--block-size", "0"], "--block-size"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--grad-clip", "inf"], "--grad-clip"),
    (["--control", "random:x"], "--control"),
    (["--floor", "nan"], "--floor"),
    (["--device", "warp9"], "--device"),
]


@pytest.mark.parametrize("extra,name", TRAIN_FLAG_CASES, ids=[c[1] + ":" + " ".join(c[0][-1:]) for c in TRAIN_FLAG_CASES])
def test_train_bad_flags(w, capsys, extra, name):
    one_line_error(capsys, train.main, train_argv(w, *extra), name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this case is about a torch that has no CUDA")
def test_train_cuda_on_a_cpu_only_torch(w, capsys):
    one_line_error(capsys, train.main, train_argv(w, "--device", "cuda"), "--device")


def test_train_bad_files(w, capsys):
    cases = [  # (argv, name); each fails before any training
        (train_argv(w, "--out", str(w / "a_file")), "--out"),
        (train_argv(w, "--tgl", "fp", "--trace", str(w / "trace_str.json")), "trace_str.json"),
        (train_argv(w, "--tgl", "fp", "--trace", str(w / "trace_nan.json")), "trace_nan.json"),
        (train_argv(w, "--probes", str(w / "empty.jsonl")), "empty.jsonl"),
        (train_argv(w, "--probes", str(w / "long.jsonl")), "long.jsonl"),
        (train_argv(w, "--init", str(w / "nanogpt.pt")), "nanogpt.pt"),
        (train_argv(w, "--init", str(w / "hf_bad")), "config.json"),
        (train_argv(w, "--init", str(w / "hf_binary")), "config.json"),
        (train_argv(w, "--tokenizer", str(w / "vocab_bad.json")), "vocab_bad.json"),
        (train_argv(w, out="run"), "--out"),  # a finished run is not silently replaced
    ]
    for argv, name in cases:
        one_line_error(capsys, train.main, argv, name)
        assert not (w / "x" / "ckpt.pt").exists()  # nothing trained, nothing written


def test_truncated_checkpoint_on_resume_is_one_line(w, capsys):
    argv = ["--data", str(w / "text.txt"), "--out", str(w / "truncated"), "--tokenizer", str(w / "tokenizer.json"),
            "--resume"] + TINY
    one_line_error(capsys, train.main, argv, "ckpt.pt")


def test_a_long_probe_fails_at_start_and_keeps_nothing_half_done(w, tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, train.main, train_argv(w, "--probes", str(w / "long.jsonl"), out=str(out)), "long.jsonl")
    assert not (out / "ckpt.pt").exists() and not (out / "metrics.jsonl").exists()


def test_missing_inputs_fail_before_the_model_loads(w, capsys, tmp_path, monkeypatch):
    import checkpoint
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    monkeypatch.setattr(train, "load_model", checkpoint.load_model)
    monkeypatch.setattr(tgl_trace, "load_model", checkpoint.load_model)
    out = str(tmp_path / "t.json")
    one_line_error(capsys, tgl_trace.main, ["--init", "gpt2", "--probes", str(w / "nope.jsonl") + ":split",
                                            "--text", str(w / "text.txt"), "--out", out], "nope.jsonl")
    one_line_error(capsys, tgl_trace.main, ["--init", "gpt2", "--probes", str(w / "probes.jsonl"),
                                            "--text", str(w / "nope.txt") + "@1k", "--out", out], "nope.txt")
    one_line_error(capsys, train.main, train_argv(w, "--init", "gpt2", "--data", str(w / "nope.txt") + "@1M"),
                   "nope.txt")


def test_trace_and_probe_bad_input(w, capsys, tmp_path):
    base = ["--init", str(w / "run"), "--probes", str(w / "probes.jsonl"), "--text", str(w / "text.txt"), "--n-span", "1",
            "--n-lm", "1", "--block-size", "8", "--device", "cpu"]
    one_line_error(capsys, tgl_trace.main, base + ["--out", str(tmp_path)], "--out")  # a folder
    one_line_error(capsys, tgl_trace.main, base + ["--out", str(tmp_path / "no" / "t.json")], "--out")
    one_line_error(capsys, tgl_trace.main, ["--init", str(w / "nanogpt.pt")] + base[2:] + ["--out", str(tmp_path / "t.json")],
                   "nanogpt.pt")
    one_line_error(capsys, tgl_trace.main, base + ["--out", str(tmp_path / "t.json"), "--rank-units", "nope"], "--rank-units")
    pbase = ["--init", str(w / "run"), "--probes", str(w / "probes.jsonl"), "--device", "cpu"]
    one_line_error(capsys, probe.main, pbase + ["--json", str(tmp_path / "missing" / "p.json")], "--json")
    one_line_error(capsys, probe.main, ["--init", str(w / "nanogpt.pt")] + pbase[2:], "nanogpt.pt")
    one_line_error(capsys, probe.main, ["--init", str(w / "run"), "--probes", str(w / "empty.jsonl")], "empty.jsonl")
    one_line_error(capsys, compare.main, [str(w / "binary.jsonl")], "binary.jsonl")
    one_line_error(capsys, probe.main, ["--init", str(w / "run"), "--probes", str(w / "binary.jsonl")], "binary.jsonl")
    one_line_error(capsys, probe.main, pbase + ["--device", "warp9"], "--device")
    one_line_error(capsys, probe.main, pbase + ["--batch-size", "0"], "--batch-size")
    for config in (probe.ProbeConfig, tgl_trace.TraceConfig, train.Config):  # every flag says what it is
        ap = common.Parser()
        common.add_flags(ap, config)
        assert all(a.help for a in ap._actions), config


def test_export_bad_input(w, capsys, tmp_path):
    one_line_error(capsys, export.main, ["--init", str(w / "run"), "--out", str(w / "a_file")], "--out")  # a file
    one_line_error(capsys, export.main, ["--init", str(w / "nanogpt.pt"), "--out", str(tmp_path / "o")], "nanogpt.pt")
    one_line_error(capsys, export.main, ["--init", str(w / "hf_bad"), "--out", str(tmp_path / "o")], "config.json")
    one_line_error(capsys, export.main, ["--init", str(w / "run"), "--out", str(w)], "--overwrite")  # holds files
    assert not (tmp_path / "o").exists() and not (w / "config.json").exists()


def test_trace_accepts_a_folder_of_text(w, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text((w / "text.txt").read_text())
    d = tgl_trace.main(["--init", str(w / "run"), "--probes", str(w / "probes.jsonl"), "--text", str(folder), "--n-span", "1",
                        "--n-lm", "2", "--block-size", "8", "--device", "cpu", "--out", str(tmp_path / "t.json")])
    assert d["n_lm"] == 2 and (tmp_path / "t.json").is_file()


def test_cli_subprocess_has_no_traceback(w):
    r = subprocess.run([sys.executable, "train.py"] + train_argv(w, "--beta1", "1"), cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--beta1" in r.stderr


# ----------------------------------------------------------------------------- resume is safe

def test_resume_refuses_changed_run_flags_and_allows_harmless_ones(w, tmp_path, capsys):
    out = tmp_path / "r"
    argv = train_argv(w, "--save-every", "1", out=str(out))
    train.main(argv)
    capsys.readouterr()
    for changed, name in ((["--lr", "0.5"], "--lr"), (["--method", "recadam"], "--method"), (["--batch-size", "2"], "--batch-size"),
                          (["--tgl", "fp", "--trace", str(w / "trace_ok.json")], "--tgl"), (["--seed", "3"], "--seed")):
        msg = one_line_error(capsys, train.main, argv + ["--resume"] + changed, name)
        assert "--overwrite" in msg
    one_line_error(capsys, train.main, argv + ["--resume", "--steps", "2"], "--steps")
    # harmless: threads, log cadence, a longer run
    s = train.main(argv + ["--resume", "--steps", "5", "--log-every", "2", "--threads", "1"])
    assert s["steps"] == 5
    # --overwrite starts again from scratch, with new flags
    s = train.main(argv + ["--overwrite", "--lr", "0.002"])
    assert s["steps"] == 3 and len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_checkpoint_from_before_a_flag_resumes_at_its_default_only(w, tmp_path, capsys):
    """A checkpoint written before --floor and --replay-decay existed lacks their keys: that run computed
    what the defaults compute, so the defaults resume it and another value is refused."""
    out = tmp_path / "old"
    argv = train_argv(w, "--save-every", "1", out=str(out))
    train.main(argv)
    assert "| ETA " in capsys.readouterr().out  # every log line has one
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for key in ("floor", "replay_decay"):
        del ckpt["train_config"][key]
    torch.save(ckpt, out / "ckpt.pt")
    one_line_error(capsys, train.main, argv + ["--resume", "--steps", "4", "--floor", "0.5"], "--floor")
    one_line_error(capsys, train.main, argv + ["--resume", "--steps", "4", "--replay-decay", "1"], "--replay-decay")
    assert train.main(argv + ["--resume", "--steps", "4"])["steps"] == 4


def test_resuming_a_finished_run_reproduces_its_summary(w, tmp_path):
    out = tmp_path / "f"
    argv = train_argv(w, "--probes", str(w / "probes.jsonl"), out=str(out))
    train.main(argv)
    first = (out / "summary.json").read_text()
    assert json.loads(first)["final_loss"] is not None
    (out / "summary.json").unlink()  # as if killed between the last checkpoint and the summary
    train.main(argv + ["--resume"])
    assert (out / "summary.json").read_text() == first
    train.main(argv + ["--resume"])
    assert (out / "summary.json").read_text() == first


def test_a_torn_last_metrics_line_is_dropped_on_resume(w, tmp_path):
    out = tmp_path / "t"
    argv = train_argv(w, "--save-every", "1", out=str(out))
    train.main(argv)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-append
    train.main(argv + ["--resume", "--steps", "4"])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "ckpt.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"ckpt.pt.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / f"ckpt.pt.{os.getppid()}.tmp"  # a live process's write in progress is left alone
    alive.write_bytes(b"in progress")
    save_checkpoint(target, {"x": torch.zeros(1)})
    assert not stale.exists() and alive.exists() and target.exists()


def test_model_config_errors_are_value_errors(capsys):
    for bad in (dict(n_embd=16, n_head=3), dict(n_layer=0), dict(dropout=1.0)):
        with pytest.raises(ValueError, match="model config"):
            GPT(GPTConfig(**bad))
    with pytest.raises(SystemExit), common.input_errors("x"):
        raise FileNotFoundError(2, "No such file or directory", "x.txt")
    assert "x: error: x.txt: No such file or directory" in capsys.readouterr().err


def test_init_hub_name_without_network_is_fast_and_says_what_to_do(w, tmp_path, capsys, monkeypatch):
    import time
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("TGL_CACHE", str(tmp_path / "cache"))
    t = time.time()
    msg = one_line_error(capsys, train.main, train_argv(w, "--init", "gpt2", "--tokenizer", "gpt2", out="net"), "--init gpt2")
    assert "no network" in msg and "folder" in msg and time.time() - t < 5


def test_world_and_demo_bad_flags(tmp_path, capsys):
    from experiments import demo
    from experiments import world
    one_line_error(capsys, world.main, ["--out", str(tmp_path / "w"), "--new-frac", "-0.5"], "--new-frac")
    one_line_error(capsys, world.main, ["--out", ""], "--out")
    (tmp_path / "f").write_text("x")
    one_line_error(capsys, world.main, ["--out", str(tmp_path / "f")], "--out")
    one_line_error(capsys, demo.main, ["--world", "mars"], "--world")


def test_demo_world_twiki_forwards_to_the_driver(tmp_path, capsys, monkeypatch):
    from experiments import demo
    from experiments import twiki
    seen = []
    monkeypatch.setattr(twiki, "main", lambda argv: seen.append(argv) or "ran")
    assert demo.main(["--world", "twiki", "--init", "gpt2", "--out", str(tmp_path), "--plan"]) == "ran"
    assert seen == [["--init", "gpt2", "--out", str(tmp_path), "--plan"]]


def test_text_that_is_not_utf8_names_its_file(w, tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not text\n")
    (tmp_path / "bad.csv").write_bytes(b"text\n\xff\n")
    for f in ("bad.txt", "bad.csv"):
        argv = ["--data", str(tmp_path / f), "--out", str(tmp_path / f"o{f}"), "--tokenizer", str(w / "tokenizer.json")]
        one_line_error(capsys, train.main, argv + TINY[:-2], f)
    one_line_error(capsys, tgl_trace.main, ["--init", str(w / "run"), "--probes", str(w / "probes.jsonl"), "--text",
                                            str(tmp_path / "bad.txt"), "--out", str(tmp_path / "t.json")], "bad.txt")
