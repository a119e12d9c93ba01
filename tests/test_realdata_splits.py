"""experiments/realdata.py `splits` and `tokenize` on the released layouts
(twiki_probes/0801-0901_changed.csv, TempLAMA's train/val/test.json, Dynamic TempLAMA's quarters, ECBD's
year folders, TWiki_Diffsets/): counts printed, evaluation and diagnostic files disjoint by key, malformed
rows refused, dates matched as FILE@DATES matches them, *_subset.csv named, every bad input one line, exit 2."""
import csv
import io
import json

import pytest

from data import WordTokenizer
from experiments.probe_files import read_probes
from experiments import realdata
from samples import DATA

REAL = DATA / "real_formats"


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def run(capsys, *argv):
    """-> (exit code, stdout, stderr) of realdata.main(argv)."""
    try:
        realdata.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("realdata.py") and " error: " in err, err
    assert "Traceback" not in err
    return err


def tl(query, name, date, rel="P54"):
    """A TempLAMA record as Google's templama.py writes it (the answer one {wikidata_id, name})."""
    return {"query": query, "answer": {"wikidata_id": "Q1", "name": name}, "date": date,
            "id": f"{query[:4]}_{rel}_{date}", "relation": rel}


def lines(*recs):
    return "".join(json.dumps(r) + "\n" for r in recs)


def rows(path):
    return list(csv.reader(open(path, newline="", encoding="utf-8")))[1:]


def twiki_csv(*rows_):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["subject", "relation", "object"])
    w.writerows(rows_)
    return buf.getvalue()


# ------------------------------------------------------------------------ 1: templama counts, no empty file


def test_templama_prints_input_kept_deleted_duplicates_and_writes_no_empty_file(tmp_path, capsys):
    root = tmp_path / "templama"  # the released layout: train.json, val.json, test.json (JSON lines)
    write(root / "train.json", lines(tl("A plays for _X_.", "X", "2018"), tl("A plays for _X_.", "Y", "2020"),
                                     tl("B plays for _X_.", "X", "2018"),
                                     tl("B plays for _X_.", "X", "2020")))
    write(root / "val.json", lines(tl("C plays for _X_.", "X", "2018"),  # deleted: no record of 2020
                                   tl("D plays for _X_.", "Z", "2020"), tl("E plays for _X_.", "Z", "2016")))
    write(root / "test.json", lines(tl("B plays for _X_.", "X", "2020"),  # the same fact again: counted once
                                    *(tl(f"U{i} plays for _X_.", "X", d)
                                      for i in range(4) for d in ("2018", "2020"))))
    code, out, err = run(capsys, "splits", "templama", "--input", root, "--from", "2018", "--to", "2020",
                         "--out", tmp_path / "o")
    assert code == 0, err
    assert ("templama: 16 records in 3 file(s); --from 2018: 7 facts, --to 2020: 7 facts; "
            "1 records of other dates") in out
    assert "kept 7 (updated 1, new 1, unchanged 5); deleted 1 (facts of 2018 with no record at 2020" in out
    assert "duplicate keys 1 (repeated query and date: counted once" in out
    written = sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").iterdir())
    assert written == ["diag_unchanged.jsonl", "new.jsonl", "unchanged.jsonl", "updated.jsonl"]  # none empty
    assert all(read_probes(tmp_path / "o" / f) for f in written)  # each one the tool itself reads back
    assert "note: diag_updated.jsonl not written: updated has 1 key" in err
    assert "note: diag_new.jsonl not written: new has 1 key" in err
    # a split that comes out empty: one line saying which and what to do, and no file
    code, out, err = run(capsys, "splits", "templama", "--input", root / "test.json", "--from", "2018",
                         "--to", "2020", "--out", tmp_path / "p")
    assert code == 0
    assert "note: updated.jsonl not written: the split came out empty (no fact of 2020 has another answer " \
           "at 2018: choose dates further apart, or give more input files)" in err
    assert not (tmp_path / "p" / "updated.jsonl").exists() and "updated.jsonl" not in out


