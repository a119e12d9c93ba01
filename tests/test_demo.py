"""The demo end to end at --quick size: world, base model, two traces, method x TGL runs with the
controls and the matched-LR control, and the table. Also: caching, and rebuilding when the world's
parameters change."""
import json

from experiments import demo

# every TGL arm and control of `full`, and one arm of each other method: every code path, fewer subprocesses
ONLY = [f"full+{t}" for t in demo.TGLS] + ["mixreview+fp", "recadam+alr", "lora+alr", "full@alr-lr",
                                           "full+fp:random0", "full+fp:random1", "full+fp:random2", "full+fp:complement"]


def blocks_trained(summary):
    return {u for u, s in summary["scales"].items() if s > 0 and u.startswith("h.")}


def test_quick_demo_runs_everything(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    res = demo.main(["--quick", "--out", str(out), "--results", str(tmp_path / "r.md"), "--only", *ONLY])[0]
    rows = res["runs"]
    assert set(rows) == set(ONLY) | {"base (no update)"}
    for name, row in rows.items():
        assert set(row["probes"]) == set(demo.SPLITS), name
        for s in demo.SPLITS:
            assert row["probes"][s]["n"] > 0 and row["probes"][s]["ppl"] > 1.0
    # continual pretraining on the diff moves the updated facts' perplexity from the base model's
    assert rows["full+none"]["probes"]["updated"]["ppl"] != rows["base (no update)"]["probes"]["updated"]["ppl"]
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
    assert blocks_trained(runs["full+fp:complement"]) == {f"h.{i}.{s}" for i in range(2) for s in ("attn", "mlp")} - fp
    table, traces = (tmp_path / "r.md").read_text().split("\n\n")
    assert traces.count("| 0 |") == 2 and "own fact text" in traces
    assert "| full+fp random (3 draws) |" in table and "| full+fp complement |" in table and "| lora+alr |" in table
    assert table.count("\n") + 1 == len(ONLY) - 2 + 1 + 2  # 3 draws are one row; + base; + 2 header lines
    assert json.loads((tmp_path / "r.json").read_text())["seeds"] == [0]
    # every continual run is told its thread count
    jobs = demo.continual_jobs(demo.parse_args(["--quick", "--out", str(out)]), demo.QUICK, 0, str(out / "seed0"))
    assert all("--threads" in argv for _, argv in jobs) and demo.thread_env(3)["OMP_NUM_THREADS"] == "3"

    capsys.readouterr()
    res = demo.main(["--quick", "--out", str(out), "--only", "lora+fp"])[0]  # second run: world and base cached
    text = capsys.readouterr().out
    assert "world: cached" in text and "base model: cached" in text and set(res["runs"]) == {"base (no update)", "lora+fp"}

    monkeypatch.setitem(demo.QUICK, "entities", 20)  # other world parameters: rebuilt, and the base with it
    demo.main(["--quick", "--out", str(out), "--only", "full+none"])
    text = capsys.readouterr().out
    assert "parameters changed, rebuilding" in text and "base model: cached" not in text
    assert json.load(open(out / "seed0" / "world" / "world.json"))["config"]["n_entities"] == 20


def test_quick_and_full_use_different_folders():
    assert demo.parse_args(["--quick"]).out != demo.parse_args([]).out
    assert demo.parse_args(["--quick", "--out", "x"]).out == "x"
