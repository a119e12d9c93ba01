"""Probe files: the knowledge probes of TempLAMA and Dynamic TempLAMA (JSON lines, `query` with an `_X_`
slot), ECBD (`masked_sentence` with `<extra_id_0>`), TemporalWiki (CSV: subject, relation, object) and
tgl's own worlds, read as `Probe`s: a prompt, its answers, a split, a relation and a date. Each data set's
quirks live here, not in the method (probe.py scores Probes, trace.py traces them); their downloads and
splits: experiments/realdata.py.
"""
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data import _csv_records, _lines, parse_text_spec

@dataclass
class Probe:
    id: str
    prompt: str
    answers: list
    split: str
    relation: str = ""
    date: str = ""  # as in the data: '2019', '2019-Q1', '0801-0901' (months)
    source: str = field(default="", compare=False)

# JSON lines: text key -> (answer slot, keys of answer, id, relation, date)
JSON_FORMATS = {"query": ("_X_", "answer", "id", "relation", "date"),  # TempLAMA, Dynamic TempLAMA
                "masked_sentence": ("<extra_id_0>", "answer_str", "ex_id", "span_type", "year")}  # ECBD
# TempLAMA's P286, P6, P488 put the object first ('_X_ is the head coach of Chelsea F.C..'); a causal LM
# needs its subject first: object last, as Dynamic TempLAMA's `_improved` templates.
OBJECT_FIRST = re.compile(r"_X_ is (the .+?)\.?")
TWIKI_PAIR = re.compile(r"(\d{4}-\d{4})_(changed|unchanged)")  # TemporalWiki: 0801-0901_changed.csv
TWIKI_COLUMNS = ("subject", "relation", "object")

def answer_names(ans, key="answer"):
    names = [a.get("name") if isinstance(a, dict) else a for a in (ans if isinstance(ans, list) else [ans])]
    names = [re.sub(r"<extra_id_\d+>", "", n).strip() if isinstance(n, str) else "" for n in names]
    if not names or not all(names):
        raise ValueError(f"empty or malformed {key} {ans!r}")
    return names

# READERS: (record, default id) -> a Probe, or None to skip it.

def _json(rec, rid):
    key = next((k for k in JSON_FORMATS if k in rec), None)
    if key is None:
        raise ValueError("unknown probe format (need 'query' or 'masked_sentence')")
    slot, answer, id_key, relation, date = JSON_FORMATS[key]
    bad = [k for k in (key, id_key, relation, date, "split") if isinstance(rec.get(k), (list, dict))]
    if bad:
        raise ValueError(f"'{bad[0]}' is a {type(rec[bad[0]]).__name__}, want a string")
    text = str(rec[key])
    if slot not in text:
        raise ValueError(f"{key} has no {slot} slot: {text!r}")
    prompt = text.split(slot)[0].rstrip()
    if slot == "_X_" and not prompt:
        m = OBJECT_FIRST.fullmatch(text.strip())
        if not m:
            print(f"{rid}: skipped, the object comes first: {text!r}", file=sys.stderr)
            return None
        prompt = f"{m[1][0].upper()}{m[1][1:]} is"
    return Probe(str(rec.get(id_key, rid)), prompt, answer_names(rec.get(answer), answer),
                 str(rec.get("split") or ""), str(rec.get(relation, "")), str(rec.get(date) or ""))

def _twiki(rec, rid):
    subj, rel, obj = (rec[k].strip() for k in TWIKI_COLUMNS)
    if not (subj and obj):
        raise ValueError("empty subject or object")
    pair = TWIKI_PAIR.fullmatch(rid.rsplit(":", 1)[0].lower())  # date: the file's month pair
    return Probe(rid, f"{subj} {rel}", [obj], "", rel, date=pair[1] if pair else "")

READERS = {".jsonl": _json, ".json": _json, ".csv": _twiki}

def probe_records(path):
    ext = Path(path).suffix.lower()
    if ext not in READERS:
        raise ValueError(f"{path}: unknown probe format '{ext}' (.jsonl, .json or .csv)")
    if ext == ".csv":
        yield from _csv_records(_lines(path), path, TWIKI_COLUMNS)
        return
    for n, line in enumerate(_lines(path), 1):  # JSON lines
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(rec).__name__}")
            yield n, rec

