"""Probe results side by side: perplexity / exact match per split, a column per run.

    python -m experiments.compare runs/full runs/tgl_fp out.json   # run folders, metrics.jsonl, probe.py --json
    python -m experiments.compare out/results.json                  # twiki.py's results: a column per stage x arm

EM is shown in % (the JSON files keep it as a fraction 0..1).
"""
import argparse
import json
import math
from pathlib import Path

from common import Parser, input_errors, read_json, read_text

ORDER = ("updated", "new", "unchanged", "changed")  # the paper's splits first, then the rest as read


def ordered(splits):
    splits = list(dict.fromkeys(splits))
    return sorted(splits, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), splits.index(s)))


def check_summary(where, s) -> dict:
    """A probe summary {split: {"ppl", "em" (a fraction 0..1), "n"}} as probe.summarize writes it; else a
    ValueError naming `where` (file, file:line or file: rows[i])."""
    if s is None or s == {}:
        raise ValueError(f"{where}: no probe results (the run or scoring had no --probes)")
    if not isinstance(s, dict):
        raise ValueError(f"{where}: probe results are {type(s).__name__} {str(s)[:40]!r}, "
                         "want {split: {ppl, em, n}} (is this a probe.py / train.py output?)")
    for split, r in s.items():
        if not isinstance(r, dict):
            raise ValueError(f"{where}: split {split!r} is {type(r).__name__}, want {{ppl, em, n}}")
        for key, lo, hi in (("ppl", 0, math.inf), ("em", 0, 1)):
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or math.isnan(v):
                raise ValueError(f"{where}: split {split!r}: {key} is {v!r}, want a number in [{lo}, {hi}]")
    return s


def _jsonl(p, name) -> list:
    """The last line with "probes" of a metrics.jsonl; a torn last line (a run still writing, or killed)
    is left out, as train.py's resume leaves it out."""
    text = read_text(p)
    last, lines = None, text.splitlines()
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{p}:{n}: not valid JSON; fix or remove the line") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p}:{n}: a {type(rec).__name__}, not a metrics line (want a JSON object)")
        if rec.get("probes") is not None:
            last = check_summary(f"{p}:{n}", rec["probes"])
    if last is None:
        raise ValueError(f"{p}: no line with probe results (train.py --probes writes them)")
    return [(name, last)]


def load_summaries(path) -> list:
    """[(column name, probe summary {split: {...}})] from a run folder or its metrics.jsonl (the last
    line with "probes"), train.py's summary.json, a probe.py --json file, or twiki.py's results.json
    (a column per stage x arm)."""
    p = Path(path)
    name = p.name if p.name not in ("metrics.jsonl", "summary.json", "") else p.parent.name
    if p.is_dir():
        p = p / "metrics.jsonl"
        if not p.is_file():
            raise ValueError(f"{path}: a folder without metrics.jsonl (want a train.py run folder)")
    if not p.is_file():
        raise ValueError(f"{path}: no such file (want a run folder, metrics.jsonl, probe.py --json or results.json)")
    if p.suffix == ".jsonl":
        return _jsonl(p, name)
    d = read_json(p)
    if isinstance(d, dict) and "rows" in d:  # twiki.py's results.json
        if not isinstance(d["rows"], list) or not d["rows"]:
            raise ValueError(f"{p}: 'rows' is not a non-empty list (a twiki.py results.json?)")
        out = []
        for i, r in enumerate(d["rows"]):
            if not isinstance(r, dict) or not all(k in r for k in ("stage", "arm", "probes")):
                raise ValueError(f"{p}: rows[{i}] is not a row with stage, arm and probes")
            out.append((f"{r['stage']}/{r['arm']}", check_summary(f"{p}: rows[{i}]", r["probes"])))
        return out
    for key in ("summary", "probes"):  # probe.py --json; train.py's summary.json
        if isinstance(d, dict) and key in d:
            return [(name, check_summary(f"{p}: {key!r}", d[key]))]
    raise ValueError(f"{p}: a {type(d).__name__} without 'summary', 'probes' or 'rows': not a probe.py "
                     "--json, train.py summary.json nor twiki.py results.json")


def compare_table(paths):
    """ppl / EM per split and column; EM printed in % (the files keep it as a fraction)."""
    columns = [c for p in paths for c in load_summaries(p)]
    names, sums = [n for n, _ in columns], [s for _, s in columns]
    w = max(14, *(len(n) for n in names))
    splits = ordered(s for d in sums for s in d)
    lines = [f"{'ppl / EM %':<16} " + " ".join(f"{n:>{w}}" for n in names)]
    for split in splits:
        cells = [f"{d[split]['ppl']:.2f} / {100 * d[split]['em']:.1f}" if split in d else "-" for d in sums]
        lines.append(f"{split:<16} " + " ".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    ap = Parser(prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+",
                    help="run folders, metrics.jsonl, summary.json, probe.py --json or twiki.py results.json")
    args, extra = ap.parse_known_args(argv)
    if extra:  # probe.py --compare took --init / --probes and ignored them: refuse, never ignore
        ap.error(f"unrecognized arguments: {' '.join(extra)} (compare.py only reads result files; "
                 "to score a model first: python probe.py --init MODEL --probes FILE --json OUT.json)")
    with input_errors("compare.py"):
        table = compare_table(args.paths)
    print(table)
    return table


if __name__ == "__main__":
    main()
