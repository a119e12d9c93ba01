"""twiki.py end to end, offline: a tiny random GPT-2 (GPT-2 BPE, d=32, 2 layers) in the Hugging Face
layout, and tiny archives in TemporalWiki's real layouts (TWiki_Probes.zip, TWiki_Diffsets.zip,
Wikipedia_Full.zip) served by the local test server through HF_ENDPOINT. Two stages x two arms:
fetch, probe splits, held-out slice, init row, traces, training, chaining, the table; then a second
invocation that re-runs nothing, --plan that runs nothing, and a changed flag refused in one line."""
import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest

import checkpoint as C
import model as M
from experiments import compare, twiki
from experiments.export import save_hf
from httpserver import HF, zip_bytes
from samples import DATA


def csv_text(header, rows):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header] + rows)
    return buf.getvalue()


def serve_twiki(server):
    """Real probe rows (8 per file) for the first two month pairs; diff sets and snapshots of documents
    that state those facts (so training moves the probes), in the archives' real member layouts."""
    probes, facts = {}, []
    for pair in ("0801-0901", "0901-1001"):
        for kind in ("changed", "unchanged"):
            rows = list(csv.reader(open(DATA / "twiki_probes" / f"{pair}_{kind}.csv", encoding="utf-8")))[1:9]
            probes[f"twiki_probes/{pair}_{kind}.csv"] = csv_text(["subject", "relation", "object"], rows)
            facts += [" ".join(r) + "." for r in rows]
    docs = lambda n, off: [[i, f"Doc {i}. " + " ".join(facts[(i + off + j) % len(facts)] for j in range(4))]  # noqa: E731
                           for i in range(n)]
    server.files[HF + "TWiki_Probes.zip"] = zip_bytes(probes)
    server.files[HF + "TWiki_Diffsets.zip"] = zip_bytes({
        f"TWiki_Diffsets/wikipedia_{m}_gpt2.csv": csv_text(["text"], [[d[1]] for d in docs(12, i)])
        for i, m in enumerate(("0809", "0910", "1011", "1112"))})
    server.files[HF + "Wikipedia_Full.zip"] = zip_bytes({
        f"Wikipedia_Full/wikipedia_{m}_gpt2/part0.csv": csv_text(["id", "text"], docs(10, 3 * i))
        for i, m in enumerate(("08", "09", "10", "11", "12"))})


def tiny_gpt2(folder):
    save_hf(M.GPT(M.GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)), folder)
    return str(folder)


def argv(init, out, *more):
    return ["--init", init, "--out", str(out), "--methods", "full", "mixreview", "--tgl", "fp", "--stages", "1", "2",
            "--max-train-tokens", "512", "--batch-size", "4", "--block-size", "32", "--lr", "1e-3",
            "--snapshot-mb", "0.002", "--val-every", "3", "--val-tokens", "500", "--device", "cpu", "--threads", "1",
            "--trace-args", "--n-span 4 --n-lm 4", "--ecbd", str(DATA / "real_formats"), *more]


def snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*")}


def one_line_error(capsys, args):
    with pytest.raises(SystemExit) as e:
        twiki.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


PROGRESS = re.compile(r"\[stage (\d)/2, arm (\d)/2 (\S+)\] (tracing|training 4 updates|scoring [^;]+); "
                      r"(?:no training left|ETA (?:unknown until an update is timed "
                      r"\((\d+) updates of training left\)|\S+ of training "
                      r"\((\d+) updates left at \S+ s/update, measured over the (\d+) trained now\)))$")


def check_progress(out: str, arms):
    """Two stages x two arms of 4 updates: the stage and arm of each step, and an ETA once one arm has been
    timed, over the updates left (16 before the first, 4 fewer after each)."""
    lines = [ln for ln in out.splitlines() if ln.startswith("[stage ")]
    got = [PROGRESS.fullmatch(ln) for ln in lines]
    assert lines and all(got), lines
    got = [m.groups() for m in got]  # stage, arm #, arm, what, updates left (no ETA / ETA), timed
    train = [m for m in got if m[3].startswith("training")]
    expect = [(k, i + 1, a) for k in (1, 2) for i, a in enumerate(arms)]
    assert [(int(m[0]), int(m[1]), m[2]) for m in train] == expect
    assert [int(m[4] or m[5]) for m in train] == [16, 12, 8, 4]  # not yet trained, this arm's included
    assert train[0][4] and [m[6] for m in train] == [None, "4", "8", "12"]  # unknown until an update is timed
    assert [m[3] for m in got].count("tracing") == 3  # stage 1's arms share a trace, stage 2's don't
    assert lines[-1].endswith("scoring the other metric and the held-out text; no training left")
    assert "# trained 16 updates in " in out


