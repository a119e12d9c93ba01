"""Issue 18, the newer surfaces of fetch and world: every bad case is the right result or one line naming the
file or flag (exit 2, no traceback), and nothing the command did not create is lost. One test per class:
world.py's folder, fetch's unpack and markers, fetch's flags and ranged reads, fetch.download's resume
and lock. Against the local HTTP server of tests/httpserver.py; archives are made here."""
import csv
import fcntl
import json
import os
import random
import subprocess
import sys
import zipfile

import pytest

from experiments import fetch, realdata, world
from httpserver import HF, zip_bytes
from test_fetch import snapshot_zip

PROBES = "TWiki_Probes/0801-0901_changed.csv"
CSV = "id,text\n" + "".join(f"{i},row {i} of the probes\n" for i in range(200))
SMALL = dict(seed=1, n_entities=12, heldout_words=200)


def one_line(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid

# ----------------------------------------------------------------------------- world.py --out


def test_world_never_replaces_files_it_did_not_write(tmp_path, capsys):
    args = ["--seed", "1", "--n-entities", "12", "--heldout-words", "200"]
    run = tmp_path / "run"  # a training run's folder
    run.mkdir()
    (run / "tokenizer.json").write_text("the run's vocabulary")
    err = one_line(capsys, world.main, ["--out", str(run), *args])
    assert "tokenizer.json" in err and "--overwrite" in err
    assert (run / "tokenizer.json").read_text() == "the run's vocabulary" and not (run / "t0.txt").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "t0.txt").write_text("my own text")
    assert "t0.txt" in one_line(capsys, world.main, ["--out", str(mine), *args])
    assert (mine / "t0.txt").read_text() == "my own text"
    world.main(["--out", str(mine), *args, "--overwrite"])  # asked for: replaced
    assert world.world_matches(mine, world.WorldConfig(**SMALL))
    notes = tmp_path / "notes"  # other files are left alone
    notes.mkdir()
    (notes / "notes.md").write_text("keep")
    world.main(["--out", str(notes), *args])
    world.main(["--out", str(notes), "--seed", "2", "--n-entities", "12", "--heldout-words", "200"])  # again
    assert (notes / "notes.md").read_text() == "keep"
    assert world.world_matches(notes, world.WorldConfig(**{**SMALL, "seed": 2}))
    old = tmp_path / "old"  # a world from before the markers: world.py's own, rebuilt without --overwrite
    world.main(["--out", str(old), *args])
    (old / world.DONE).unlink()
    world.main(["--out", str(old), *args])
    assert world.world_matches(old, world.WorldConfig(**SMALL))


