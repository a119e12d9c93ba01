"""Bad input, round 3 (issue 24), the writers' half: two writers on one folder (a lock per folder, the
holder named, a dead holder's lock no obstacle), flags the chosen method or mode does not use, a trace of
another model, a full disk while a checkpoint is written, checkpoints timed on the device in use. Each a
one-line error naming the file or flag (exit 2), or the right result."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import common
import data
import train
import trace as tgl_trace
from experiments import export, realdata, twiki, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--log-every", "1", "--threads", "1", "--steps", "6"]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("writers")
    words = [f"w{i}" for i in range(30)]
    (d / "text.txt").write_text("\n\n".join(" ".join(words[(i + j) % 30] for j in range(20)) for i in range(30)))
    data.WordTokenizer.build([" ".join(words)]).save(str(d / "tokenizer.json"))
    (d / "probes.jsonl").write_text(json.dumps({"query": "w1 w2 _X_.", "answer": [{"name": "w3"}], "id": "p0"}) + "\n")
    return d


def argv(w, out, *extra):
    return ["--data", str(w / "text.txt"), "--out", str(out), "--tokenizer", str(w / "tokenizer.json")] + \
        TINY + list(extra)


def one_line(capsys, fn, args, *names):
    with pytest.raises(SystemExit) as e:
        fn(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert all(str(n) in err[0] for n in names), err
    return err[0]


# ----------------------------------------------------------------------------- 1. two writers, one folder

GO = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); import train; print('ready', flush=True)\n"
      "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
      "train.main(sys.argv[3:])")


def test_two_train_runs_started_together_on_one_out_one_is_refused(w, tmp_path):
    out, go = w / "race", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", GO, ROOT, str(go)] + argv(w, out, "--steps", "200"), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 2  # imported: now both start at once
    go.touch()
    results = [(p.communicate(timeout=300)[1], p.returncode)[::-1] for p in procs]  # 200 steps: the first
    # is still running when the second one asks, however the two are scheduled
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip().splitlines()
    assert len(err) == 1 and f"--out {out} is being written by pid" in err[0], err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 201))  # one run's log, not two interleaved


HOLD = ("import sys, time, contextlib; sys.path.insert(0, sys.argv[1]); from experiments.tools import folder_lock\n"
        "with contextlib.ExitStack() as s:\n"
        "    [s.enter_context(folder_lock(p)) for p in sys.argv[2:]]\n"
        "    print('held', flush=True); time.sleep(120)")


def test_a_held_folder_is_refused_by_every_writer_naming_the_holder(w, tmp_path, capsys, monkeypatch):
    run, exp, tw, wo, sp, fe = (tmp_path / n for n in ("run", "exp", "tw", "world", "splits", "fetched"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, ROOT] + [str(p) for p in (run, exp, tw, wo, sp, fe)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = f"pid {holder.pid}"
        one_line(capsys, train.main, argv(w, run), run, who)
        one_line(capsys, export.main, ["--init", "gpt2", "--out", str(exp)], exp, who)
        one_line(capsys, twiki.main, ["--init", "gpt2", "--out", str(tw)], tw, who)
        one_line(capsys, world.main, ["--out", str(wo), "--n-entities", "10"], wo, who)
        one_line(capsys, realdata.main, ["splits", "twiki", "--input", str(w), "--out", str(sp)], sp, who)
        one_line(capsys, realdata.main, ["fetch", "twiki-probes", "--out", str(fe)], fe, who)
        assert not run.exists() and not wo.exists()  # refused before anything was written
        monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 writes, and locks
        from experiments.tools import folder_lock
        with folder_lock(run):
            pass
        monkeypatch.delenv("RANK")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock went with it: the same commands now write
    train.main(argv(w, run, "--steps", "2"))
    assert world.main(["--out", str(wo), "--n-entities", "10"])["counts"]
    # a lock file left by a dead process, with its pid, blocks nothing either
    (tmp_path / ".run2.lock").write_text("pid 999999999 (python train.py)")
    train.main(argv(w, tmp_path / "run2", "--steps", "2"))


# ----------------------------------------------------------------------------- 2. flags that do nothing

def test_a_flag_the_method_or_mode_does_not_use_is_refused(w, capsys):
    out, trace = w / "unused", w / "any_trace.json"
    trace.write_text("{}")
    for extra, needs in [(["--replay-data", str(w / "text.txt")], "--replay-data needs --method mixreview"),
                         (["--recadam-gamma", "100"], "--recadam-gamma needs --method recadam"),  # the default
                         (["--lora-rank", "4"], "--lora-rank needs --method lora"),
                         (["--method", "recadam", "--lora-alpha", "8"], "--lora-alpha needs --method lora"),
                         (["--trace", str(trace)], "--trace needs --tgl fp or alr"),
                         (["--select", "topk:2"], "--select needs --tgl fp"),
                         (["--tgl", "fp", "--trace", str(trace), "--alr-norm", "mean"], "--alr-norm needs --tgl alr"),
                         (["--control", "complement"], "--control needs --tgl fp or alr"),
                         (["--decay", "none", "--min-lr", "1e-4"], "--min-lr needs --decay cosine or linear")]:
        one_line(capsys, train.main, argv(w, out, *extra), needs)
    assert not out.exists()
    s = train.main(argv(w, out, "--method", "recadam", "--recadam-gamma", "100", "--steps", "2"))  # used: fine
    assert s["method"] == "recadam"
    train.main(argv(w, out, "--method", "recadam", "--resume", "--steps", "2"))  # --resume's rules unchanged


def test_a_shape_flag_that_contradicts_the_loaded_model_is_refused(w, tmp_path, capsys):
    base = w / "shape_base"  # 2 layers, 2 heads, 32 wide
    train.main(argv(w, base, "--steps", "1"))
    more = argv(w, tmp_path / "on", "--init", str(base), "--steps", "1")  # TINY's shape: the base's own
    one_line(capsys, train.main, more + ["--n-layer", "3"], "--n-layer 3", f"--init {base} has 2", "drop it")
    assert train.main(more + ["--n-layer", "2"])["steps"] == 1  # the model's own shape: harmless


def test_twiki_passes_each_arm_the_train_args_it_uses_and_refuses_one_no_arm_uses(tmp_path, capsys):
    base = ["--init", "gpt2", "--out", str(tmp_path / "o"), "--plan", "--tgl", "none", "fp"]
    err = one_line(capsys, twiki.main, base + ["--train-args", "--recadam-gamma 50 --eval-every 5"],
                   "--train-args", "--recadam-gamma needs --method recadam")
    assert "full-none full-fp" in err
    cfg = twiki.parse_args(base + ["--methods", "full", "recadam", "--train-args", "--recadam-gamma=50 --select topk:1"])
    twiki.check_config(cfg)
    cmds = {arm: " ".join(map(str, twiki.train_argv(cfg, 1, arm, 5))) for arm in cfg.arms}
    assert [a for a, c in cmds.items() if "--recadam-gamma 50.0" in c] == ["recadam-none", "recadam-fp"]
    assert [a for a, c in cmds.items() if "--select topk:1" in c] == ["full-fp", "recadam-fp"]
    for arm in cfg.arms:  # each command passes train.py's own rule
        train.parse_config(train.Config, "train.py", "", [str(a) for a in twiki.train_argv(cfg, 1, arm, 5)[2:]])


# ----------------------------------------------------------------------------- 3. a foreign trace

def test_a_trace_of_another_model_is_refused_naming_both(w, capsys):
    a, b = w / "base_a", w / "base_b"
    train.main(argv(w, a, "--steps", "2"))
    train.main(argv(w, b, "--steps", "2", "--seed", "1"))  # the same shape, other weights
    fa, fb = (tgl_trace.fingerprint(checkpoint.load_model(str(r))) for r in (a, b))
    assert fa != fb and fa == tgl_trace.fingerprint(checkpoint.load_model(str(a / "ckpt.pt")))  # loaded twice
    trace = w / "trace_a.json"
    tgl_trace.main(["--init", str(a), "--probes", str(w / "probes.jsonl"), "--text", str(w / "text.txt"),
                    "--out", str(trace), "--tokenizer", str(w / "tokenizer.json"), "--n-lm", "2", "--device", "cpu"])
    assert json.loads(trace.read_text())["fingerprint"] == fa
    tgl = ["--tgl", "fp", "--trace", str(trace), "--steps", "2"]
    err = one_line(capsys, train.main, argv(w, w / "foreign", "--init", str(b), *tgl), trace, a, b, fa, fb)
    assert "traced" in err and not (w / "foreign" / "ckpt.pt").exists()
    assert train.main(argv(w, w / "own", "--init", str(a), *tgl))["steps"] == 2
    old = w / "trace_old.json"  # an older trace.py's, without a fingerprint: taken, with a note
    old.write_text(json.dumps({k: v for k, v in json.loads(trace.read_text()).items() if k != "fingerprint"}))
    train.main(argv(w, w / "old", "--init", str(b), "--tgl", "fp", "--trace", str(old), "--steps", "2"))
    assert "has no model fingerprint: not checked against --init" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 4. a full disk

def test_a_full_disk_during_a_checkpoint_is_one_line_and_a_resume_reaches_the_same_numbers(w, capsys, monkeypatch):
    flags = ["--save-every", "2", "--probes", str(w / "probes.jsonl")]
    whole = train.main(argv(w, w / "whole", *flags))
    calls = []

    def full_at_second(path, mode):  # the second checkpoint is written to /dev/full: the kernel's ENOSPC
        calls.append(path)
        return open("/dev/full" if len(calls) == 2 else path, mode)
    monkeypatch.setattr(checkpoint, "open", full_at_second, raising=False)
    out = w / "full"
    ckpt = out / "ckpt.pt"
    one_line(capsys, train.main, argv(w, out, *flags), ckpt, "the disk is full")
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(ckpt)["step"] == 2 and not list(out.glob("*.tmp"))  # the old one stays
    again = train.main(argv(w, out, *flags, "--resume"))
    assert again["final_loss"] == whole["final_loss"] and again["probes"] == whole["probes"]
    # a text file too (every writer goes through common.atomic_path): the kernel's ENOSPC, from /dev/full
    monkeypatch.setattr(common, "open", lambda path, *a, **k: open("/dev/full", *a, **k), raising=False)
    with pytest.raises(ValueError, match=f"{out / 'summary.json'}: the disk is full"):
        common.write_text(out / "summary.json", "{}" * 10000)


# ----------------------------------------------------------------------------- 5. checkpoints timed on the device

def test_save_minutes_checkpoints_by_measured_time_and_resumes_bit_for_bit(w, monkeypatch):
    flags = ["--log-every", "2"]
    whole = train.main(argv(w, w / "timed_whole", *flags))
    saved, real = [], train.checkpoint

    def record(run, *a):
        real(run, *a)
        saved.append(run.step)
        if run.step == 4 and run.cfg.out.endswith("killed"):
            raise KeyboardInterrupt  # killed right after the checkpoint of step 4
    monkeypatch.setattr(train, "checkpoint", record)
    train.main(argv(w, w / "rare", *flags, "--save-minutes", "600"))
    assert saved == [6]  # 10 hours never pass: only the end
    saved.clear()
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(w, w / "killed", *flags, "--save-minutes", "1e-9"))
    assert saved == [2, 4]  # at every log line, once the time has passed
    again = train.main(argv(w, w / "killed", *flags, "--save-minutes", "1e-9", "--resume"))
    assert again["final_loss"] == whole["final_loss"]


def test_twiki_passes_save_minutes_whatever_the_device(tmp_path):
    cfg = twiki.parse_args(["--init", "gpt2", "--out", str(tmp_path / "o"), "--device", "cpu"])
    cmd = [str(a) for a in twiki.train_argv(cfg, 1, "full-fp", 1000)]
    assert "--save-every" not in cmd and cmd[cmd.index("--save-minutes") + 1] == "30"
    assert "every 30 minutes of measured training time" in twiki.plan_checkpoints(cfg)
