"""twiki.py for long real runs, offline: periodic checkpoints and a killed training step resumed from the
last one (same numbers as an uninterrupted run), old stages' optimizer state dropped, TempLAMA (fetched by
the driver from the local server) and ECBD splits built per stage, columns named by data set and stable
over stages, both metrics, the Hugging Face export loading in transformers; a plan that sizes the run with
nothing on disk; malformed state files and bad pass-through flags as one line. Tiny model and data, the
archives in TemporalWiki's real member layouts (tests/test_twiki.py's fixtures)."""
import json
import shutil
import subprocess

import pytest
import torch

import checkpoint as C
import train
from experiments import twiki
from samples import DATA
from test_twiki import argv, one_line_error, serve_twiki, tiny_gpt2

TEMPLAMA = DATA / "real_formats" / "templama" / "test.json"
COLUMNS = {"twiki/changed", "twiki/unchanged", "templama/updated", "templama/unchanged", "ecbd/new"}


def serve_templama(server):
    """TempLAMA's three released files (JSON lines), here the real test.json's records dealt over them."""
    lines = TEMPLAMA.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, name in enumerate(("train.json", "val.json", "test.json")):
        server.files[f"/templama/{name}"] = "".join(lines[i::3]).encode()


def runs_argv(init, out, *more):
    """One TGL arm; every probe evaluated (--diag-frac 0), stage 1 tracing on a file of its own; TempLAMA
    fetched, with a date per snapshot; 32 updates a stage, a checkpoint every 2 (--save-every in --train-args)."""
    return argv(init, out, "--methods", "full", "--tgl", "fp", "--diag-frac", "0",
                "--trace-probes", str(DATA / "twiki_probes" / "0801-0901_changed.csv"),
                "--templama", "templama", "--templama-dates", "2010", "2011", "2012", "2013", "2014",
                "--max-train-tokens", "4096", "--train-args", "--log-every 1 --save-every 2", *more)


class KillAfter:
    """A step's stdout that SIGKILLs the step once it has printed `marker` (its checkpoint is older)."""

    def __init__(self, proc, marker):
        self.proc, self.f, self.marker = proc, proc.stdout, marker

    def __iter__(self):
        for line in self.f:
            yield line
            if self.marker in line:
                self.proc.kill()

    def close(self):
        self.f.close()


def scores(rows, stage):
    return [(r["arm"], r["probes"], r["probes_sentence"], r["val_ppl"]) for r in rows if r["stage"] == stage]


