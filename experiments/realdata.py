"""The paper's real data around the method: download the public data sets, write the probe splits
(updated / new / unchanged facts, each with a disjoint diagnostic file for tracing), and check what
data.py makes of a text or probe file.

    python -m experiments.realdata fetch twiki-probes                   # TemporalWiki probes (620 kB zip)
    python -m experiments.realdata fetch twiki-diffsets                 # TemporalWiki diff sets (932 MB zip)
    python -m experiments.realdata fetch twiki-snapshot --max-mb 500    # first 500 MB of a snapshot: prefix-500MB/
    python -m experiments.realdata fetch templama                       # TempLAMA train/val/test.json
    python -m experiments.realdata fetch dynamic-templama               # Dynamic TempLAMA train/val/test.jsonl
    python -m experiments.realdata fetch ecbd --folder ~/Downloads/ecbd # browser-only: register the unpacked folder
    python -m experiments.realdata splits twiki --input ~/.cache/tgl/data/twiki-probes --out probes/twiki
    python -m experiments.realdata splits templama --input D/templama --from 2019 --to 2020 --out probes/templama
    python -m experiments.realdata splits ecbd --input D/ecbd --out probes/ecbd
    python -m experiments.realdata probes --probes probes/twiki/*/changed.csv   # counts per split
    python -m experiments.realdata tokenize --text D/twiki-snapshot/prefix-500MB/wikipedia_08_gpt2_prefix.csv \\
        --max-tokens 20000000
"""
import argparse
import csv
import io
import json
import random
import sys
from collections import Counter
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import data
from experiments import probe_files
from common import Parser, check_output, input_errors, number, write_text
from experiments import fetch
from experiments.tools import folder_lock

PROG = "realdata.py"

# ----------------------------------------------------------------------------- reading the inputs
# Every input file goes through data.py's checks (one line naming file:line) and, on top, the types a split
# relies on: a list or object where a string belongs is refused, not str()-ed into a prompt or a key.


STRING_KEYS = ("query", "masked_sentence")  # the prompt's text: a string, nothing else
NAME_KEYS = ("id", "ex_id", "relation", "span_type", "date", "year", "split", "entity_span_str")  # or numbers
CHECKED = frozenset(STRING_KEYS + NAME_KEYS)


def _check_types(rec):
    for k in CHECKED.intersection(rec):
        v = rec[k]
        if not isinstance(v, str):
            number = isinstance(v, int) and not isinstance(v, bool)  # a year as 2019
            if k in STRING_KEYS or not (v is None or number):
                raise ValueError(f"{k!r} is {json.dumps(v)[:60]}, want a string")


def _checked(path):
    """(line, record, the Probe data.py reads from it or None where it skips it) of a probe file; a record
    it cannot read is one line naming file:line, at split time rather than when the derived file is read."""
    for n, rec in probe_files.probe_records(path):  # a byte-order mark is stripped there too
        try:
            _check_types(rec)
            probe = probe_files.READERS[Path(path).suffix.lower()](rec, f"{Path(path).stem}:{n}")
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}; splits copies no malformed record: fix or delete it") \
                from None
        yield n, rec, probe


def _on(date, t):
    """`date` lies in `t` by probe_files.filter_dates' rule, the one FILE@DATES uses: 2019-Q1 is on 2019."""
    try:
        return bool(probe_files.filter_dates([SimpleNamespace(date=date)], t, ""))
    except ValueError:
        return False


def _check_dates(t0, t1):
    if not (t0 and t1):
        raise ValueError("templama splits need --from and --to dates (e.g. 2019 2020, or 2019-Q4 2020-Q4)")
    for flag, t in (("--from", t0), ("--to", t1)):
        if ".." in t or "," in t:
            raise ValueError(f"{flag} {t}: give one date (2019 or 2019-Q4), not a range or a list")
    if _on(t0, t1) or _on(t1, t0):
        raise ValueError(f"--from {t0} and --to {t1} overlap: --to must be a later date than --from")
    if t0 > t1:
        raise ValueError(f"--from {t0} comes after --to {t1}: swap them (the probes are --to's facts)")


