"""data.py and experiments/realdata.py on the real corpora's layouts: TemporalWiki CSV text, TempLAMA
dates and object-first templates, ECBD definitions, split names that never merge, prefix token arrays,
probe splits. Uses the real samples in tests/data where possible."""
import csv
import json

import pytest

import data
from data import WordTokenizer, load_tokens
from experiments.probe_files import read_probe_files, read_probes
from experiments import realdata
from samples import DATA

REAL = DATA / "real_formats"
TWIKI = DATA / "twiki_probes"


@pytest.fixture(scope="module")
def gpt2():
    return data.GPT2Tokenizer()


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def csv_texts(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [r["text"] for r in csv.DictReader(f)]

# ----------------------------------------------------------------------------- text


def test_twiki_csv_reads_the_text_column_one_document_per_row(tmp_path, gpt2):
    src = write(tmp_path / "w.csv", (REAL / "twiki_diffsets" / "wikipedia_0809_gpt2_constructed.csv").read_text())
    texts = csv_texts(src)
    arr = load_tokens(src, gpt2)
    ids = arr.tolist()
    assert ids.count(gpt2.eot) == len(texts) == 3  # one end-of-text per row, not per file
    want = [t for doc in texts for t in gpt2.encode(doc) + [gpt2.eot]]
    assert ids == want
    decoded = gpt2.enc.decode(list(ids))
    assert "text" not in decoded.split("<|endoftext|>")[0][:5] and '""' not in decoded  # no header, no CSV quoting
    assert '"Secretary of State for Justice"' in decoded


def test_csv_fields_over_the_default_limit_and_folders_of_csv_and_txt(tmp_path, gpt2):
    long = "word " * 40000  # 200,000 characters: over csv's default field limit of 131,072
    (tmp_path / "src" / "wikipedia_08_gpt2").mkdir(parents=True)
    with open(tmp_path / "src" / "wikipedia_08_gpt2" / "part1.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["id", "text"], ["1", long], ["2", 'He said "hi",\nthen left.']])
    write(tmp_path / "src" / "notes.txt", "A note.\n\nAnother note.\n")
    tok = WordTokenizer.build(["word He said hi then left A note Another . , \""])
    arr = load_tokens(tmp_path / "src", tok)
    docs = " ".join(tok.vocab[i] for i in arr.tolist()).split(" <eot>")
    assert len(docs) == 5 and docs[-1] == ""
    assert docs[0] == "A note ." and docs[1].strip() == "Another note ."  # notes.txt sorts first
    assert docs[2].strip().split() == ["word"] * 40000
    assert docs[3].strip() == 'He said " hi " , then left .'


@pytest.mark.parametrize("text,msg", [
    ("title,body\nA,b\n", r"x\.csv:1: no 'text' column"),
    ("text,id\nok,1\nbad\n", r"x\.csv:3: expected 2 fields"),
])
def test_bad_text_csv_names_the_file(tmp_path, gpt2, text, msg):
    with pytest.raises(ValueError, match=msg):
        load_tokens(write(tmp_path / "x.csv", text), gpt2)


def test_prefix_of_n_tokens(tmp_path):
    docs = [f"doc{i} " + " ".join(f"w{i % 7}" for _ in range(3 + i % 5)) for i in range(200)]
    src = write(tmp_path / "c.txt", "\n\n".join(docs))
    tok = WordTokenizer.build(docs)
    full = load_tokens(src, tok).tolist()
    head = load_tokens(f"{src}@100", tok)
    assert len(head) == 100 and head.tolist() == full[:100]
    assert load_tokens(f"{src}@0.3k", tok).tolist() == full[:300]
    assert len(list(tmp_path.glob("c.txt.word*.tokens.bin"))) == 3  # full and two prefixes: own caches
    assert len(load_tokens(f"{src}@1M", tok)) == len(full)  # asked more than there is
    with pytest.raises(ValueError, match="not a token count"):
        load_tokens(f"{src}@0", tok)

# ----------------------------------------------------------------------------- probes


def test_templama_dates_kept_and_each_year_its_own_split():
    path = REAL / "templama" / "test.json"
    recs = [json.loads(line) for line in open(path)]
    probes = read_probes(path)
    assert len(probes) == len(recs)
    assert [p.date for p in probes] == [r["date"] for r in recs]
    assert {p.split for p in probes} == {f"test@{r['date']}" for r in recs}  # years never share a split
    y = read_probes(f"{path}@2015")
    assert {p.date for p in y} == {"2015"} and {p.split for p in y} == {"test"}
    assert len(y) == sum(r["date"] == "2015" for r in recs)
    rng = read_probes(f"{path}@2012..2014")
    assert {p.date for p in rng} == {"2012", "2013", "2014"}
    with pytest.raises(ValueError, match=r"test\.json: no probe has a date in '1990'"):
        read_probes(f"{path}@1990")


def test_dynamic_templama_quarters_and_ecbd_years():
    p = read_probes(REAL / "dynamic_templama" / "test.jsonl")[0]
    assert (p.date, p.split) == ("2019-Q1", "test")
    assert len(read_probes(f"{REAL / 'dynamic_templama' / 'test.jsonl'}@2019")) == 1
    e = read_probes(REAL / "ecbd2019" / "np_spans_test.json")[0]
    assert e.date == "2019"


def test_object_first_templates_rewritten_object_last(capsys):
    probes = read_probes(REAL / "templama" / "object_first_constructed.json")
    assert [p.prompt for p in probes] == ["The head coach of Chelsea F.C. is",
                                          "The head of the government of Gibraltar is",
                                          "The chair of World Health Organization is"]
    assert all(p.prompt for p in probes)
    assert capsys.readouterr().err == ""  # rewritten, not skipped


def test_object_first_without_a_rewrite_is_skipped_and_said(tmp_path, capsys):
    f = write(tmp_path / "q.jsonl", json.dumps({"query": "_X_ founded Acme.", "answer": {"name": "Bo"}}) + "\n" +
              json.dumps({"query": "Ann plays for _X_.", "answer": {"name": "Rovers"}}) + "\n")
    assert [p.prompt for p in read_probes(f)] == ["Ann plays for"]
    assert capsys.readouterr().err == "q:1: skipped, the object comes first: '_X_ founded Acme.'\n"


def test_ecbd_masked_span_without_its_definition():
    """The paper scores ECBD's masked span in its sentence; the definition (a list) is not prepended."""
    p = read_probes(REAL / "ecbd2019" / "np_spans_test.json")[0]
    assert p.prompt == "The GPT-2 model has" and p.answers == ["1.5 billion parameters"]
    assert p.split == "np_spans_test" and p.date == "2019" and p.relation == "NP-COMMON"


def test_splits_of_colliding_files_keep_apart(tmp_path, capsys):
    twiki = sorted(TWIKI.glob("*_changed.csv"))
    probes = read_probe_files(twiki)
    assert {p.split for p in probes} == {f.stem for f in twiki}  # 0801-0901_changed, ...: four splits
    assert "named after their files" in capsys.readouterr().err
    assert {p.split for p in read_probe_files(twiki[:1])} == {"changed"}  # one file: no clash, no rename
    ecbd = REAL / "ecbd2019" / "np_spans_test.json"
    other = write(tmp_path / "ecbd2020" / "np_spans_test.json", ecbd.read_text())
    assert {p.split for p in read_probe_files([ecbd, other])} == {"ecbd2019/np_spans_test", "ecbd2020/np_spans_test"}
    both = read_probe_files([f"{ecbd}:new", f"{other}:new"])  # named explicitly: merged on purpose
    assert [p.split for p in both] == ["new", "new"]
    y = read_probe_files([f"{REAL / 'templama' / 'test.json'}@2019:upd"])
    assert {p.split for p in y} == {"upd"} and {p.date for p in y} == {"2019"}

def test_realdata_tokenize_and_probes_commands(tmp_path, capsys):
    docs = [f"doc{i} " + " ".join(["w"] * (3 + i % 5)) for i in range(50)]
    src = write(tmp_path / "c.txt", "\n\n".join(docs))
    WordTokenizer.build(docs).save(tmp_path / "tokenizer.json")
    tok = ["--tokenizer", str(tmp_path / "tokenizer.json")]
    realdata.main(["tokenize", "--text", str(src), "--max-tokens", "40"] + tok)
    assert capsys.readouterr().out.startswith(f"{src}: 40 tokens (word, vocab ")
    assert len(list(tmp_path.glob("c.txt.word.n40-*.tokens.bin"))) == 1
    with pytest.raises(SystemExit) as e:
        realdata.main(["tokenize", "--text", str(src), "--max-tokens", "0"] + tok)
    assert e.value.code == 2 and "--max-tokens must be positive" in capsys.readouterr().err
    realdata.main(["probes", "--probes", str(REAL / "templama" / "test.json"), "--date", "2019..2020"])
    out = capsys.readouterr().out.split()
    assert out[0::2] == ["test@2019", "test@2020"] and all(n.isdigit() for n in out[1::2])

# ----------------------------------------------------------------------------- splits


def by_query(path):
    return {(r["relation"], r["query"]): r for r in map(json.loads, open(path))} if path.exists() else {}


def test_templama_splits_between_two_years(tmp_path, capsys):
    src = REAL / "templama" / "test.json"
    recs = [json.loads(line) for line in open(src)]
    old = {(r["relation"], r["query"]): r["answer"]["name"] for r in recs if r["date"] == "2018"}
    new = [r for r in recs if r["date"] == "2020"]
    realdata.main(["splits", "templama", "--input", str(src), "--from", "2018", "--to", "2020", "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    files = {k: by_query(tmp_path / "a" / f"{k}.jsonl") for k in
             ("updated", "new", "unchanged", "diag_updated", "diag_new", "diag_unchanged")}
    for k, got in files.items():  # an empty split is not written
        assert (f"{k}.jsonl {len(got):6d}" in out) == bool(got)
    assert sum(len(v) for v in files.values()) == len(new)
    for kind in ("updated", "new", "unchanged"):
        both = {**files[kind], **files["diag_" + kind]}
        assert not set(files[kind]) & set(files["diag_" + kind])  # diagnostic probes are disjoint
        for key, r in both.items():
            assert r["date"] == "2020"
            want = "new" if key not in old else "unchanged" if old[key] == r["answer"]["name"] else "updated"
            assert want == kind
    assert files["updated"] or files["diag_updated"]
    assert all(p.date == "2020" for p in read_probes(tmp_path / "a" / "updated.jsonl"))
    realdata.main(["splits", "templama", "--input", str(src), "--from", "2018", "--to", "2020", "--out", str(tmp_path / "b")])
    assert (tmp_path / "a" / "diag_unchanged.jsonl").read_text() == (tmp_path / "b" / "diag_unchanged.jsonl").read_text()
    with pytest.raises(SystemExit):
        realdata.main(["splits", "templama", "--input", str(src), "--from", "2018", "--to", "2031", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "error: --to 2031: " in err and "test.json: no probe has a date in '2031' (it has 2010," in err


def test_dynamic_templama_quarters_updated_new_unchanged(tmp_path):
    def rec(q, names, date):
        return json.dumps({"query": q, "answer": [{"name": n} for n in names], "date": date, "relation": "P54"})
    src = tmp_path / "dyn.jsonl"
    src.write_text("\n".join([rec("A plays for _X_.", ["X", "Y"], "2019-Q4"), rec("A plays for _X_.", ["Y", "X"], "2020-Q4"),
                              rec("B plays for _X_.", ["X"], "2019-Q4"), rec("B plays for _X_.", ["Z"], "2020-Q4"),
                              rec("C plays for _X_.", ["Z"], "2020-Q4")]) + "\n")
    counts = realdata.make_splits("templama", [src], tmp_path / "o", ("2019-Q4", "2020-Q4"), diag_frac=0)
    assert counts == {"updated.jsonl": 1, "new.jsonl": 1, "unchanged.jsonl": 1}  # an answer set, in any order
    assert not list((tmp_path / "o").glob("diag_*"))  # diag_frac 0: no diagnostic file at all
    assert read_probes(tmp_path / "o" / "updated.jsonl")[0].prompt == "B plays for"
    assert read_probes(tmp_path / "o" / "new.jsonl")[0].prompt == "C plays for"


def test_twiki_splits_per_month_pair(tmp_path):
    counts = realdata.make_splits("twiki", [TWIKI], tmp_path, diag_frac=0.1, seed=3)
    assert len(counts) == 16  # 4 pairs x (changed, unchanged) x (eval, diag)
    for f in sorted(TWIKI.glob("*.csv")):
        pair, kind = f.stem.split("_")
        rows = list(csv.reader(open(f, newline="")))[1:]
        ev = list(csv.reader(open(tmp_path / pair / f"{kind}.csv", newline="")))[1:]
        dg = list(csv.reader(open(tmp_path / pair / f"diag_{kind}.csv", newline="")))[1:]
        keys = {(r[0], r[1]) for r in rows}  # diagnostic by subject+relation
        assert sorted(ev + dg) == sorted(rows) and len({(r[0], r[1]) for r in dg}) == round(0.1 * len(keys))
    probes = read_probe_files([tmp_path / "0801-0901" / "changed.csv", tmp_path / "0901-1001" / "changed.csv",
                               tmp_path / "0801-0901" / "diag_changed.csv"])
    assert {p.split for p in probes} == {"0801-0901/changed", "0901-1001/changed", "diag_changed"}


def test_ecbd_splits_per_year_folder_diag_by_entity(tmp_path):
    root = tmp_path / "ecbd"
    rec = json.loads((REAL / "ecbd2019" / "np_spans_test.json").read_text())
    write(root / "ecbd2019" / "np_spans_test.json", json.dumps(rec) + "\n")
    lines = [dict(rec, ex_id=f"{e}_{i}", entity_span_str=e) for e in ("E1", "E2", "E3", "E4") for i in range(3)]
    write(root / "ecbd2020" / "np_spans_test.json", "".join(json.dumps(r) + "\n" for r in lines))
    counts = realdata.make_splits("ecbd", [root], tmp_path / "o", diag_frac=0.5, seed=0)
    assert counts == {"ecbd2019/new.jsonl": 1,  # one entity: none to keep apart, no empty diag_new
                      "ecbd2020/new.jsonl": 6, "ecbd2020/diag_new.jsonl": 6}
    ev, dg = (read_probes(tmp_path / "o" / "ecbd2020" / f) for f in ("new.jsonl", "diag_new.jsonl"))
    assert not {p.id.split("_")[0] for p in ev} & {p.id.split("_")[0] for p in dg}  # no entity in both
    assert {p.split for p in read_probe_files([tmp_path / "o" / y / "new.jsonl" for y in ("ecbd2019", "ecbd2020")])} \
        == {"ecbd2019/new", "ecbd2020/new"}