# ------------------------------------------------------------------------ 2: disjoint by key, every kind


def test_eval_and_diag_never_share_a_subject_relation_with_duplicate_and_multivalued_rows(tmp_path, capsys):
    probes = tmp_path / "twiki_probes"
    multi = [("S%d" % i, "has part", f"P{j}") for i in range(12) for j in range(3)]  # 3 objects per key
    write(probes / "0801-0901_changed.csv", twiki_csv(*multi, *multi[:6], ("Shared", "member of", "A")))
    write(probes / "0801-0901_unchanged.csv", twiki_csv(*((f"U{i}", "country", "C") for i in range(12)),
                                                        ("Shared", "member of", "B")))  # in both splits
    for seed in range(6):
        counts = realdata.make_splits("twiki", [probes], tmp_path / f"o{seed}", diag_frac=0.5, seed=seed)
        out = tmp_path / f"o{seed}" / "0801-0901"
        keys = {f: {(r[0], r[1]) for r in rows(out / f)} for f in
                ("changed.csv", "diag_changed.csv", "unchanged.csv", "diag_unchanged.csv")}
        ev = keys["changed.csv"] | keys["unchanged.csv"]
        dg = keys["diag_changed.csv"] | keys["diag_unchanged.csv"]
        everything = {(s, r) for s, r, _ in multi} | {(f"U{i}", "country") for i in range(12)}
        assert not ev & dg and ev | dg == everything | {("Shared", "member of")}
        assert counts["0801-0901/changed.csv"] + counts["0801-0901/diag_changed.csv"] == 37  # duplicates once
        got = rows(out / "changed.csv") + rows(out / "diag_changed.csv")
        assert len(got) == len({tuple(r) for r in got}) == 37
    # TempLAMA: one query of one date twice with other answers is one fact with both, on one side only
    src = write(tmp_path / "dynamic-templama" / "test.jsonl", lines(
        *(tl(f"Q{i} plays for _X_.", "X", "2019-Q4") for i in range(8)),
        *(tl(f"Q{i} plays for _X_.", n, "2020-Q4") for i in range(8) for n in ("X", "Y"))))
    counts = realdata.make_splits("templama", [src], tmp_path / "t", ("2019-Q4", "2020-Q4"), diag_frac=0.5)
    assert counts == {"updated.jsonl": 4, "diag_updated.jsonl": 4}
    ev, dg = (read_probes(tmp_path / "t" / f) for f in ("updated.jsonl", "diag_updated.jsonl"))
    assert not {p.prompt for p in ev} & {p.prompt for p in dg}
    assert all(p.answers == ["X", "Y"] for p in ev + dg)
    # ECBD: by entity, a repeated record once
    rec = json.loads((REAL / "ecbd2019" / "np_spans_test.json").read_text())
    recs = [dict(rec, ex_id=f"{e}_{i}", entity_span_str=e) for e in ("E1", "E2", "E3", "E4", "E5")
            for i in range(3)]
    f = write(tmp_path / "ecbd" / "ecbd2021" / "np_spans_test.json", lines(*recs, recs[0], recs[4]))
    capsys.readouterr()
    counts = realdata.make_splits("ecbd", [tmp_path / "ecbd"], tmp_path / "e", diag_frac=0.4)
    assert counts == {"ecbd2021/new.jsonl": 9, "ecbd2021/diag_new.jsonl": 6}
    ev, dg = (read_probes(tmp_path / "e" / "ecbd2021" / f) for f in ("new.jsonl", "diag_new.jsonl"))
    assert not {p.id.split("_")[0] for p in ev} & {p.id.split("_")[0] for p in dg}
    assert f"ecbd: {f}: 17 records, 2 duplicates counted once, 5 entities" in capsys.readouterr().out