# ----------------------------------------------------------------------------- probe splits
# The method's probe files: updated / new / unchanged facts between two dates, each with a disjoint
# seeded diagnostic file (diag_*) for tracing. Outputs keep the input formats, so probe_files.read_probes reads them.
# A split is {key: [records]}: the key is what evaluation and diagnostic files never share (a TempLAMA query,
# a TemporalWiki subject+relation, an ECBD entity), so duplicate or multi-valued rows stay on one side.


def _facts(recs):
    """{key: (answer names, record to write, first record read)}: each (relation, query) at its latest date
    among recs (a 2019 window may hold 2019 and 2019-Q1..Q4). Records of one query and date are one fact,
    their answers merged (a multi-valued fact). -> facts, number of repeated records"""
    by_key, facts, dups = {}, {}, 0
    for r in recs:
        by_key.setdefault(r.key, []).append(r)
    for key, rs in by_key.items():
        last = max(r.date for r in rs)
        rs = [r for r in rs if r.date == last]
        dups += len(rs) - 1
        merged, names = [], []
        for r in rs:
            answers = r.rec["answer"] if isinstance(r.rec["answer"], list) else [r.rec["answer"]]
            for a, name in zip(answers, r.names):
                if name not in names:
                    merged.append(a)
                    names.append(name)
        rec = rs[0].rec if len(names) == len(rs[0].names) else dict(rs[0].rec, answer=merged)
        facts[key] = (set(names), rec, rs[0])
    return facts, dups


def _templama_records(files, t0, t1):
    """The checked records on t0 or t1 (only those are kept: Dynamic TempLAMA has 14 quarters). -> records,
    number read, {date: 0 (on t0), 1 (on t1) or None} over the dates read"""
    out, n_read, seen = [], 0, {}
    for path in files:
        for n, rec in probe_files.probe_records(path):  # a byte-order mark is stripped there too
            if rec.get("query") is None or rec.get("date") in (None, ""):
                raise ValueError(f"{path}:{n}: expected a (Dynamic) TempLAMA record with 'query' and 'date'")
            try:
                _check_types(rec)
                n_read, date = n_read + 1, str(rec["date"])
                if date not in seen:  # probe_files.filter_dates' rule, once per distinct date
                    seen[date] = 0 if _on(date, t0) else 1 if _on(date, t1) else None
                if seen[date] is not None:
                    key = (str(rec.get("relation") or ""), rec["query"])
                    out.append(SimpleNamespace(date=date, key=key, rec=rec, path=path, n=n,
                                               names=probe_files.answer_names(rec.get("answer"))))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}; fix or delete that record") from None
    return out, n_read, seen


def _check_window(dates, flag, t, files):
    """Some date read is on t (probe_files.filter_dates' check, its message listing the dates there are)."""
    try:
        probe_files.filter_dates([SimpleNamespace(date=d) for d in sorted(dates)], t, ", ".join(map(str, files)))
    except ValueError as e:
        raise ValueError(f"{flag} {t}: {e}") from None