def test_killed_arm_resumes_from_its_checkpoint_with_the_same_numbers(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    serve_twiki(server)
    serve_templama(server)
    init, a, b, hf = tiny_gpt2(tmp_path / "tiny"), tmp_path / "a", tmp_path / "b", tmp_path / "hf"
    twiki.main(runs_argv(init, a, "--stages", "1"))
    assert {p for p, _ in server.log} >= {f"/templama/{n}" for n in ("train.json", "val.json", "test.json")}
    shutil.copytree(a, b)  # the same stage 1: stage 2 run twice, once uninterrupted (a), once killed (b)
    rows = twiki.main(runs_argv(init, a, "--stages", "2", "--export-hf", str(hf)))

    real = subprocess.Popen

    def popen(args, **kw):
        proc = real(args, **kw)
        if any(str(x).endswith("train.py") for x in args):
            proc.stdout = KillAfter(proc, "step 5/32")
        return proc
    monkeypatch.setattr(twiki.subprocess, "Popen", popen)
    with pytest.raises(SystemExit) as e:
        twiki.main(runs_argv(init, b, "--stages", "2"))
    assert e.value.code == 2 and "step failed (exit -9)" in capsys.readouterr().err
    log = b / "stage2" / "logs" / "full-fp.log"
    assert "step 5/32" in log.read_text()  # the killed step's output is in its log
    killed_at = C.load_checkpoint(b / "stage2" / "full-fp" / C.CKPT_NAME)["step"]
    assert 0 < killed_at < 32 and killed_at % 2 == 0  # --save-every 2
    monkeypatch.setattr(twiki.subprocess, "Popen", real)
    again = twiki.main(runs_argv(init, b, "--stages", "2"))
    assert f"resumed: step {killed_at}" in log.read_text()
    said = capsys.readouterr().out  # the updates done before the kill are neither timed nor left to train
    assert (f"[stage 1/1, arm 1/1 full-fp] training updates {killed_at + 1}-32; ETA unknown until an "
            f"update is timed ({32 - killed_at} updates of training left)") in said
    assert f"# trained {32 - killed_at} updates" in said
    assert scores(again, 2) == scores(rows, 2) and scores(again, 1) == scores(rows, 1)

    # columns named by data set, the same in both stages; the driver's TempLAMA splits with each stage's dates
    for r in rows:
        assert set(r["probes"]) == COLUMNS == set(r["probes_sentence"]), r
    for k, pair in ((1, "0801-0901"), (2, "0901-1001")):
        updated = (a / "probes" / pair / "templama" / "updated.jsonl").read_text().splitlines()
        assert {json.loads(line)["date"] for line in updated} == {str(2010 + k)}
        assert all(r["probes"]["templama/updated"]["n"] == len(updated) for r in rows if r["stage"] == k)
    assert (a / "probes" / "ecbd" / "ecbd2019" / "new.jsonl").is_file()
    traced = [json.loads((a / f"stage{k}" / n).read_text())["probe_files"] for k, n in
              ((1, "trace-init.json"), (2, "trace-full-fp.json"))]
    assert traced == [[str(DATA / "twiki_probes" / "0801-0901_changed.csv")],
                      [str(a / "probes" / "0801-0901" / "changed.csv")]]  # --diag-frac 0: probes not scored there
    md = (a / "results.md").read_text()
    assert "| twiki/changed ppl | twiki/changed EM % |" in md and "ecbd/new sentence EM %" in md
    assert md.count("| 1 (0801-0901) |") == 2 and md.count("| 2 (0901-1001) |") == 2

    # stage 1's optimizer state went once stage 2 finished; stage 2 keeps its own; the slim one is refused
    old, new = (C.load_checkpoint(a / f"stage{k}" / "full-fp" / C.CKPT_NAME) for k in (1, 2))
    assert old["optimizer"]["units"] == [twiki.DROPPED] and not old["optimizer"]["m"] and new["optimizer"]["m"]
    assert (a / "stage1" / "full-fp" / "optimizer-dropped").is_file()
    cfg = twiki.parse_args(runs_argv(init, a, "--stages", "1"))
    with pytest.raises(SystemExit):
        train.main(twiki.train_argv(cfg, 1, "full-fp", 32)[2:])
    assert "twiki.py dropped this optimizer state" in capsys.readouterr().err

    # the export of the final model loads in transformers, with our logits
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(hf / "stage2" / "full-fp").eval()
    ours = C.load_model(str(a / "stage2" / "full-fp")).eval()
    idx = torch.tensor([[464, 3290, 318, 257]])
    with torch.no_grad():
        assert (ref(idx).logits - ours(idx)[0]).abs().max() < 1e-4
    print(md)


def test_plan_sizes_the_run_with_nothing_on_disk(server, tmp_path, capsys):
    """No data, no network, no model: every train.py line checkpoints, hours per stage and in all, one GB total."""
    assert twiki.main(["--init", "gpt2-large", "--out", str(tmp_path / "o"), "--plan"]) is None
    text = capsys.readouterr().out
    trains = [ln for ln in text.splitlines() if ln.startswith("python train.py")]
    assert len(trains) == 8 and all(" --save-minutes 30" in ln for ln in trains)
    assert "ESTIMATE" in text and "ASSUMED" in text and "MFU" in text and "h per arm" in text
    total = [ln for ln in text.splitlines() if ln.startswith("#   total:")]
    assert len(total) == 1 and float(total[0].split()[2]) > 1
    disk = [ln for ln in text.splitlines() if "GB in all" in ln]
    assert len(disk) == 1 and "checkpoints" in disk[0] and "snapshot prefixes" in disk[0]
    assert not server.log and not (tmp_path / "o").exists()
    assert "checkpoints: every 30 minutes of measured training time (train.py --save-minutes 30" in text
    # a --save-every in --train-args (abbreviated, as train.py's parser takes it) is the one the commands
    # carry, and the one the plan's checkpoint line states
    cfg = twiki.parse_args(["--init", "gpt2-large", "--out", "o", "--train-args=--save-e=500"])
    own = twiki.plan(cfg)
    trains = [ln for ln in own.splitlines() if ln.startswith("python train.py")]
    assert len(trains) == 8 and all(ln.endswith(" --save-every 500") for ln in trains)
    assert not any("--save-minutes" in ln for ln in trains)  # the driver adds none of its own
    minutes = 500 * 8 * 1024 / twiki.tok_s(cfg) / 60
    assert f"checkpoints: --save-every 500 updates (from --train-args) = about every {minutes:.3g} min" in own
    with_opt = twiki.plan(twiki.parse_args(["--init", "gpt2-large", "--out", str(tmp_path / "o"), "--keep-optimizer"]))
    gb = lambda t: float(t.split("about ")[1].split(" GB")[0])  # noqa: E731
    assert gb(with_opt.splitlines()[-1]) > gb(disk[0]) + 30  # 6 more runs' AdamW moments of 774M parameters


def test_bad_state_files_and_pass_through_flags_are_one_line(server, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--init", "gpt2", "--out", str(out), "--plan"]
    err = one_line_error(capsys, base + ["--train-args", "--bogus 3"])
    assert "--train-args" in err and "--bogus" in err
    assert "--n-span" in one_line_error(capsys, base + ["--trace-args", "--n-span x"])
    assert "--trace-probes" in one_line_error(capsys, base + ["--diag-frac", "0"])
    assert "--templama-dates" in one_line_error(capsys, base + ["--templama", "templama"])
    assert "--diag-frac" in one_line_error(capsys, base + ["--diag-frac", "1"])
    assert ">= 2" in one_line_error(capsys, base + ["--val-every", "1"])  # 1 would hold out every document
    assert not server.log  # refused before any download
    out.mkdir()
    (out / "protocol.json").write_text("[]")
    assert str(out / "protocol.json") in one_line_error(capsys, base)
    (out / "protocol.json").unlink()
    run = out / "stage1" / "full-none"
    run.mkdir(parents=True)
    for bad in ("[]", '{"probes": 3}', '{"probes": {"x": {"ppl": "a"}}}'):
        (run / "summary.json").write_text(bad)
        assert str(run / "summary.json") in one_line_error(capsys, base)
    (out / "stage1" / "init.json").write_text('{"summary": {}}')
    (out / "stage1" / "init-text.json").write_text('{"text_ppl": [3.0]}')
    (run / "summary.json").write_text('{"probes": {"x": {"ppl": 2.0, "em": 0.5, "n": 4}}}')
    (run / "val.json").write_text('{"summary": {}}')
    (run / "text.json").write_text('{"text_ppl": "high"}')
    cfg = twiki.parse_args(base)
    for f, what in ((out / "stage1" / "init-text.json", lambda: twiki.init_row(cfg, 1)),
                    (run / "text.json", lambda: twiki.arm_row(cfg, 1, "full-none"))):
        with pytest.raises(ValueError, match=str(f)):
            what()


def test_hand_fetch_of_a_snapshot_prefix_is_the_one_the_driver_reads(server, tmp_path, capsys):
    """`realdata fetch twiki-snapshot --max-mb N` (the docs' hand command) writes where twiki.py reads: one download."""
    from experiments import realdata
    serve_twiki(server)
    realdata.main(["fetch", "twiki-snapshot", "--max-mb", "0.002", "--month", "08"])
    cfg = twiki.parse_args(argv("gpt2", tmp_path / "o", "--plan"))  # --snapshot-mb 0.002
    assert twiki.old_text(cfg, 1).is_file() and twiki.old_text(cfg, 1).parent.name == "prefix-0.002MB"
    n = len(server.log)
    twiki.main(argv("gpt2", tmp_path / "o", "--plan"))
    done = "# done: python -m experiments.realdata fetch twiki-snapshot --max-mb 0.002 --month 08"
    assert done in capsys.readouterr().out
    assert len(server.log) == n
