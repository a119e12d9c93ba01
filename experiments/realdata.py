"""The paper's real data around the method: download the public data sets, write the probe splits
(updated / new / unchanged facts, each with a disjoint diagnostic file for tracing), and check what
data.py makes of a text or probe file.

    python -m experiments.realdata fetch twiki-probes                   # TemporalWiki probes (620 kB zip)
    python -m experiments.realdata fetch twiki-diffsets                 # TemporalWiki diff sets (932 MB zip)
    python -m experiments.realdata fetch twiki-snapshot --max-mb 500    # the first 500 MB of text of one snapshot
    python -m experiments.realdata fetch templama                       # TempLAMA train/val/test.json
    python -m experiments.realdata fetch dynamic-templama               # Dynamic TempLAMA train/val/test.jsonl
    python -m experiments.realdata fetch ecbd --folder ~/Downloads/ecbd # browser-only: register the unpacked folder
    python -m experiments.realdata splits twiki --input ~/.cache/tgl/data/twiki-probes --out probes/twiki
    python -m experiments.realdata splits templama --input D/templama --from 2019 --to 2020 --out probes/templama
    python -m experiments.realdata splits ecbd --input D/ecbd --out probes/ecbd
    python -m experiments.realdata probes --probes probes/twiki/*/changed.csv   # counts per split
    python -m experiments.realdata tokenize --text D/twiki-snapshot/wikipedia_08_gpt2_prefix.csv --max-tokens 20000000
"""
import argparse
import csv
import io
import json
import random
import sys
from collections import Counter
from pathlib import Path, PurePosixPath

import data
from common import Parser, input_errors, write_text
from experiments import fetch

PROG = "realdata.py"

# ----------------------------------------------------------------------------- probe splits
# The method's probe files: updated / new / unchanged facts between two dates, each with a disjoint
# seeded diagnostic file (diag_*) for tracing. Outputs keep the input formats, so data.read_probes reads them.


def temporal_splits(files, t0, t1):
    """(Dynamic) TempLAMA records at date t1, by how their answer set differs from t0's:
    {'updated': ..., 'new': ..., 'unchanged': ...}, each {(relation, query): [record]}."""
    if t0 >= t1:
        raise ValueError(f"--from {t0} must come before --to {t1}")
    at, dates = {t0: {}, t1: {}}, set()
    for path in files:
        for n, rec in data.probe_records(path):
            if "query" not in rec or "date" not in rec:
                raise ValueError(f"{path}:{n}: expected a (Dynamic) TempLAMA record with 'query' and 'date'")
            date = str(rec["date"])
            dates.add(date)
            if date in at:
                try:
                    names = set(data.answer_names(rec.get("answer")))
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
                at[date][(str(rec.get("relation", "")), rec["query"])] = (rec, names)
    for t in (t0, t1):
        if not at[t]:
            raise ValueError(f"{', '.join(map(str, files))}: no record has date {t} "
                             f"(dates: {', '.join(sorted(dates)[:8])}{' ...' if len(dates) > 8 else ''})")
    kinds = {"updated": {}, "new": {}, "unchanged": {}}
    for key, (rec, names) in at[t1].items():
        kind = "new" if key not in at[t0] else "unchanged" if at[t0][key][1] == names else "updated"
        kinds[kind][key] = [rec]
    return kinds


def twiki_pairs(folders):
    """TemporalWiki probe CSVs by month pair: {'0801-0901': {'changed': path, 'unchanged': path}}."""
    pairs = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*.csv")):
            m = data.TWIKI_PAIR.fullmatch(f.stem.lower())
            if m:
                if m.group(2) in pairs.get(m.group(1), {}):
                    raise ValueError(f"{f}: a second {m.group(0)}.csv (first: {pairs[m.group(1)][m.group(2)]})")
                pairs.setdefault(m.group(1), {})[m.group(2)] = f
    if not pairs:
        raise ValueError(f"{', '.join(map(str, folders))}: no TemporalWiki MMNN-MMNN_changed.csv / _unchanged.csv")
    return pairs


def _templama_groups(inputs, t0, t1):
    if not (t0 and t1):
        raise ValueError("templama splits need --from and --to dates (e.g. 2019 2020, or 2019-Q4 2020-Q4)")
    files = [f for i in map(Path, inputs)
             for f in (sorted(g for g in i.iterdir() if g.suffix in (".json", ".jsonl")) if i.is_dir() else [i])]
    yield from temporal_splits(files, str(t0), str(t1)).items()


def _twiki_groups(inputs):
    for pair, files in sorted(twiki_pairs(inputs).items()):
        for kind, f in sorted(files.items()):
            yield f"{pair}/{kind}", {i: [row] for i, (_, row) in enumerate(data.probe_records(f))}


def _ecbd_groups(inputs, ecbd_file):
    years = sorted(f for i in inputs for f in Path(i).glob(f"*/{ecbd_file}"))
    if not years:
        raise ValueError(f"{', '.join(map(str, inputs))}: no YEAR/{ecbd_file} (ECBD's layout: one folder per year)")
    for f in years:
        data.read_probes(f)  # every record checked, an error naming its file:line
        groups = {}
        for n, rec in data.probe_records(f):
            groups.setdefault(str(rec.get("entity_span_str", n)), []).append(rec)  # diagnostic by entity
        yield f"{f.parent.name}/new", groups


