"""Probe results side by side: perplexity / exact match per split, a column per run.

    python -m experiments.compare runs/full runs/tgl_fp out.json   # run folders, metrics.jsonl, probe.py --json
    python -m experiments.compare out/results.json                  # twiki.py's results: a column per stage x arm
"""
import argparse
import json
from pathlib import Path

from common import Parser, input_errors, read_json, read_text

ORDER = ("updated", "new", "unchanged", "changed")  # the paper's splits first, then the rest as read


def ordered(splits):
    splits = list(dict.fromkeys(splits))
    return sorted(splits, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), splits.index(s)))


def load_summaries(path) -> list:
    """[(column name, probe summary {split: {...}})] from a run folder or its metrics.jsonl (the last
    line with "probes"), a probe.py --json file, or twiki.py's results.json (a column per stage x arm)."""
    p = Path(path)
    name = p.name if p.name not in ("metrics.jsonl", "") else p.parent.name
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise ValueError(f"{path}: no such file (want a run folder, metrics.jsonl, probe.py --json or results.json)")
    if p.suffix == ".jsonl":
        last = None
        for n, line in enumerate(read_text(p).splitlines(), 1):
            try:
                rec = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                raise ValueError(f"{p}:{n}: not valid JSON") from None
            if rec.get("probes"):
                last = rec["probes"]
        if last is None:
            raise ValueError(f"{p}: no line with probe results")
        return [(name, last)]
    d = read_json(p)
    if isinstance(d, dict) and isinstance(d.get("rows"), list):  # twiki.py's results.json
        return [(f"{r['stage']}/{r['arm']}", r["probes"]) for r in d["rows"]]
    if not isinstance(d, dict) or "summary" not in d:
        raise ValueError(f"{p}: not a probe.py --json file (no 'summary') nor a twiki.py results.json (no 'rows')")
    return [(name, d["summary"])]


def compare_table(paths):
    columns = [c for p in paths for c in load_summaries(p)]
    names, sums = [n for n, _ in columns], [s for _, s in columns]
    w = max(12, *(len(n) for n in names))
    splits = ordered(s for d in sums for s in d)
    lines = [f"{'ppl / em':<16} " + " ".join(f"{n:>{w}}" for n in names)]
    for split in splits:
        cells = [f"{d[split]['ppl']:.2f} / {d[split]['em']:.2f}" if split in d else "-" for d in sums]
        lines.append(f"{split:<16} " + " ".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    ap = Parser(prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run folders, metrics.jsonl, probe.py --json or twiki.py results.json")
    args = ap.parse_args(argv)
    with input_errors("compare.py"):
        table = compare_table(args.paths)
    print(table)
    return table


if __name__ == "__main__":
    main()