# ------------------------------------------------------------------------ 3: twiki malformed, duplicate rows


def test_twiki_refuses_a_malformed_row_and_counts_duplicate_rows_once(tmp_path, capsys):
    real = rows(DATA / "twiki_probes" / "0801-0901_changed.csv")[:20]
    probes = tmp_path / "twiki_probes"
    unchanged = rows(DATA / "twiki_probes" / "0801-0901_unchanged.csv")[:20]
    write(probes / "0801-0901_unchanged.csv", twiki_csv(*unchanged))
    changed = write(probes / "0801-0901_changed.csv",
                    twiki_csv(*real[:5], ["Lake Tahoe", "country", " "], *real[5:]))
    err = one_line_error(capsys, "splits", "twiki", "--input", probes, "--out", tmp_path / "o")
    assert f"{changed}:7: empty subject or object; splits copies no malformed record: fix or delete it" in err
    assert not (tmp_path / "o").exists()  # nothing derived from a file with a malformed row
    write(changed, twiki_csv(*real[:5], ["Lake Tahoe", "country", "USA", "extra"], *real[5:]))
    assert f"{changed}:7: expected 3 fields, got 4" in one_line_error(
        capsys, "splits", "twiki", "--input", probes, "--out", tmp_path / "o")
    write(changed, twiki_csv(*real, *real[:3], [f" {real[3][0]} ", *real[3][1:]]))  # four repeated rows
    code, out, err = run(capsys, "splits", "twiki", "--input", probes, "--out", tmp_path / "o", "--seed", "1")
    assert code == 0 and f"twiki: {changed}: 24 rows, 4 duplicate rows counted once" in out
    pair = tmp_path / "o" / "0801-0901"
    got = rows(pair / "changed.csv") + rows(pair / "diag_changed.csv")
    assert sorted(map(tuple, got)) == sorted(map(tuple, real))


# ------------------------------------------------------------------------ 4: dates


def test_years_and_quarters_match_as_file_at_date_does_and_bad_ranges_are_refused(tmp_path, capsys):
    src = write(tmp_path / "templama" / "test.json", lines(
        tl("A plays for _X_.", "X", "2018-Q1"), tl("A plays for _X_.", "Y", "2018-Q4"),  # its latest: Y
        tl("B plays for _X_.", "X", "2018"), tl("C plays for _X_.", "X", "2018-Q2"),
        tl("A plays for _X_.", "Y", "2020"), tl("B plays for _X_.", "X", "2020-Q3"),
        tl("C plays for _X_.", "Z", "2020")))
    want = {"2018", "2018-Q1", "2018-Q2", "2018-Q4"}
    assert {p.date for p in read_probes(f"{src}@2018")} == want  # the rule splits follows
    code, out, err = run(capsys, "splits", "templama", "--input", src, "--from", "2018", "--to", "2020",
                         "--out", tmp_path / "o", "--diag-frac", "0")
    assert code == 0, err
    assert "kept 3 (updated 1, new 0, unchanged 2)" in out  # not every fact "new"
    assert json.loads((tmp_path / "o" / "updated.jsonl").read_text())["query"] == "C plays for _X_."
    for frm, to, want in [("2020", "2018", "--from 2020 comes after --to 2018: swap them"),
                          ("2018", "2018-Q3", "--from 2018 and --to 2018-Q3 overlap"),
                          ("2018", "2018", "--from 2018 and --to 2018 overlap"),
                          ("2019..2016", "2020", "--from 2019..2016: give one date"),
                          ("2018", "2019,2020", "--to 2019,2020: give one date")]:
        assert want in one_line_error(capsys, "splits", "templama", "--input", src, "--from", frm, "--to", to,
                                      "--out", tmp_path / "r")
    assert not (tmp_path / "r").exists()
    err = one_line_error(capsys, "splits", "templama", "--input", src, "--from", "2017", "--to", "2020",
                         "--out", tmp_path / "r")
    assert f"--to 2020" not in err and f"--from 2017: {src}: no probe has a date in '2017'" in err