def _diag_split(groups, label, diag_frac, seed):
    """groups: {key: [records]} -> (eval records, diagnostic records), disjoint by key, seeded."""
    keys = sorted(groups)
    random.Random(f"{seed}:{label}").shuffle(keys)
    n_diag = round(diag_frac * len(keys))
    return ([r for k in sorted(keys[n_diag:]) for r in groups[k]], [r for k in sorted(keys[:n_diag]) for r in groups[k]])


def _write(path, recs):
    """JSON lines, or a TemporalWiki CSV (rows of subject,relation,object): the format read_probes reads."""
    if path.suffix == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, data.TWIKI_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(recs)
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def make_splits(kind, inputs, out, dates=(None, None), diag_frac=0.25, seed=0, ecbd_file="np_spans_test.json"):
    """Write the probe files of `kind` (templama: its `dates` (t0, t1); twiki; ecbd) under out, each split
    with its diag_* file. Returns {relative path: count}."""
    groups = {"templama": lambda: _templama_groups(inputs, *dates), "twiki": lambda: _twiki_groups(inputs),
              "ecbd": lambda: _ecbd_groups(inputs, ecbd_file)}
    if kind not in groups:
        raise ValueError(f"unknown splits kind {kind!r} (templama, twiki or ecbd)")
    ext, counts = ".csv" if kind == "twiki" else ".jsonl", {}
    for name, split in groups[kind]():  # name: 'updated', '0801-0901/changed', 'ecbd2019/new'
        diag = PurePosixPath(name).with_name("diag_" + PurePosixPath(name).name)
        evaluate, trace = _diag_split(split, name.replace("/", "_"), diag_frac, seed)
        for fname, recs in ((f"{name}{ext}", evaluate), (f"{diag}{ext}", trace)):
            _write(Path(out) / fname, recs)
            counts[fname] = len(recs)
    return counts

# ----------------------------------------------------------------------------- CLI


def add_fetch_arguments(p):
    from common import POS, number  # finite and positive: inf and nan are one line naming the flag
    p.add_argument("name", choices=list(fetch.DATASETS) + ["ecbd"], help="data set to download")
    p.add_argument("--out", help="folder to write (default: $TGL_CACHE/data/NAME, TGL_CACHE default ~/.cache/tgl)")
    p.add_argument("--max-mb", type=number("(0, inf)"),
                   help="twiki-snapshot: only the first N MB of text of one month")
    p.add_argument("--max-docs", type=POS, help="twiki-snapshot: only the first N documents of one month")
    p.add_argument("--month", help="twiki-snapshot with a limit: the snapshot month, e.g. 08 (default: the first)")
    p.add_argument("--folder", help="ecbd: the unpacked folder you downloaded in a browser")


def run_fetch(args):
    if args.name == "ecbd":
        if not args.folder:
            print(fetch.ECBD_HELP, file=sys.stderr)
            raise SystemExit(1)  # nothing fetched: a script must not go on as if it had been
        return fetch.register_ecbd(args.folder, args.out)
    try:
        return fetch.fetch(args.name, args.out, args.max_mb, args.max_docs, args.month)
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
    if not 0 <= args.diag_frac < 1:
        raise ValueError("--diag-frac must be in [0, 1)")
    counts = make_splits(args.kind, args.input, args.out, (args.t0, args.t1), args.diag_frac, args.seed, args.ecbd_file)
    for name, n in counts.items():
        print(f"{name:>32} {n:6d}")
    print(f"probe files in {args.out}")


def run_probes(args):
    probes = data.read_probe_files(args.probes)
    if args.date:
        probes = data.filter_dates(probes, args.date, " ".join(args.probes))
    for s, n in sorted(Counter(p.split for p in probes).items()):
        print(f"{s:>16} {n:6d}")


def run_tokenize(args):
    tok = data.load_tokenizer(args.tokenizer)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError("--max-tokens must be positive")
    n = len(data.load_tokens(args.text if args.max_tokens is None else f"{args.text}@{args.max_tokens}", tok))
    print(f"{args.text}: {n:,} tokens ({tok.name}, vocab {tok.n_vocab})")


def parse_args(argv=None):
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_fetch_arguments(sub.add_parser("fetch", help="download a public data set into $TGL_CACHE/data"))
    s = sub.add_parser("splits", help="write updated/new/unchanged (+ diag_*) probe files from real data")
    s.add_argument("kind", choices=("templama", "twiki", "ecbd"), help="templama covers Dynamic TempLAMA too")
    s.add_argument("--input", nargs="+", required=True,
                   help="templama: .json/.jsonl files or folders; twiki: folders of MMNN-MMNN_*.csv; ecbd: the root")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--from", dest="t0", help="templama: the first date (e.g. 2019, or 2019-Q4)")
    s.add_argument("--to", dest="t1", help="templama: the second date; probes are its records")
    s.add_argument("--diag-frac", type=float, default=0.25, help="fraction of each split kept apart for tracing")
    s.add_argument("--seed", type=int, default=0, help="seed of the diagnostic sample")
    s.add_argument("--ecbd-file", default="np_spans_test.json", help="ecbd: the file taken from each year folder")
    p = sub.add_parser("probes", help="read probe files and print counts per split")
    p.add_argument("--probes", nargs="+", required=True,
                   help="probe files (.jsonl, .json, .csv); FILE@DATES:SPLIT selects dates and names the split")
    p.add_argument("--date", help="keep only probes of these dates: 2019, 2019-Q1, 2018,2020 or 2019..2020")
    t = sub.add_parser("tokenize", help="tokenize (and cache) a text file or folder, print the count")
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
