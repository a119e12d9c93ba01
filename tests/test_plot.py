"""plot.py: Figure 1 (loss, probe perplexity, per-unit gradient norms over training) from a tiny run."""
import json
from dataclasses import asdict, fields

import pytest

from experiments import plot
import train
from trace import Selection
from experiments.world import WorldConfig, make_world


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    make_world(d / "w", WorldConfig(seed=0, n_entities=12, heldout_words=200))
    train.main(["--init", "scratch", "--tokenizer", "word", "--data", str(d / "w" / "t0.txt"), "--out", str(d / "run"),
                "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                "--steps", "4", "--log-every", "1", "--eval-every", "2", "--threads", "1",
                "--probes", str(d / "w" / "probes" / "updated.jsonl"), str(d / "w" / "probes" / "new.jsonl")])
    return d / "run"


def test_terminal_and_png(run_dir, tmp_path, capsys):
    runs = plot.main([str(run_dir), str(run_dir / "metrics.jsonl"), "--png", str(tmp_path / "f.png"),
                      "--out", str(tmp_path / "f.txt"), "--width", "10"])
    s = runs["run"]
    assert [p[0] for p in s["loss"]] == [1, 2, 3, 4]
    assert [p[0] for p in s["ppl updated"]] == [2, 4] and "ppl new" in s  # probes every --eval-every
    assert {k for k in s if k.startswith("grad ")} == {f"grad {u}" for u in train.unit_names(2)}
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert s["grad h.1.mlp"][0][1] == first["grad_norms"]["h.1.mlp"]
    out = capsys.readouterr().out
    assert "grad h.0.attn" in out and out.count("ppl updated") == 2 and (tmp_path / "f.txt").read_text() in out
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    only = plot.main([str(run_dir), "--units", "embed,h.0.mlp"])["run"]
    assert {k for k in only if k.startswith("grad ")} == {"grad embed", "grad h.0.mlp"}


def test_sparkline():
    assert plot.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert plot.sparkline([3.0, 3.0]) == "▁▁" and len(plot.sparkline(list(range(100)), 20)) == 20


def test_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "nope")])
    assert e.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "bad.jsonl")])
    assert "not JSON lines" in capsys.readouterr().err


def test_trace_marks_read_every_selection_field():
    """plot takes the selection's fields from trace.Selection (a copied list once dropped a new field
    silently), and each recorded one reaches the '*' marks; each split's chart marks what FP selects
    from that split's rgn, whichever --trace-split the run used."""
    assert list(plot.SEL_FIELDS) == [f.name for f in fields(Selection)]
    units = train.unit_names(2)
    deeper = {u: float(i) for i, u in enumerate(units)}  # ln_f largest
    shallower = {u: float(len(units) - i) for i, u in enumerate(units)}  # embed largest
    splits = {"a": dict(rgn=deeper, units=units), "b": dict(rgn=shallower, units=units)}
    chosen = asdict(Selection(select="topk:1", rank_units="all", trace_split="b"))
    d = plot.check_trace("t.json", dict(rgn=deeper, units=units, splits=splits, selection=chosen))
    assert d["marks"] == {"a": {"ln_f"}, "b": {"embed"}}
    default = plot.check_trace("t.json", dict(rgn=deeper, units=units, splits=splits, selection={}))
    # the defaults: the blocks above their mean rgn, embed and ln_f always train
    assert default["marks"]["a"] == {"embed", "h.1.attn", "h.1.mlp", "ln_f"}
    with pytest.raises(ValueError, match="t.json: 'selection' is not trace.py's {select, rank_units"):
        plot.check_trace("t.json", dict(rgn=deeper, units=units, splits=splits, selection={"rank_units": 3}))