def test_twiki_protocol_end_to_end(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    serve_twiki(server)
    init, out = tiny_gpt2(tmp_path / "tiny"), tmp_path / "twiki"
    rows = twiki.main(argv(init, out))
    arms = ["full-fp", "mixreview-fp"]
    check_progress(capsys.readouterr().out, arms)
    assert [(r["stage"], r["arm"]) for r in rows] == [(k, a) for k in (1, 2) for a in ["init"] + arms]
    for r in rows:
        assert set(r["probes"]) == {"twiki/changed", "twiki/unchanged", "ecbd/new"} and r["probes"]["twiki/changed"]["n"] == 6, r
        assert set(r["probes_sentence"]) == set(r["probes"]), r  # the other metric, next to the main one
    res = json.loads((out / "results.json").read_text())
    assert [(r["stage"], r["arm"]) for r in res["rows"]] == [(r["stage"], r["arm"]) for r in rows]
    md = (out / "results.md").read_text()
    assert "| 2 (0901-1001) | mixreview-fp |" in md and "twiki/changed ppl" in md and "val ppl" in md
    assert "twiki/changed EM %" in md and "twiki/changed sentence ppl" in md and "score (s)" in md
    for r in rows:  # held-out perplexity of every row, the init row (experiments.textppl) included
        assert r["val_ppl"] > 1.0, r
    for arm in arms:  # stage 2 trains on from the same arm's stage 1 run, and traced that model
        ck = C.load_checkpoint(out / "stage2" / arm / C.CKPT_NAME)
        assert ck["train_config"]["init"] == str(out / "stage1" / arm) and ck["step"] == 4  # 512 tokens / (4 x 32)
        assert json.loads((out / "stage2" / f"trace-{arm}.json").read_text())["model"] == str(out / "stage1" / arm)
    full, mix = (r["probes"]["twiki/changed"]["ppl"] for r in rows[1:3])
    assert full != mix  # Mix-Review replayed old text (1 of each 4 windows)
    train = (out / "stage1" / "data" / "train.csv").read_text()
    val = (out / "stage1" / "data" / "val.csv").read_text()
    assert train.count("Doc ") == 8 and val.count("Doc ") == 4 and "Doc 2." in val and "Doc 2." not in train
    capsys.readouterr()
    compare.main([str(out / "stage1" / "full-fp"), str(out / "stage2" / "full-fp"), str(out / "stage1" / "init.json")])
    cmp = capsys.readouterr().out
    assert "changed" in cmp and "full-fp" in cmp and "init.json" in cmp
    compare.main([str(out / "results.json")])  # the driver's JSON: a column per stage x arm
    cmp = capsys.readouterr().out.splitlines()
    assert cmp[0].split()[-len(rows):] == [f"{r['stage']}/{r['arm']}" for r in rows]
    assert f"{rows[1]['probes']['twiki/changed']['ppl']:.2f}" in next(line for line in cmp if line.startswith("twiki/changed "))

    # a second invocation re-runs nothing: no request, no file written, no step started
    n_requests, before = len(server.log), snapshot(out)
    monkeypatch.setattr(twiki.subprocess, "Popen", lambda *a, **k: pytest.fail("a step ran again"))
    again = twiki.main(argv(init, out))
    assert len(server.log) == n_requests and snapshot(out) == before and again == rows
    assert "every arm finished, nothing to run" in capsys.readouterr().out

    # --plan runs nothing and makes no request, in a fresh folder too; it marks what is done
    fresh = tmp_path / "fresh"
    assert twiki.main(argv(init, fresh, "--plan", "--stages", "1", "2", "3", "4", "--assume-tok-s", "1000")) is None
    text = capsys.readouterr().out
    assert not fresh.exists() and len(server.log) == n_requests
    assert text.count("train.py --init") == 8 and "-m experiments.realdata fetch twiki-diffsets" in text
    assert "ASSUMED 1,000 training tokens/s" in text and "4 updates x 128 tokens = 512 tokens per arm" in text
    assert sum("--save-minutes 30 " in ln + " " for ln in text.splitlines() if "train.py --init" in ln) == 8 and "ESTIMATE" in text and "DISK (ESTIMATE): about" in text
    twiki.main(argv(init, out, "--plan"))
    assert capsys.readouterr().out.count("# done: python train.py") == 4 and snapshot(out) == before

    # a changed run-defining flag is refused in one line naming it; unknown stage, chaining, own flags too
    assert "--lr 0.001 -> 0.01" in one_line_error(capsys, argv(init, out) + ["--lr", "1e-2"])
    twiki.main(argv(init, out, "--lr", "1e-2", "--overwrite", "--plan"))  # --overwrite: accepted, all to do again
    assert "# done:" not in capsys.readouterr().out and snapshot(out) == before
    assert "add stage 1 to --stages" in one_line_error(capsys, argv(init, tmp_path / "new") + ["--stages", "2"])
    assert "unknown stage '5'" in one_line_error(capsys, argv(init, out) + ["--stages", "5"])
    assert "--steps is set by twiki.py" in one_line_error(capsys, argv(init, out) + ["--train-args", "--steps 3"])


def test_nproc_builds_the_torchrun_command(tmp_path):
    """--nproc N: each train.py step runs under torchrun (DDP), with the same flags and the global batch."""
    cfg = twiki.parse_args(argv("gpt2", tmp_path / "o", "--nproc", "4", "--assume-tok-s", "1000"))
    cmd = twiki.train_argv(cfg, 2, "mixreview-fp", 7)
    assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                       str(twiki.HERE / "train.py")]
    flags = dict(zip(cmd[7::1], cmd[8::1]))
    assert flags["--init"] == str(tmp_path / "o" / "stage1" / "mixreview-fp") and flags["--steps"] == "7"
    assert flags["--batch-size"] == "4" and flags["--metric"] == "span" and "--replay-data" in cmd and "--resume" in cmd
    single = twiki.train_argv(twiki.parse_args(argv("gpt2", tmp_path / "o", "--assume-tok-s", "1000")), 2, "mixreview-fp", 7)
    assert single[:2] == [sys.executable, str(twiki.HERE / "train.py")] and single[2:] == cmd[7:]
    assert "torch.distributed.run --standalone --nproc_per_node 4" in twiki.plan(cfg)


