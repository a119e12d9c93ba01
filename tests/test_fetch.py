"""experiments/fetch.py (`python -m experiments.realdata fetch`) and fetch.download against a local HTTP
server on 127.0.0.1 (started here) serving small archives in the real layouts: unpacking, resume after
an interruption, size checks, 404, no network, wrong layouts, and the ranged read of a snapshot prefix.
No other host is contacted."""
import base64
import csv
import io
import os
import random
import socket
import time
import zipfile
from pathlib import Path

import pytest

import data
from experiments import probe_files
from experiments import fetch, realdata
from httpserver import HF, zip_bytes  # the `server` fixture comes from conftest
from samples import DATA


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        realdata.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err

# ----------------------------------------------------------------------------- downloads


def test_fetch_twiki_probes_unpacks_and_then_makes_no_request(server, tmp_path, capsys):
    real = (DATA / "twiki_probes" / "0801-0901_changed.csv").read_text().splitlines()[:6]
    server.files[HF + "TWiki_Probes.zip"] = zip_bytes({"TWiki_Probes/0801-0901_changed.csv": "\n".join(real) + "\n"})
    realdata.main(["fetch", "twiki-probes"])
    folder = tmp_path / "cache" / "data" / "twiki-probes"
    probes = probe_files.read_probes(folder / "TWiki_Probes" / "0801-0901_changed.csv")
    assert len(probes) == 5 and probes[0].split == "changed" and probes[0].date == "0801-0901"
    assert not (folder / "TWiki_Probes.zip").exists() and not list(folder.glob("*.part"))
    n = len(server.log)
    realdata.main(["fetch", "twiki-probes"])
    assert len(server.log) == n  # done once: no second download