def _templama_groups(inputs, t0, t1):
    _check_dates(t0, t1)
    files = [f for i in map(Path, inputs)
             for f in (sorted(g for g in i.iterdir() if g.suffix in (".json", ".jsonl")) if i.is_dir() else [i])]
    if not files:
        raise ValueError(f"--input {' '.join(map(str, inputs))}: no .json or .jsonl file")
    recs, n_read, seen = _templama_records(files, t0, t1)
    if not n_read:
        raise ValueError(f"{', '.join(map(str, files))}: no records")
    _check_window(seen, "--from", t0, files)
    _check_window(seen, "--to", t1, files)
    (f0, d0), (f1, d1) = (_facts([r for r in recs if seen[r.date] == i]) for i in (0, 1))
    kinds, skipped = {"updated": {}, "new": {}, "unchanged": {}}, 0
    for key, (names, rec, r) in f1.items():
        try:
            probe = probe_files.READERS[r.path.suffix.lower()](rec, f"{r.path.stem}:{r.n}")
        except ValueError as e:
            raise ValueError(f"{r.path}:{r.n}: {e}; fix or delete that record") from None
        if probe is None:  # data.py skips it (an object-first template), so no split gets it
            skipped += 1
            continue
        kind = "new" if key not in f0 else "unchanged" if f0[key][0] == names else "updated"
        kinds[kind][key] = [rec]
    print(f"templama: {n_read} records in {len(files)} file(s); --from {t0}: {len(f0)} facts, --to {t1}: "
          f"{len(f1)} facts; {n_read - len(recs)} records of other dates")
    print(f"templama: kept {len(f1) - skipped} (" + ", ".join(f"{k} {len(v)}" for k, v in kinds.items())
          + f"); deleted {sum(k not in f1 for k in f0)} (facts of {t0} with no record at {t1}: not probed); "
          f"duplicate keys {d0 + d1} (repeated query and date: counted once, answers merged)"
          + (f"; skipped {skipped} that data.py cannot read as probes" if skipped else ""))
    why = {"updated": f"no fact of {t1} has another answer at {t0}: choose dates further apart",
           "new": f"every fact of {t1} is there at {t0}: choose dates further apart",
           "unchanged": f"no fact of {t1} has the same answer at {t0}: choose dates closer together"}
    for kind, groups in kinds.items():
        yield kind, groups, f"{why[kind]}, or give more input files"


def twiki_pairs(folders):
    """TemporalWiki probe CSVs by month pair: {'0801-0901': {'changed': path, 'unchanged': path}}."""
    pairs = {}
    for folder in folders:
        if not Path(folder).is_dir():
            raise ValueError(f"--input {folder}: not a folder (twiki takes folders of MMNN-MMNN_*.csv)")
        for f in sorted(Path(folder).rglob("*.csv")):
            m = probe_files.TWIKI_PAIR.fullmatch(f.stem.lower())
            if m:
                if m.group(2) in pairs.get(m.group(1), {}):
                    raise ValueError(f"{f}: a second {m.group(0)}.csv (first: {pairs[m.group(1)][m.group(2)]})")
                pairs.setdefault(m.group(1), {})[m.group(2)] = f
    if not pairs:
        raise ValueError(f"{', '.join(map(str, folders))}: no TemporalWiki MMNN-MMNN_changed.csv / _unchanged.csv")
    return pairs


def _twiki_groups(inputs):
    """Malformed rows are refused (file:line), not skipped: TemporalWiki's own files have none, so one means a
    damaged or foreign file, and dropping rows would make the probe sets differ from TemporalWiki's unseen."""
    for pair, files in sorted(twiki_pairs(inputs).items()):
        for kind, f in sorted(files.items()):
            groups, seen, rows = {}, set(), 0
            for _, row, _ in _checked(f):
                fact = tuple(row[k].strip() for k in probe_files.TWIKI_COLUMNS)
                rows += 1
                if fact not in seen:  # a repeated row is one probe, counted once
                    seen.add(fact)
                    groups.setdefault(fact[:2], []).append(row)
            print(f"twiki: {f}: {rows} rows, {rows - len(seen)} duplicate rows counted once, "
                  f"{len(groups)} subject+relation keys")
            yield f"{pair}/{kind}", groups, f"{f} holds no rows: fetch twiki-probes again"