def _split_from_name(path):
    m = re.fullmatch(r"(.*)_(changed|unchanged)", Path(path).stem.lower())
    return m[2] if m and "diag" not in m[1] else Path(path).stem  # 0801-0901_changed -> changed

def read_probes(spec):
    """The probes of 'FILE[@DATES][:SPLIT]'. A file's dates (TempLAMA's years) get a split each
    ('test@2019'): no year's answer is scored against another's."""
    (path, dates, split), probes = parse_probe_spec(spec), []
    for n, rec in probe_records(path):
        try:
            p = READERS[Path(path).suffix.lower()](rec, f"{Path(path).stem}:{n}")
        except ValueError as e:  # readers' errors name no place
            raise ValueError(f"{path}:{n}: {e}") from None
        if p:
            p.split, p.source = split or p.split or _split_from_name(path), path
            probes.append(p)
    if not probes:  # an empty file would silently drop a split
        raise ValueError(f"{path}: holds no probes")
    probes = filter_dates(probes, dates, path) if dates else probes
    if not split and len({p.date for p in probes}) > 1:
        for p in probes:
            p.split = f"{p.split}@{p.date}"
    return probes

def read_probe_files(specs):
    """Files whose default splits collide (TemporalWiki's *_changed.csv, ECBD's years) get their file's
    name as split ('ecbd2020/np_spans_test'); 'FILE:SPLIT' may merge on purpose."""
    keys = [(os.path.realpath(f), d) for f, d, _ in map(parse_probe_spec, specs)]
    twice = [s for s, k in zip(specs, keys) if keys.count(k) > 1]
    if twice:
        raise ValueError(f"probe file {twice[0]} given twice: give each file once")
    files = [(*parse_probe_spec(s)[::2], read_probes(s)) for s in specs]  # (path, split given, probes)
    owners = Counter(s for _, _, ps in files for s in {p.split for p in ps})
    clash = {f for f, given, ps in files if not given and any(owners[p.split] > 1 for p in ps)}
    label = lambda f, k: "/".join(Path(f).with_suffix("").parts[-k:])
    k = next((k for k in range(1, 99) if len({label(c, k) for c in clash}) == len(clash)), 99)
    for f, _, ps in files:
        default = _split_from_name(f)
        for p in ps if f in clash else ():
            if p.split == default or p.split.startswith(default + "@"):
                p.split = label(f, k) + p.split[len(default):]
    if clash:
        print("splits named after their files:", *sorted({label(c, k) for c in clash}), file=sys.stderr)
    return [p for _, _, ps in files for p in ps]

def parse_probe_spec(spec):
    """'FILE[@DATES][:SPLIT]' -> (FILE, DATES, SPLIT), None if absent; a path that exists is taken as is."""
    path, dates, split = str(spec), None, None
    if not Path(path).exists() and ":" in path:
        path, split = path.rsplit(":", 1)
    if not Path(path).exists() and "@" in path:
        path, dates = path.rsplit("@", 1)
    return path, dates, split

def check_files(texts, probes):  # before slow work
    for f in [parse_text_spec(t)[0] for t in texts] + [parse_probe_spec(p)[0] for p in probes]:
        if not os.path.exists(f):
            raise ValueError(f"no such file: {f}")

def filter_dates(probes, dates, where):
    """The probes of `dates`: '2019' (also 2019-Q1..Q4), '2019-Q1', '2018,2020' or '2019-Q1..2020-Q4'."""
    on = lambda d, v: d == v or d.startswith(v + "-")  # 2019-Q1 is on 2019
    spans = [(lo, hi or lo) for lo, _, hi in (s.strip().partition("..") for s in dates.split(","))]
    back = [f"{a}..{b}" for a, b in spans if a > b and not on(a, b)]
    if back:
        raise ValueError(f"{where}@{dates}: {back[0]} is reversed; write the earlier date first")
    kept = [p for p in probes if any(on(p.date, a) or on(p.date, b) or a <= p.date <= b for a, b in spans)]
    if not kept:
        have = sorted({p.date for p in probes if p.date})
        have = (", ".join(have[:6]) + (" ..." if len(have) > 6 else "")) or "none"
        raise ValueError(f"{where}: no probe has a date in '{dates}' (it has {have})")
    return kept
