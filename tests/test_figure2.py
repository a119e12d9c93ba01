"""experiments/figure2.py end to end, offline: a tiny random GPT-2 served as the hub name gpt2, TempLAMA and
a Wikipedia snapshot served by the local test server, ECBD from tests/data; the trace's contents, the
figure (PNG with matplotlib, the text chart without), a rerun that fetches nothing, --plan, refusals."""
import csv
import io
import sys

import pytest

import model as M
from experiments import figure2
from experiments.export import save_hf
from httpserver import HF, zip_bytes
from samples import DATA


def serve(server, tmp_path):
    save_hf(M.GPT(M.GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)), tmp_path / "m")
    for f in ("config.json", "model.safetensors"):
        server.files[f"/gpt2/resolve/main/{f}"] = (tmp_path / "m" / f).read_bytes()
    templama = (DATA / "real_formats" / "templama" / "test.json").read_bytes()
    for f in ("train.json", "val.json", "test.json"):
        server.files[f"/templama/{f}"] = templama
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(
        [["id", "text"]] + [[i, f"Article {i}. Somebody plays for some club, and the river runs by the town."]
                            for i in range(40)])
    server.files[HF + "Wikipedia_Full.zip"] = zip_bytes(
        {"Wikipedia_Full/wikipedia_08_gpt2/part0.csv": buf.getvalue()})


def argv(out, *more):
    return ["--init", "gpt2", "--out", str(out), "--ecbd", str(DATA / "real_formats"), "--n-span", "4",
            "--n-lm", "3", "--block-size", "32", "--snapshot-mb", "0.002", "--device", "cpu", *more]


def test_figure2_end_to_end(server, tmp_path, capsys, monkeypatch):
    serve(server, tmp_path)
    out = tmp_path / "fig"
    d = figure2.main(argv(out))
    assert d["counts"]["span"] == {"updated": 3, "new": 1}  # TempLAMA 2019 -> 2020: 3 changed; ECBD: 1
    sp = d["splits"]
    units = ["embed", "h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp", "ln_f"]
    assert set(sp) == {"updated", "new", "all"} and d["units"] == units and d["block_size"] == 32
    assert sp["updated"]["lm_norm"] == sp["new"]["lm_norm"]  # one LM norm: they differ by span norms alone
    for s in ("updated", "new"):
        assert all(v > 0 for v in sp[s]["span_norm"].values())
        assert sp[s]["rgn"] == pytest.approx({u: sp[s]["span_norm"][u] / sp[s]["lm_norm"][u] for u in units})
    said = capsys.readouterr().out
    text = (out / "figure2.txt").read_text()
    assert "relative gradient norm, updated" in text and "relative gradient norm, new" in text
    assert "attn updated" in text and f"{sp['new']['rgn']['h.1.mlp']:.3f}" in text.splitlines()[-4]
    assert (out / "figure2.png").read_bytes()[:4] == b"\x89PNG" and "figure2.png" in said
    assert "trace.py --init gpt2 --probes" in said  # the step by hand
    # again, without matplotlib: nothing fetched or traced again, the chart in text only
    requests, before = len(server.log), (out / "trace.json").read_bytes()
    (out / "figure2.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    figure2.main(argv(out))
    assert len(server.log) == requests and (out / "trace.json").read_bytes() == before
    assert not (out / "figure2.png").exists() and "no matplotlib" in capsys.readouterr().out
    figure2.main(argv(out, "--plan"))  # counts the probes the files hold; the steps done are marked
    said = capsys.readouterr().out
    assert "3 updated + 1 new probes" in said and "# done: python trace.py" in said
    # other flags into the same folder: one line, unless --overwrite
    with pytest.raises(SystemExit) as e:
        figure2.main(argv(out, "--seed", "1"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--seed 0 -> 1" in err


def test_plan_and_refusals(server, tmp_path, capsys):
    serve(server, tmp_path)
    out = tmp_path / "plan"
    assert figure2.main(argv(out, "--plan")) is None
    said = capsys.readouterr().out
    assert "realdata fetch templama" in said and "splits templama" in said and "trace.py --init gpt2" in said
    assert "ESTIMATE of the trace on this device (cpu): 3 LM windows x" in said and "4 updated + 4 new probes" in said
    assert not out.exists()  # nothing written
    for more, want in [(["--ecbd", str(tmp_path)], "no YEAR/np_spans_test.json"), (["--n-lm", "0"], "--n-lm"),
                       (["--dates", "2020", "2019"], "swap them"), (["--text", str(tmp_path / "no")], "--text"),
                       (["--init", "no/such/model"], "--init"), (["--block-size", "65"], "context is 64")]:
        with pytest.raises(SystemExit) as e:
            figure2.main(argv(out, *more))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and want in err, err
    assert not server.log or all("/gpt2/" in p for p, _ in server.log)  # refused before any data download
    assert not out.exists()  # and before anything is written