def _ecbd_groups(inputs, ecbd_file):
    years = sorted(f for i in inputs for f in Path(i).glob(f"*/{ecbd_file}"))
    if not years:
        raise ValueError(f"{', '.join(map(str, inputs))}: no YEAR/{ecbd_file} (ECBD's layout: one folder per year)")
    for f in years:
        groups, seen, records = {}, set(), 0
        for n, rec, probe in _checked(f):
            same, records = json.dumps(rec, sort_keys=True), records + 1
            if probe is None or same in seen:  # a repeated record is one probe, counted once
                continue
            seen.add(same)
            entity = rec.get("entity_span_str")  # diagnostic by entity; a record without one is its own
            groups.setdefault(str(entity) if entity not in (None, "") else f"\0{n}", []).append(rec)
        print(f"ecbd: {f}: {records} records, {records - len(seen)} duplicates counted once, "
              f"{len(groups)} entities")
        yield f"{f.parent.name}/new", groups, f"{f} holds no records"


def _assign(splits, diag_frac, seed):
    """[(name, {key: records}, why empty)] -> [(name, eval records, diag records, keys, why empty)]. A seeded
    diag_frac of each split's keys is diagnostic: at least one where there are two keys, never all of them.
    A key in two splits of one family (a month pair's changed and unchanged) is on the same side in both."""
    side, out = {}, []
    for name, groups, why in splits:
        family, keys = PurePosixPath(name).parent, sorted(groups)
        n = len(keys)
        want = 0 if diag_frac == 0 or n < 2 else min(n - 1, max(1, round(diag_frac * n)))
        want -= sum(side[family, k] for k in keys if (family, k) in side)
        free = [k for k in keys if (family, k) not in side]
        random.Random(f"{seed}:{name.replace('/', '_')}").shuffle(free)
        for i, k in enumerate(free):
            side[family, k] = i < want
        pick = lambda diag: [r for k in keys if side[family, k] == diag for r in groups[k]]
        out.append((name, pick(False), pick(True), n, why))
    return out


def _write(path, recs):
    """JSON lines, or a TemporalWiki CSV (rows of subject,relation,object): the format read_probes reads."""
    if path.suffix == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, probe_files.TWIKI_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(recs)
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def _check_inputs(inputs, out, diag_frac):
    if not (isinstance(diag_frac, (int, float)) and 0 <= diag_frac < 1):
        raise ValueError(f"--diag-frac must be in [0, 1), got {diag_frac}")
    check_output(str(out), "--out", "dir")
    seen = {}
    for i in map(Path, inputs):
        if not i.exists():
            raise ValueError(f"--input {i}: no such file or folder")
        if i.resolve() in seen:
            raise ValueError(f"--input {i}: given twice (also as {seen[i.resolve()]}): "
                             "its probes would count twice")
        seen[i.resolve()] = i


def make_splits(kind, inputs, out, dates=(None, None), diag_frac=0.25, seed=0, ecbd_file="np_spans_test.json"):
    """Write the probe files of `kind` (templama: its `dates` (t0, t1); twiki; ecbd) under out: each split's
    evaluation file and its diag_* file, disjoint by key. No empty file is written (probe_files.read_probes refuses
    one): a line on stderr says which and why; diag_frac=0 writes no diag_* file. -> {relative path: count}
    of the files written."""
    t0, t1 = (None if t is None else str(t) for t in dates)
    groups = {"templama": lambda: _templama_groups(inputs, t0, t1), "twiki": lambda: _twiki_groups(inputs),
              "ecbd": lambda: _ecbd_groups(inputs, ecbd_file)}
    if kind not in groups:
        raise ValueError(f"unknown splits kind {kind!r} (templama, twiki or ecbd)")
    _check_inputs(inputs, out, diag_frac)
    ext, files, notes = ".csv" if kind == "twiki" else ".jsonl", {}, []
    for name, evaluate, trace, n, why in _assign(list(groups[kind]()), diag_frac, seed):
        diag = str(PurePosixPath(name).with_name("diag_" + PurePosixPath(name).name))
        files[f"{name}{ext}"], files[f"{diag}{ext}"] = evaluate, trace
        if not evaluate:
            why = why if n == 0 else "each of its keys is diagnostic in another split: lower --diag-frac"
            notes.append(f"{name}{ext} not written: the split came out empty ({why})")
        elif not trace and diag_frac > 0:
            notes.append(f"{diag}{ext} not written: {name} has {n} key, too few to keep any apart")
    written = {f: recs for f, recs in files.items() if recs}
    if not any(not PurePosixPath(f).name.startswith("diag_") for f in written):
        raise ValueError(f"--input {' '.join(map(str, inputs))}: every split came out empty; "
                         + "; ".join(notes))
    for f in sorted(files.keys() - written.keys()):
        if (Path(out) / f).exists():  # else taken for this run's: stale probes, a diag_* that overlaps
            raise ValueError(f"{Path(out) / f}: left by an earlier run, and this run writes no such file; "
                             "delete it or choose another --out")
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    for f, recs in written.items():
        _write(Path(out) / f, recs)
    return {f: len(recs) for f, recs in written.items()}