def test_world_killed_half_way_is_rebuilt_not_cached(tmp_path, monkeypatch, capsys):
    from experiments import demo
    out, cfg = tmp_path / "world", dict(entities=12, heldout_words=200)
    demo.build_world(str(out), cfg, seed=1)
    assert "world: building" in capsys.readouterr().out

    def killed(self, path):
        raise KeyboardInterrupt  # the rebuild for seed 2 dies after the texts, before the tokenizer
    monkeypatch.setattr(world.WordTokenizer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.build_world(str(out), cfg, seed=2)
    monkeypatch.undo()
    for seed in (1, 2):  # a mixed world: seed 2's texts, seed 1's tokenizer; neither is "cached"
        assert not world.world_matches(out, world.WorldConfig(seed=seed, n_entities=12, heldout_words=200))
    capsys.readouterr()
    demo.build_world(str(out), cfg, seed=1)
    assert "rebuilding" in capsys.readouterr().out and world.world_matches(out, world.WorldConfig(**SMALL))
    demo.build_world(str(out), cfg, seed=1)
    assert "cached" in capsys.readouterr().out
    with open(out / "t1.txt", "a") as f:  # a file changed after the marker: not the world the marker says
        f.write("more")
    assert not world.world_matches(out, world.WorldConfig(**SMALL))
    (out / "t1.txt").unlink()
    assert not world.world_matches(out, world.WorldConfig(**SMALL))

# ----------------------------------------------------------------------------- fetch: unpack and markers


def test_unpack_keeps_the_users_files_and_markers_mean_complete(server, tmp_path, capsys):
    server.files[HF + "TWiki_Probes.zip"] = zip_bytes({PROBES: CSV})
    folder = tmp_path / "cache" / "data" / "twiki-probes"
    (folder / "TWiki_Probes").mkdir(parents=True)
    (folder / "TWiki_Probes" / "mine.txt").write_text("the user's")
    err = one_line(capsys, realdata.main, ["fetch", "twiki-probes"])
    assert "TWiki_Probes is in the way" in err and "move it away" in err
    assert (folder / "TWiki_Probes" / "mine.txt").read_text() == "the user's"
    assert not (folder / PROBES).exists() and not list(folder.glob(".unpack.*"))
    os.rename(folder / "TWiki_Probes", tmp_path / "moved")
    stale = folder / f".unpack.{dead_pid()}"  # a killed unpack's temporary folder
    live = folder / f".unpack.{os.getppid()}"  # a live process's: not touched
    for t in (stale, live):
        (t / "TWiki_Probes").mkdir(parents=True)
    realdata.main(["fetch", "twiki-probes"])
    assert (folder / PROBES).read_text() == CSV and not stale.exists() and live.is_dir()
    n = len(server.log)
    realdata.main(["fetch", "twiki-probes"])
    assert len(server.log) == n and "already in" in capsys.readouterr().out
    with open(folder / PROBES, "a") as f:  # a file of the unpack changed: not complete, fetched again
        f.write("x")
    realdata.main(["fetch", "twiki-probes"])
    assert len(server.log) == n + 1 and (folder / PROBES).read_text() == CSV
    import shutil
    shutil.rmtree(folder / "TWiki_Probes")  # marker there, folder deleted: fetched and unpacked again
    realdata.main(["fetch", "twiki-probes"])
    assert len(server.log) == n + 2 and (folder / PROBES).read_text() == CSV
    (folder / ".TWiki_Probes.zip.done").unlink()  # killed while moving: .unpacking says what is ours
    (folder / ".TWiki_Probes.zip.unpacking").write_text(json.dumps({"tops": ["TWiki_Probes"], "files": {PROBES: 3}}))
    (folder / PROBES).write_text("half")
    realdata.main(["fetch", "twiki-probes"])
    assert (folder / PROBES).read_text() == CSV and not (folder / ".TWiki_Probes.zip.unpacking").exists()
    (folder / ".TWiki_Probes.zip.done").write_text("")  # the first version's empty marker, files there
    realdata.main(["fetch", "twiki-probes"])
    assert len(server.log) == n + 3
    server.files[HF + "TWiki_Diffsets.zip"] = zip_bytes({"d/wikipedia_0809_gpt2.csv": CSV, "extra/": ""})
    (tmp_path / "diff" / "extra").mkdir(parents=True)  # in the way of a folder-only member
    (tmp_path / "diff" / "extra" / "mine.txt").write_text("the user's")
    assert "extra is in the way" in one_line(capsys, realdata.main, ["fetch", "twiki-diffsets", "--out",
                                                                     str(tmp_path / "diff")])
    assert (tmp_path / "diff" / "extra" / "mine.txt").exists() and not (tmp_path / "diff" / "d").exists()


def lying_size(name, body: bytes, declared: int) -> bytes:
    """A zip whose member `name` declares `declared` bytes but inflates to len(body)."""
    z = bytearray(zip_bytes({name: body}))
    local, central = z.index(b"PK\x03\x04"), z.index(b"PK\x01\x02")
    z[local + 22:local + 26] = z[central + 24:central + 28] = declared.to_bytes(4, "little")
    return bytes(z)


def test_corrupt_and_over_inflating_members_name_the_member(server, tmp_path, capsys):
    url, folder = HF + "TWiki_Probes.zip", tmp_path / "cache" / "data" / "twiki-probes"
    stored = bytearray(zip_bytes({PROBES: CSV}, zipfile.ZIP_STORED))
    i = stored.index(b"row 7 of")
    stored[i] ^= 0xFF  # one byte flipped in the data: a bad CRC
    server.files[url] = bytes(stored)
    err = one_line(capsys, realdata.main, ["fetch", "twiki-probes"])
    assert "TWiki_Probes.zip" in err and PROBES in err and "CRC" in err and "run again" in err
    assert (folder / "TWiki_Probes.zip.bad").exists() and not (folder / "TWiki_Probes").exists()
    server.files[url] = zip_bytes({PROBES: CSV})  # the rerun fetches it anew instead of failing forever
    realdata.main(["fetch", "twiki-probes"])
    assert (folder / PROBES).read_text() == CSV
    text = "".join(f"{i},{random.Random(i).random()}\n" for i in range(3000))
    server.files[HF + "TWiki_Diffsets.zip"] = lying_size("d/wikipedia_0809_gpt2.csv", text.encode(), 1000)
    err = one_line(capsys, realdata.main, ["fetch", "twiki-diffsets"])
    assert "TWiki_Diffsets.zip" in err and "d/wikipedia_0809_gpt2.csv" in err and "corrupt" in err
    server.files[HF + "TWiki_Diffsets.zip"] = zip_bytes({"d/wikipedia_0809_gpt2.csv": b"\0" * (3 << 20)})
    err = one_line(capsys, realdata.main, ["fetch", "twiki-diffsets", "--out", str(tmp_path / "bomb")])
    assert "d/wikipedia_0809_gpt2.csv" in err and "zip bomb" in err and not (tmp_path / "bomb" / "d").exists()

# ----------------------------------------------------------------------------- fetch: flags, ranged reads


def test_fetch_flags_dropped_ranged_reads_and_a_second_fetch(server, tmp_path, capsys, monkeypatch):
    for flag, v in (("--max-mb", "inf"), ("--max-mb", "nan"), ("--max-mb", "-1"), ("--max-docs", "0")):
        assert flag in one_line(capsys, realdata.main, ["fetch", "twiki-snapshot", flag, v])
    with pytest.raises(ValueError, match="--max-mb"):
        fetch.fetch("twiki-snapshot", tmp_path / "x", max_mb=float("nan"))
    _, small, body = snapshot_zip()
    server.files[HF + "Wikipedia_Full.zip"] = body
    members, drops = fetch._snapshot_members, []

    class Cut(dict):  # the next ranged reads after the central directory break off after drops[-1] bytes
        def pop(self, key, default):
            return drops.pop() if drops else default

    def after_directory(*a):
        drops.append(100)
        return members(*a)
    monkeypatch.setattr(server, "cut", Cut())
    monkeypatch.setattr(fetch, "_snapshot_members", after_directory)
    realdata.main(["fetch", "twiki-snapshot", "--max-docs", "3"])  # one drop: read on from there
    out = tmp_path / "cache" / "data" / "twiki-snapshot" / "wikipedia_08_gpt2_prefix.csv"
    with open(out, newline="") as f:
        assert [r["text"] for r in csv.DictReader(f)] == small[:3] and not drops  # the drop happened
    monkeypatch.setattr(fetch, "_snapshot_members", lambda *a: (drops.extend([0] * 9), members(*a))[1])
    out.unlink()
    capsys.readouterr()
    err = one_line(capsys, realdata.main, ["fetch", "twiki-snapshot", "--max-docs", "3"])  # nothing comes
    assert "Wikipedia_Full.zip: reading at byte" in err and "failed 3 times" in err and not out.exists()
    drops.clear()
    server.files[HF + "TWiki_Probes.zip"] = zip_bytes({PROBES: CSV})
    folder = tmp_path / "cache" / "data" / "twiki-probes"
    folder.mkdir(parents=True)
    with open(folder.parent / ".twiki-probes.lock", "w") as held:  # another fetch into the folder is running
        fcntl.flock(held, fcntl.LOCK_EX)
        err = one_line(capsys, realdata.main, ["fetch", "twiki-probes"])
    assert f"--out {folder} is being written by" in err and not (folder / "TWiki_Probes.zip.part").exists()
    realdata.main(["fetch", "twiki-probes"])
    assert (folder / PROBES).read_text() == CSV

# ----------------------------------------------------------------------------- fetch.download


def test_download_resume_if_range_and_lock(server, tmp_path, capsys):
    old, new = random.Random(0).randbytes(300_000), random.Random(1).randbytes(300_000)
    server.files["/f.bin"], server.cut["/f.bin"] = old, 100_000
    dest = str(tmp_path / "f.bin")
    with pytest.raises(OSError):
        fetch.download(server.url + "/f.bin", dest, retries=1)
    server.files["/f.bin"] = new  # the file changed on the server before the resume: start again
    fetch.download(server.url + "/f.bin", dest, retries=1)
    assert open(dest, "rb").read() == new and server.log[-1][1].startswith("bytes=6")  # asked to resume
    server.cut["/f.bin"] = 100_000  # unchanged: resumed, not restarted
    with pytest.raises(OSError):
        fetch.download(server.url + "/f.bin", str(tmp_path / "g.bin"), retries=1)
    fetch.download(server.url + "/f.bin", str(tmp_path / "g.bin"), retries=1)
    assert (tmp_path / "g.bin").read_bytes() == new and server.log[-1][1].startswith("bytes=6")
    with open(dest + ".lock", "a") as held:  # a second download of the same file at once
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(OSError, match="another process is downloading .*f.bin"):
            fetch.download(server.url + "/f.bin", dest)
    # a server that ignores If-Range appends the changed file to the old part: the archive fails its check,
    # is set aside, and the rerun fetches it whole
    url, folder = HF + "TWiki_Probes.zip", tmp_path / "cache" / "data" / "twiki-probes"
    big = "id,text\n" + "".join(f"{i},row {i} of the probes\n" for i in range(20_000))  # past one chunk
    first = zip_bytes({PROBES: big}, zipfile.ZIP_STORED)
    second = zip_bytes({PROBES: big.replace("row", "ROW")}, zipfile.ZIP_STORED)
    folder.mkdir(parents=True)
    server.files[url], server.cut[url], server.no_if_range = first, len(first) // 2, True
    with pytest.raises(OSError):
        fetch.download(server.url + url, str(folder / "TWiki_Probes.zip"), retries=1)
    have = (folder / "TWiki_Probes.zip.part").stat().st_size
    assert have > 0
    server.files[url] = second
    err = one_line(capsys, realdata.main, ["fetch", "twiki-probes"])
    assert "TWiki_Probes.zip" in err and PROBES in err and (folder / "TWiki_Probes.zip.bad").exists()
    assert server.log[-1][1] == f"bytes={have}-"  # resumed from the old part, If-Range ignored
    realdata.main(["fetch", "twiki-probes"])
    assert (folder / PROBES).read_text() == big.replace("row", "ROW")