@pytest.mark.parametrize("shard", [[], ["--fsdp"]])
def test_training_steps_run_under_torchrun(server, tmp_path, shard):
    """One stage, one arm, its training step really run by torchrun with 2 CPU processes (gloo): DDP, or FSDP
    (its sharded checkpoint then read whole by the stage's scoring steps)."""
    serve_twiki(server)
    out = tmp_path / "ddp"
    rows = twiki.main(argv(tiny_gpt2(tmp_path / "tiny"), out, "--methods", "full", "--tgl", "none", "--stages", "1",
                           "--nproc", "2", *shard))
    assert [r["arm"] for r in rows] == ["init", "full-none"]
    ck = C.load_checkpoint(out / "stage1" / "full-none" / C.CKPT_NAME)
    assert ck["world_size"] == 2 and ck["step"] == 4 and (ck.get("sharded") is not None) == bool(shard)
    assert "torch.distributed.run --standalone --nproc_per_node 2" in (out / "stage1" / "logs" / "full-none.log").read_text()


def test_fsdp_shards_training_and_tracing(tmp_path, capsys):
    """--nproc N --fsdp: train.py and trace.py each run under torchrun with --fsdp; the plan gives the training
    state per GPU (arithmetic) and says when it would not fit one GPU; --fsdp alone is refused in one line."""
    cfg = twiki.parse_args(argv("gpt2-xl", tmp_path / "o", "--nproc", "8", "--fsdp", "--assume-tok-s", "1000"))
    train_cmd, trace_cmd = twiki.train_argv(cfg, 2, "full-fp", 7), twiki.trace_argv(cfg, 2, "full-fp")
    for cmd, name in ((train_cmd, "train.py"), (trace_cmd, "trace.py")):
        assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8",
                           str(twiki.HERE / name)] and "--fsdp" in cmd
    assert "training state 3.1 GB (16 B/param x 1.56B parameters / 8 shards, --fsdp)" in twiki.plan(cfg)
    big = twiki.parse_args(argv("gpt2-xl", tmp_path / "o", "--assume-tok-s", "1000"))
    big.init, twiki.HUB_PARAMS["test/8b"] = "test/8b", 8e9
    try:
        assert "MORE than 80% of one 80 GB GPU: --nproc N --fsdp" in twiki.plan_memory(big)[0]
    finally:
        del twiki.HUB_PARAMS["test/8b"]
    assert "--fsdp shards over processes" in one_line_error(capsys, argv("gpt2", tmp_path / "o") + ["--fsdp"])