# ----------------------------------------------------------------------------- CLI


def add_fetch_arguments(p):
    from common import POS, number  # finite and positive: inf and nan are one line naming the flag
    p.add_argument("name", choices=list(fetch.DATASETS) + ["ecbd"], help="data set to download")
    p.add_argument("--out", help="folder to write (default: $TGL_CACHE/data/NAME, TGL_CACHE default ~/.cache/tgl; "
                   "twiki-snapshot --max-mb N: NAME/prefix-NMB, where twiki.py reads it)")
    p.add_argument("--max-mb", type=number("(0, inf)"),
                   help="twiki-snapshot: only the first N MB of text of one month")
    p.add_argument("--max-docs", type=POS, help="twiki-snapshot: only the first N documents of one month")
    p.add_argument("--month", help="twiki-snapshot with a limit: the snapshot month, e.g. 08 (default: the first)")
    p.add_argument("--folder", help="ecbd: the unpacked folder you downloaded in a browser")


def snapshot_dir(max_mb=None) -> Path:
    """Where `fetch twiki-snapshot --max-mb N` writes by default, and where twiki.py reads its old text: one
    path for both, a folder per size (another --max-mb never passes for this one). Without --max-mb
    (--max-docs, or the whole snapshot) the data set's own folder."""
    base = fetch.cache_root() / "twiki-snapshot"
    return base / f"prefix-{max_mb:g}MB" if max_mb else base


def run_fetch(args):
    if args.name == "ecbd":
        if not args.folder:
            print(fetch.ECBD_HELP, file=sys.stderr)
            raise SystemExit(1)  # nothing fetched: a script must not go on as if it had been
        return fetch.register_ecbd(args.folder, args.out)
    try:
        out = args.out or (snapshot_dir(args.max_mb) if args.name == "twiki-snapshot" else None)
        return fetch.fetch(args.name, out, args.max_mb, args.max_docs, args.month)
    except FileNotFoundError as e:
        if str(e).startswith("http"):  # download's 404
            raise OSError(f"{e}: not found (404) on the server") from None
        raise
    except OSError as e:
        if str(e).startswith("cannot reach"):
            raise OSError(f"{e}; or run `python -m experiments.realdata fetch {args.name}` where there is "
                          f"internet and copy {fetch.cache_root() / args.name} here") from None
        raise


def run_splits(args):
    with folder_lock(args.out):
        counts = make_splits(args.kind, args.input, args.out, (args.t0, args.t1), args.diag_frac, args.seed, args.ecbd_file)
    for name, n in counts.items():
        print(f"{name:>32} {n:6d}")
    print(f"probe files in {args.out}")


def run_probes(args):
    probes = probe_files.read_probe_files(args.probes)
    if args.date:
        probes = probe_files.filter_dates(probes, args.date, " ".join(args.probes))
    for s, n in sorted(Counter(p.split for p in probes).items()):
        print(f"{s:>16} {n:6d}")


