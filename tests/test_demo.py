"""The demo end to end at --quick size: world, base model, trace, 12 method x TGL runs and the
matched-LR control, and the table. Also: the base model is cached on a second run."""
import json

import demo


def test_quick_demo_runs_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    rows = demo.main(["--quick", "--out", str(out), "--results", str(tmp_path / "r.md")])[0]
    expected = {f"{m}+{t}" for m in demo.METHODS for t in demo.TGLS} | {"full@alr-lr", "base (no update)"}
    assert set(rows) == expected
    for name, row in rows.items():
        assert set(row["probes"]) == set(demo.SPLITS), name
        for s in demo.SPLITS:
            assert row["probes"][s]["n"] > 0 and row["probes"][s]["ppl"] > 1.0
    # continual pretraining on the diff moves the updated facts' perplexity from the base model's
    assert rows["full+none"]["probes"]["updated"]["ppl"] != rows["base (no update)"]["probes"]["updated"]["ppl"]
    # TGL-FP really froze something: its run trained fewer parameters than the full run
    fp = json.load(open(out / "seed0" / "runs" / "full+fp" / "summary.json"))
    full = json.load(open(out / "seed0" / "runs" / "full+none" / "summary.json"))
    assert fp["trainable_params"] < full["trainable_params"]
    table = (tmp_path / "r.md").read_text()
    assert table.count("\n") == len(expected) + 2 and "| lora+alr |" in table
    assert json.loads((tmp_path / "r.json").read_text())["seeds"] == [0]

    capsys.readouterr()
    rows = demo.main(["--quick", "--out", str(out), "--only", "lora+fp"])[0]  # second run: base from the cache
    assert "base model: cached" in capsys.readouterr().out
    assert set(rows) == {"base (no update)", "lora+fp"}