def test_interrupted_transfer_is_resumed_with_range(server, tmp_path):
    body = random.Random(0).randbytes(300_000)
    server.files["/f.bin"], server.cut["/f.bin"] = body, 100_000
    dest = tmp_path / "f.bin"
    with pytest.raises(OSError):
        fetch.download(server.url + "/f.bin", str(dest), retries=1)  # the connection drops
    part = tmp_path / "f.bin.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(body)
    have = part.stat().st_size
    fetch.download(server.url + "/f.bin", str(dest), retries=1)  # a later call resumes
    assert dest.read_bytes() == body and not part.exists()
    assert server.log[-1] == ("/f.bin", f"bytes={have}-")
    server.cut["/f.bin"] = 150_000  # within one call: the retry resumes
    fetch.download(server.url + "/f.bin", str(tmp_path / "g.bin"), retries=2)
    assert (tmp_path / "g.bin").read_bytes() == body and server.log[-1][1] is not None


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    body = bytes(range(256)) * 400
    server.files["/f.bin"], server.no_range = body, True
    (tmp_path / "f.bin.part").write_bytes(body[:1000] + b"stale")
    fetch.download(server.url + "/f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == body


def test_stale_part_and_404(server, tmp_path, capsys):
    server.files["/f.bin"] = b"x" * 1000
    (tmp_path / "g.bin.part").write_bytes(b"y" * 1200)  # a .part longer than the file: not kept as good
    with pytest.raises(OSError, match="does not fit"):
        fetch.download(server.url + "/f.bin", str(tmp_path / "g.bin"), retries=1)
    assert not (tmp_path / "g.bin").exists()
    err = one_line_error(capsys, ["fetch", "templama"])  # nothing served under /templama
    assert "templama/train.json" in err and "404" in err


def test_no_network_fails_fast_in_one_line(monkeypatch, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TGL_CACHE", str(tmp_path))
    t = time.time()
    err = one_line_error(capsys, ["fetch", "twiki-diffsets"])
    assert time.time() - t < 5
    assert "cannot reach" in err and "no network" in err
    assert "python -m experiments.realdata fetch twiki-diffsets" in err


def test_wrong_layouts_name_the_file(server, tmp_path, capsys):
    server.files[HF + "TWiki_Diffsets.zip"] = zip_bytes({"readme.txt": "not diff sets"})
    err = one_line_error(capsys, ["fetch", "twiki-diffsets"])
    assert "TWiki_Diffsets.zip: not the expected layout" in err
    server.files[HF + "TWiki_Probes.zip"] = b"<html>sign in</html>"
    assert "TWiki_Probes.zip: not a zip file" in one_line_error(capsys, ["fetch", "twiki-probes"])
    for f in ("train.json", "val.json", "test.json"):
        server.files["/templama/" + f] = b"<!DOCTYPE html><html></html>\n"
    assert "train.json: not the expected layout" in one_line_error(capsys, ["fetch", "templama"])


def test_templama_and_dynamic_templama_files(server, tmp_path):
    rec = (DATA / "real_formats" / "templama" / "test.json").read_bytes()
    dyn = (DATA / "real_formats" / "dynamic_templama" / "test.jsonl").read_bytes()
    for f in ("train", "val", "test"):
        server.files[f"/templama/{f}.json"], server.files[f"/dyn/{f}.jsonl"] = rec, dyn
    realdata.main(["fetch", "templama"])
    realdata.main(["fetch", "dynamic-templama", "--out", str(tmp_path / "dyn")])
    assert (tmp_path / "cache" / "data" / "templama" / "test.json").read_bytes() == rec
    assert probe_files.read_probes(tmp_path / "dyn" / "val.jsonl")[0].date == "2019-Q1"


def test_ecbd_prints_where_to_get_it_and_takes_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TGL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        realdata.main(["fetch", "ecbd"])
    assert e.value.code == 1 and "github.com/yasumasaonoe/ecbd" in capsys.readouterr().err
    realdata.main(["fetch", "ecbd", "--folder", str(DATA / "real_formats")])
    link = tmp_path / "cache" / "data" / "ecbd"
    assert (link / "ecbd2019" / "np_spans_test.json").is_file()
    assert "not an unpacked ECBD folder" in one_line_error(capsys, ["fetch", "ecbd", "--folder", str(tmp_path)])

# ----------------------------------------------------------------------------- snapshot prefix


def snapshot_zip():
    rng = random.Random(1)

    def part(docs):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerows([["id", "text"]] + [[i, d] for i, d in enumerate(docs)])
        return buf.getvalue()
    small = [f'Doc {i}. Text with "quotes", commas.' for i in range(5)]
    noise = [base64.b64encode(rng.randbytes(30_000)).decode() for _ in range(60)]  # incompressible
    return zipfile.ZipFile, small, zip_bytes({
        "Wikipedia_Full/wikipedia_08_gpt2/part0.csv": part(small),
        "Wikipedia_Full/wikipedia_08_gpt2/part1.csv": part(noise[:30]),
        "Wikipedia_Full/wikipedia_09_gpt2/part0.csv": part(noise[30:]),
    })


def test_snapshot_prefix_reads_only_the_members_it_needs(server, tmp_path, capsys):
    _, small, body = snapshot_zip()
    server.files[HF + "Wikipedia_Full.zip"] = body
    realdata.main(["fetch", "twiki-snapshot", "--max-docs", "3"])
    out = tmp_path / "cache" / "data" / "twiki-snapshot" / "wikipedia_08_gpt2_prefix.csv"
    with open(out, newline="") as f:
        assert [r["text"] for r in csv.DictReader(f)] == small[:3]
    err = capsys.readouterr().err
    fetched = float(err.split("MB downloaded")[0].rsplit("(", 1)[1])
    assert fetched * 1e6 < len(body) / 3  # the big members were not downloaded
    assert all(r is not None for _, r in server.log)  # ranged reads only
    assert "no snapshot for month '10'" in one_line_error(capsys, ["fetch", "twiki-snapshot", "--max-mb", "1",
                                                                   "--month", "10"])
    server.no_range = True
    assert "does not serve byte ranges" in one_line_error(capsys, ["fetch", "twiki-snapshot", "--max-mb", "1"])
    assert "twiki-snapshot only" in one_line_error(capsys, ["fetch", "templama", "--max-mb", "1"])


def test_snapshot_prefix_by_size_tokenizes(server, tmp_path):
    _, small, body = snapshot_zip()
    server.files[HF + "Wikipedia_Full.zip"] = body
    out = fetch.fetch("twiki-snapshot", tmp_path / "snap", max_mb=0.1, month="09")
    with open(out, newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    assert 3 <= len(texts) <= 5 and len(texts[0]) == 40_000  # just past 0.1 MB of whole documents
    tok = data.WordTokenizer.build(texts[:1])
    assert data.load_tokens(out, tok).tolist().count(tok.eot) == len(texts)  # one document per row
    assert os.path.basename(out) == "wikipedia_09_gpt2_prefix.csv"


def test_model_downloads_use_hf_endpoint_and_resume(server, tmp_path):
    weights = random.Random(2).randbytes(200_000)
    server.files["/gpt2/resolve/main/config.json"] = b'{"model_type": "gpt2"}'
    server.files["/gpt2/resolve/main/model.safetensors"], server.cut["/gpt2/resolve/main/model.safetensors"] = \
        weights, 140_000
    folder = Path(fetch.hub_folder("gpt2"))  # the transfer breaks off once; download's retry resumes it
    assert (folder / "model.safetensors").read_bytes() == weights
    ranges = [r for p, r in server.log if p.endswith("model.safetensors")]
    assert ranges[0] is None and len(ranges) == 2 and 0 < int(ranges[1][6:-1]) < 140_000  # resumed, not restarted