def text_files(text):
    """The files data.load_tokens takes from `text` (a folder: every .txt/.csv under it, as train.py --data
    reads it). A folder holding TemporalWiki's *_subset.csv (not the diff set wikipedia_MMNN_gpt2.csv that the
    protocol trains on) is refused by data._source_files, the one rule for every reader of a folder."""
    try:
        return data._source_files(text)  # data.py's own list, so the count is the one training sees
    except ValueError as e:
        raise ValueError(f"--text {e}") from None


def run_tokenize(args):
    tok = data.load_tokenizer(args.tokenizer)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError("--max-tokens must be positive")
    path, n = data.parse_text_spec(args.text)  # TEXT@N is --max-tokens N; a bad @N is named here
    if n and args.max_tokens:
        raise ValueError(f"--text {args.text} and --max-tokens {args.max_tokens}: give the count once")
    n = args.max_tokens or n
    files = text_files(path)
    if Path(path).is_dir():  # name what a folder gave, so nothing is taken unseen
        names = [str(f.relative_to(path)) for f in files]
        print(f"{path}: {len(files)} file(s): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    count = len(data.load_tokens(path if n is None else f"{path}@{n}", tok))
    print(f"{args.text}: {count:,} tokens ({tok.name}, vocab {tok.n_vocab})")


def parse_args(argv=None):
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_fetch_arguments(sub.add_parser("fetch", help="download a public data set into $TGL_CACHE/data"))
    s = sub.add_parser("splits", help="write updated/new/unchanged (+ diag_*) probe files from real data")
    s.add_argument("kind", choices=("templama", "twiki", "ecbd"), help="templama covers Dynamic TempLAMA too")
    s.add_argument("--input", nargs="+", required=True,
                   help="templama: .json/.jsonl files or folders; twiki: folders of MMNN-MMNN_*.csv; ecbd: the root")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--from", dest="t0",
                   help="templama: the first date (2019 or 2019-Q4; 2019 takes its quarters, as FILE@2019)")
    s.add_argument("--to", dest="t1", help="templama: a date after --from; the probes are its facts")
    s.add_argument("--diag-frac", type=number("[0, 1)"), default=0.25,
                   help="fraction of each split's keys kept apart for tracing (0: no diag_* file)")
    s.add_argument("--seed", type=int, default=0, help="seed of the diagnostic sample")
    s.add_argument("--ecbd-file", default="np_spans_test.json", help="ecbd: the file taken from each year folder")
    p = sub.add_parser("probes", help="read probe files and print counts per split")
    p.add_argument("--probes", nargs="+", required=True,
                   help="probe files (.jsonl, .json, .csv); FILE@DATES:SPLIT selects dates and names the split")
    p.add_argument("--date", help="keep only probes of these dates: 2019, 2019-Q1, 2018,2020 or 2019..2020")
    t = sub.add_parser("tokenize", help="tokenize (and cache) a text file or folder, print the count",
                       description="Tokenize a text file or folder into the token cache that train.py "
                       "--data uses, and print the count. A folder is taken whole (every .txt and .csv "
                       "under it; the files are listed); one holding TemporalWiki's *_subset.csv is "
                       "refused, as train.py --data refuses it.")
    t.add_argument("--text", required=True, help="a .txt file, a TemporalWiki .csv (text column), or a folder of them")
    t.add_argument("--tokenizer", default="gpt2", help="'gpt2', a tokenizer.json, or a folder holding one")
    t.add_argument("--max-tokens", type=int, help="only the first N tokens (as the path TEXT@N)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with input_errors(PROG):
        {"fetch": run_fetch, "splits": run_splits, "probes": run_probes, "tokenize": run_tokenize}[args.cmd](args)


if __name__ == "__main__":
    main()
