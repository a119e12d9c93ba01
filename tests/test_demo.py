"""The demo end to end at --quick size: world, base model, two traces, method x TGL runs with the
controls and the matched-LR control, the table and the models' answers. Also: caching, rebuilding when the
world's parameters change, --check against a results file, progress lines, and the one Selection."""
import copy
import dataclasses
import json
import subprocess
import sys

import pytest

from experiments import demo
from train import TGL_MODES

# every TGL arm and control of `full`, and one arm of each other method: every code path, fewer subprocesses
ONLY = [f"full+{t}" for t in TGL_MODES] + ["mixreview+fp", "recadam+alr", "lora+alr", "full@alr-lr"] + \
       [f"full+fp:random{d}" for d in range(3)] + ["full+fp:complement"]


def blocks_trained(summary):
    return {u for u, s in summary["scales"].items() if s > 0 and u.startswith("h.")}


def test_quick_demo_runs_everything(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    per_seed = demo.main(["--quick", "--out", str(out), "--results", str(tmp_path / "r.md"), "--only", *ONLY])
    res, printed = per_seed[0], capsys.readouterr().out
    rows = res["runs"]
    assert set(rows) == set(ONLY) | {"base (no update)"}
    for name, row in rows.items():
        assert set(row["probes"]) == set(demo.SPLITS), name
        for s in demo.SPLITS:
            assert row["probes"][s]["n"] > 0 and row["probes"][s]["ppl"] > 1.0
    # continual pretraining on the diff moves the updated facts' perplexity from the base model's
    updated_ppl = {n: rows[n]["probes"]["updated"]["ppl"] for n in ("full+none", "base (no update)")}
    assert updated_ppl["full+none"] != updated_ppl["base (no update)"]
    # both traces ran, on different LM text, and the selection ranks blocks only
    assert set(res["traces"]) == {"general", "facts"}
    assert res["traces"]["general"]["all"]["rgn"] != res["traces"]["facts"]["all"]["rgn"]
    runs = {n: json.load(open(out / "seed0" / "runs" / n / "summary.json")) for n in ONLY}
    fp = blocks_trained(runs["full+fp"])
    assert 0 < len(fp) < 2 * 2 and runs["full+fp"]["trainable_params"] < runs["full+none"]["trainable_params"]
    for n in ("full+fp", "full+fp:random0", "full+fp:complement"):  # embed and ln_f always train
        assert runs[n]["scales"]["embed"] == runs[n]["scales"]["ln_f"] == 1.0, n
    # controls: random draws have FP's size; the complement is exactly the blocks FP freezes
    for d in range(3):
        assert len(blocks_trained(runs[f"full+fp:random{d}"])) == len(fp)
    blocks = {f"h.{i}.{s}" for i in range(2) for s in ("attn", "mlp")}
    assert blocks_trained(runs["full+fp:complement"]) == blocks - fp
    table, traces = (tmp_path / "r.md").read_text().split("\n\n")
    assert traces.count("| 0 |") == 2 and "own fact text" in traces
    for row in ("| full+fp random (3 draws) |", "| full+fp complement |", "| lora+alr |"):
        assert row in table
    assert table.count("\n") + 1 == len(ONLY) - 2 + 1 + 2  # 3 draws are one row; + base; + 2 header lines
    assert json.loads((tmp_path / "r.json").read_text())["seeds"] == [0]
    # what the models say: a row per updated fact, a column for the base model and each `full` arm
    said = printed[printed.index("| prompt | gold |"):].split("\n\n")[0].splitlines()
    assert said[0] == "| prompt | gold | base says | full+none says | full+fp says | full+alr says |"
    assert len(said) == 2 + 3 and all(row.count(" | ") == 5 for row in said[2:])
    check_against_stored(per_seed, json.loads((tmp_path / "r.json").read_text()))
    # every continual run is told its thread count
    jobs = demo.continual_jobs(demo.parse_args(["--quick", "--out", str(out)]), demo.QUICK, 0,
                               str(out / "seed0"))
    assert all("--threads" in argv for _, argv in jobs) and demo.thread_env(3)["OMP_NUM_THREADS"] == "3"
    selection_reaches_runs_and_matched_lr(out, dict(jobs), monkeypatch)
    reruns(out, tmp_path, capsys, monkeypatch)


def reruns(out, tmp_path, capsys, monkeypatch):
    """After a whole quick demo in `out`: what is cached, --check, and what a changed world rebuilds."""
    capsys.readouterr()
    res = demo.main(["--quick", "--out", str(out), "--only", "lora+fp"])[0]  # again: world and base cached
    text = capsys.readouterr().out
    assert "world: cached" in text and "base model: cached" in text
    assert set(res["runs"]) == {"base (no update)", "lora+fp"}
    assert "| prompt | gold | base says | lora+fp says |" in text  # no `full` arm ran: the runs that did

    # --check: a results file of these sizes is compared (base and full+none: 12 cells); at other sizes
    # it is refused
    demo.main(["--quick", "--out", str(out), "--only", "full+none", "--check", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert "this run against" in text and "12 of 12 cells inside the stored seeds' range" in text
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--steps", "7", "--out", str(out), "--check", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--check" in err[0] and "steps 6, this demo 7" in err[0]

    monkeypatch.setitem(demo.QUICK, "entities", 20)  # other world parameters: rebuilt, and the base with it
    demo.main(["--quick", "--out", str(out), "--only", "full+none"])
    text = capsys.readouterr().out
    assert "parameters changed, rebuilding" in text and "base model: cached" not in text
    assert json.load(open(out / "seed0" / "world" / "world.json"))["config"]["n_entities"] == 20


def test_quick_and_full_use_different_folders():
    assert demo.parse_args(["--quick"]).out != demo.parse_args([]).out
    assert demo.parse_args(["--quick", "--out", "x"]).out == "x"


def selection_reaches_runs_and_matched_lr(out, before, monkeypatch):
    """One Selection: its flags go to every run whose --tgl uses them (train.py refuses the others), and
    full@alr-lr's learning rate is computed from it."""
    def lr_of(argv):
        return float(argv[argv.index("--lr") + 1])

    with monkeypatch.context() as m:
        m.setattr(demo, "SELECTION", dataclasses.replace(demo.SELECTION, floor=0.9))
        after = dict(demo.continual_jobs(demo.parse_args(["--quick", "--out", str(out)]), demo.QUICK, 0,
                                         str(out / "seed0")))
    floor = [argv[argv.index("--floor") + 1] for argv in (before["full+alr"], after["full+alr"])]
    assert floor == ["0.01", "0.9"] and all(("--floor" in argv) == ("--tgl alr" in " ".join(argv))
                                            for argv in after.values())
    assert sum("--select" in argv for argv in after.values()) == sum("--tgl fp" in " ".join(argv) for argv in
                                                                      after.values()) > 0
    assert lr_of(after["full@alr-lr"]) > lr_of(before["full@alr-lr"]) >= 0.01 * demo.QUICK["lr"]
    assert lr_of(after["full@alr-lr"]) >= 0.9 * demo.QUICK["lr"]


def check_against_stored(per_seed, stored):
    """check_table: every cell of a run against its own results is inside; moving one stored seed's cell
    puts that cell outside; a second stored seed on the other side brings it back inside the range."""
    text = demo.check_table(per_seed, stored)
    cells = 6 * (len(ONLY) - 2 + 1)  # 6 number cells a row; the 3 random draws are one row; + base
    assert f"{cells} of {cells} cells inside" in text and " OUT" not in text
    moved = copy.deepcopy(stored)
    moved["per_seed"][0]["runs"]["full+none"]["probes"]["updated"]["ppl"] += 1.0
    moved["per_seed"][0]["traces"]["general"]["all"]["max_over_min"] += 0.1
    text = demo.check_table(per_seed, moved)
    row = next(r for r in text.splitlines() if r.startswith("| full+none |"))
    assert row.split(" | ")[1].endswith(" OUT ({:.2f}–{:.2f})".format(*[
        moved["per_seed"][0]["runs"]["full+none"]["probes"]["updated"]["ppl"]] * 2))
    assert row.count(" OUT") == 1 and text.count(" OUT") == 2  # the cell and the trace line
    assert f"{cells - 1} of {cells} cells inside" in text
    other = copy.deepcopy(moved["per_seed"][0])
    other["seed"] = 1
    other["runs"]["full+none"]["probes"]["updated"]["ppl"] -= 2.0
    other["traces"]["general"]["all"]["max_over_min"] -= 0.2
    moved["per_seed"].append(other)
    text = demo.check_table(per_seed, moved)
    assert f"{cells} of {cells} cells inside" in text and " OUT" not in text and "(seeds 0 1;" in text


@pytest.mark.parametrize("body, says", [("not json", "not a demo results file"),
                                        ('{"per_seed": []}', "not a demo results file"),
                                        (None, "cannot read it")])
def test_check_refuses_a_bad_file_before_work(tmp_path, capsys, body, says):
    path = tmp_path / "stored.json"
    if body is not None:
        path.write_text(body)
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--out", str(tmp_path / "demo"), "--check", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and says in err[0] and "--check" in err[0], err
    assert not (tmp_path / "demo" / "seed0").exists()  # refused before the world was built


def fake_run(tmp_path, name, records, pause):
    """(name, argv) of a job that appends `records` to OUT/metrics.jsonl, `pause` s apart, like train.py."""
    code = ("import json, sys, time\nfor r in json.loads(sys.argv[1]):\n"
            "    out = sys.argv[sys.argv.index('--out') + 1]\n"
            "    open(out + '/metrics.jsonl', 'a').write(json.dumps(r) + '\\n')\n"
            f"    time.sleep({pause})\n")
    argv = [sys.executable, "-c", code, json.dumps(records), "--steps", "4", "--out", str(tmp_path / name)]
    return name, argv


def test_runs_show_progress_from_their_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "PROGRESS_EVERY", 0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 3, "loss": 9.0, "time": 1.0}\n')  # an old run's
    recs = [dict(step=s, loss=4.0 - s / 2, time=2.0 * s) for s in (2, 4)]
    jobs = [fake_run(tmp_path, "a", recs, 1.0), fake_run(tmp_path, "b", recs[:1], 1.5)]
    demo.run_jobs(jobs, 2, str(tmp_path), 1)
    text = capsys.readouterr().out
    assert "a: step 2/4 loss 3.00, ETA 4s" in text and "b: step 2/4 loss 3.00, ETA 4s" in text
    assert "step 3/4" not in text  # the replaced run's log never shows
    lines = [x for x in text.splitlines() if x.startswith("  ... ")]
    assert lines and all(x.count(" | ") <= 1 for x in lines)  # one line for both runs, never half lines
    assert "[2/2]" in text and "ETA" in text.split("[1/2]")[1].splitlines()[0]  # the runs' overall ETA
    # the base model's pretraining: the same lines, one at a time
    name, argv = fake_run(tmp_path, "a", recs, 1.0)
    follow = demo.MetricsFollower(tmp_path / "a", 4)
    demo.wait_showing(subprocess.Popen(argv), follow, "[seed 0] base")
    assert capsys.readouterr().out.splitlines()[0] == "[seed 0] base: step 2/4 loss 3.00, ETA 4s"


def test_metrics_follower_reads_whole_lines_only(tmp_path):
    follow = demo.MetricsFollower(tmp_path, 10)
    assert follow.poll() is None and follow.status("x") is None  # nothing written yet
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 2.5, "time": 10.0}\n{"step": 6, "lo')
    assert follow.status("x") == "x: step 5/10 loss 2.50, ETA 10s"
    assert follow.status("x") is None  # shown once
    with open(path, "a") as f:
        f.write('ss": 2.0, "time": 12.0}\n')
    assert follow.poll()["step"] == 6 and follow.status("x").startswith("x: step 6/10 loss 2.00, ETA 8s")