# ------------------------------------------------------------------------ 5: tokenize a folder


def test_tokenize_folder_names_its_files_and_refuses_subset_files(tmp_path, capsys):
    diffs = tmp_path / "TWiki_Diffsets"  # the released layout: the diff set and a *_subset.csv per month pair
    text = (REAL / "twiki_diffsets" / "wikipedia_0809_gpt2_constructed.csv").read_text(encoding="utf-8")
    write(diffs / "wikipedia_0809_gpt2.csv", text)
    write(diffs / "wikipedia_0809_subset.csv", 'id,url,title,text\n1,https://x.org/X,X,"X is y."\n')
    docs = [r[0] for r in rows(diffs / "wikipedia_0809_gpt2.csv")] + ["X is y."]
    WordTokenizer.build(docs).save(tmp_path / "tokenizer.json")
    tok = ["--tokenizer", tmp_path / "tokenizer.json"]
    err = one_line_error(capsys, "tokenize", "--text", diffs, *tok)
    assert "holds TemporalWiki's *_subset.csv (wikipedia_0809_subset.csv)" in err and "--text" in err
    assert not list(diffs.glob("*.tokens.bin")) and not list(tmp_path.glob("*.tokens.bin"))
    # the one rule (data._source_files): --with-subset is gone, since train.py --data refuses the folder too
    assert "--with-subset" in one_line_error(capsys, "tokenize", "--text", diffs, "--with-subset", *tok)
    write(diffs / "more" / "notes.txt", "X is y.\n")
    (diffs / "wikipedia_0809_subset.csv").unlink()
    code, out, err = run(capsys, "tokenize", "--text", diffs, *tok)
    assert code == 0 and f"{diffs}: 2 file(s): more/notes.txt, wikipedia_0809_gpt2.csv" in out
    code, out, _ = run(capsys, "tokenize", "--text", diffs / "wikipedia_0809_gpt2.csv", *tok)
    assert code == 0 and "file(s)" not in out and out.startswith(f"{diffs / 'wikipedia_0809_gpt2.csv'}: ")


# ------------------------------------------------------------------------ 6: one error boundary


GOOD = tl("A plays for _X_.", "X", "2018"), tl("A plays for _X_.", "Y", "2020")


@pytest.mark.parametrize("line, want", [
    ('{"query": "A plays for _X_.", "date": ', ":3: not valid JSON"),
    ('[1, 2]', ":3: expected a JSON object per line, got list"),
    (json.dumps(dict(GOOD[1], query=["A plays for _X_."])),
     ":3: 'query' is [\"A plays for _X_.\"], want a string"),
    (json.dumps(dict(GOOD[1], relation=["P54"])), ":3: 'relation' is [\"P54\"], want a string"),
    (json.dumps(dict(GOOD[1], date={"y": 2020})), ":3: 'date' is {\"y\": 2020}, want a string"),
    (json.dumps(dict(GOOD[1], answer=7)), ":3: empty or malformed answer 7"),
    (json.dumps(dict(GOOD[1], answer=[{"wikidata_id": "Q1"}])), ":3: empty or malformed answer"),
    (json.dumps(dict(GOOD[1], query="A plays for nobody.")), ":3: query has no _X_ slot"),
])
def test_malformed_templama_records_are_one_line_naming_file_and_line(tmp_path, capsys, line, want):
    src = write(tmp_path / "templama" / "test.json", lines(*GOOD) + line + "\n")
    err = one_line_error(capsys, "splits", "templama", "--input", src, "--from", "2018", "--to", "2020",
                         "--out", tmp_path / "o")
    assert f"{src}{want}" in err
    assert not (tmp_path / "o").exists()


def test_bom_is_accepted_and_other_bad_files_are_one_line(tmp_path, capsys):
    probes = tmp_path / "twiki_probes"  # Excel's "CSV UTF-8" starts with a byte-order mark: valid input
    write(probes / "0801-0901_changed.csv", twiki_csv(*((f"S{i}", "country", "C") for i in range(8))),
          "utf-8-sig")
    write(probes / "0801-0901_unchanged.csv", twiki_csv(("T", "country", "D"), ("V", "country", "E")))
    code, out, err = run(capsys, "splits", "twiki", "--input", probes, "--out", tmp_path / "o")
    assert code == 0, err
    assert len(rows(tmp_path / "o" / "0801-0901" / "changed.csv")) == 6
    assert not (tmp_path / "o" / "0801-0901" / "changed.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    src = write(tmp_path / "templama" / "test.json", lines(*GOOD), "utf-8-sig")
    assert run(capsys, "splits", "templama", "--input", src, "--from", "2018", "--to", "2020",
               "--out", tmp_path / "t")[0] == 0
    (probes / "0801-0901_changed.csv").write_bytes(b"subject,relation,object\nCaf\xe9,country,France\n")
    assert "0801-0901_changed.csv: not UTF-8 (byte 0xe9" in one_line_error(
        capsys, "splits", "twiki", "--input", probes, "--out", tmp_path / "x")
    write(probes / "0801-0901_changed.csv", "subj,rel,obj\nA,b,C\n")
    assert "0801-0901_changed.csv:1: no 'subject', 'relation', 'object' column" in one_line_error(
        capsys, "splits", "twiki", "--input", probes, "--out", tmp_path / "x")
    rec = json.loads((REAL / "ecbd2019" / "np_spans_test.json").read_text())
    ecbd = write(tmp_path / "ecbd" / "ecbd2019" / "np_spans_test.json",
                 json.dumps(dict(rec, entity_span_str=["GPT-2"])) + "\n")
    assert f"{ecbd}:1: 'entity_span_str' is [\"GPT-2\"], want a string" in one_line_error(
        capsys, "splits", "ecbd", "--input", tmp_path / "ecbd", "--out", tmp_path / "x")
    assert "--input" in one_line_error(capsys, "splits", "templama", "--input", src, src, "--from", "2018",
                                       "--to", "2020", "--out", tmp_path / "x")  # the same file twice
    assert "--diag-frac" in one_line_error(capsys, "splits", "twiki", "--input", probes,
                                           "--out", tmp_path / "x", "--diag-frac", "nan")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ diag_frac 0 and stale files


def test_diag_frac_zero_writes_no_diag_file_and_a_stale_one_is_refused(tmp_path, capsys):
    probes = tmp_path / "twiki_probes"
    for kind in ("changed", "unchanged"):
        write(probes / f"0801-0901_{kind}.csv",
              twiki_csv(*((f"{kind}{i}", "country", "C") for i in range(8))))
    counts = realdata.make_splits("twiki", [probes], tmp_path / "o", seed=0)
    assert counts["0801-0901/diag_changed.csv"] == 2
    before = (tmp_path / "o" / "0801-0901" / "diag_changed.csv").read_text()
    err = one_line_error(capsys, "splits", "twiki", "--input", probes, "--out", tmp_path / "o",
                         "--diag-frac", "0")
    assert "0801-0901/diag_changed.csv: left by an earlier run, and this run writes no such file" in err
    assert (tmp_path / "o" / "0801-0901" / "diag_changed.csv").read_text() == before
    assert len(rows(tmp_path / "o" / "0801-0901" / "changed.csv")) == 6  # nothing rewritten either
    counts = realdata.make_splits("twiki", [probes], tmp_path / "z", diag_frac=0)
    assert counts == {"0801-0901/changed.csv": 8, "0801-0901/unchanged.csv": 8}
    got = sorted(p.name for p in (tmp_path / "z" / "0801-0901").iterdir())
    assert got == ["changed.csv", "unchanged.csv"]
