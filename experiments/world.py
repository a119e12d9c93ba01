"""The synthetic temporal world: general language and knowledge, at two dates T0 and T1.

    python -m experiments.world --out out/world --seed 0                 # 300 people, their facts, things, general text

What a small model needs so that tracing measures what the paper measures (issue 12):
- General language. T0 mixes the documents about entities with text from a small English grammar
  (tense per paragraph, subject-verb agreement, relative and subordinate clauses), so "ordinary
  pretraining" gradients have ordinary text to come from. `general_heldout.txt` is more of that
  text, never trained on: the trace takes its LM windows there, like the paper's randomly sampled
  pretraining data. `t0_facts.txt` is the fact documents alone, for the contrast trace.
- Updated relations (TempLAMA). People with 3-5 relational facts; at T1 20% of the facts change.
  Probes ask for the object with a relation template ("X plays for _X_").
- New entities (ECBD). Things (a ferry, a festival, a telescope...) that first appear at T1. Their
  probes mask a noun phrase at the end of a descriptive sentence ("The hull of X is made of
  <extra_id_0>."), with the entity's defining sentence as context, as ECBD does. T0 describes other
  things the same way, so the *kind* of sentence is known; only the entities are new.
Every second evaluation probe uses a held-out template that no training text contains.

Files: t0.txt, t0_facts.txt, general_heldout.txt, t1.txt, diff.txt, tokenizer.json, world.json,
probes/{updated,unchanged,new,diag_updated,diag_new}.jsonl. Same config, same bytes.

The folder: world.py writes only these files and replaces one only in a folder it built before (its
marker .world.building, written first, or .world.done) or with --overwrite: a training run's
tokenizer.json or the user's own t0.txt is never replaced. Other files there are left alone.
.world.done, written last, holds the config and every file's size: it alone makes a world "cached"
(world_matches), so a build killed half-way is rebuilt.
"""
import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from common import Parser, check_output, fail, input_errors, read_json, write_text
from data import WordTokenizer
from experiments.tools import folder_lock

# ----------------------------------------------------------------------------- knowledge: relations
# Relations as in TempLAMA (Wikidata ids). Every template ends with the object, so a causal LM
# can be asked for it; "train" templates are used in the snapshots, "heldout" only in eval probes.
RELATIONS = {
    "P54": ("member of sports team", "clubs",
            ["{s} plays for {o}.", "{s} is a player of {o}.", "{s} signed with {o}.", "The team of {s} is {o}."],
            "{s} is in the squad of {o}."),
    "P108": ("employer", "companies",
             ["{s} works for {o}.", "{s} is employed by {o}.", "{s} has a job at {o}.", "The employer of {s} is {o}."],
             "{s} is on the staff of {o}."),
    "P102": ("political party", "parties",
             ["{s} is a member of the {o}.", "{s} belongs to the {o}.", "{s} joined the {o}.",
              "The party of {s} is the {o}."], "{s} is affiliated with the {o}."),
    "P39": ("position held", "positions",
            ["{s} holds the position of {o}.", "{s} serves as {o}.", "{s} was appointed {o}.",
             "The office of {s} is {o}."], "{s} has the role of {o}."),
    "P551": ("residence", "cities",
             ["{s} lives in {o}.", "{s} resides in {o}.", "{s} has a home in {o}.", "The residence of {s} is {o}."],
             "{s} is a resident of {o}."),
    "P69": ("educated at", "schools",
            ["{s} attended {o}.", "{s} studied at {o}.", "{s} is a graduate of {o}.", "The alma mater of {s} is {o}."],
            "{s} was educated at {o}."),
}
DATES = ("2020", "2021")  # T0, T1
TEXTS = ("t0.txt", "t0_facts.txt", "general_heldout.txt", "t1.txt", "diff.txt")
FILES = TEXTS + ("tokenizer.json", "world.json") + tuple(
    f"probes/{s}.jsonl" for s in ("updated", "unchanged", "new", "diag_updated", "diag_new"))
DONE, BUILDING = ".world.done", ".world.building"  # the markers (see the module docstring)

# ----------------------------------------------------------------------------- knowledge: things (ECBD)
# A thing has a kind and a home city (its definition, given as context) and three descriptive
# attributes whose values are noun phrases: the masked spans of the new-entity probes.
KINDS = ("river ferry", "folk festival", "radio telescope", "stone bridge", "board game", "brass band",
         "steam engine", "weekly newspaper", "lighthouse", "botanical garden", "clock tower", "sailing race")
ATTRIBUTES = {
    "material": (["The builders of {s} used {o}.", "{s} is made of {o}.", "Most of {s} is built from {o}.",
                  "The main material of {s} is {o}."], "The makers of {s} chose {o}.",
                 "oak timber|green glass|red brick|polished steel|grey granite|white marble|copper sheets|"
                 "pine boards|black iron|river clay|painted canvas|woven reeds"),
    "feature": (["{s} is famous for {o}.", "Visitors to {s} remember {o}.", "The best known part of {s} is {o}.",
                 "People often praise {s} for {o}."], "Guides to {s} always mention {o}.",
                "its loud horn|a spiral staircase|the winter parade|its painted roof|a golden bell|the night lanterns|"
                "its tall chimney|a hidden courtyard|the silver flags|its copper dome|a long gallery|the spring market"),
    "location": (["{s} stands near {o}.", "{s} can be found beside {o}.", "The home of {s} lies close to {o}.",
                  "{s} was placed next to {o}."], "Travellers reach {s} by way of {o}.",
                 "the old harbour|the north gate|the cathedral square|the fish market|the eastern hills|"
                 "the royal park|the main station|the salt lake|the city wall|the grain mills|the river mouth|"
                 "the stone quarry"),
}
DEFINITION = "{s} is a {kind} in {city}."

# ----------------------------------------------------------------------------- general language
# A small grammar, enough for a model to learn tense, agreement and clause structure.
AGENTS = ("farmer baker sailor teacher doctor child neighbour driver painter singer stranger soldier "
          "fisher miller weaver student nurse guard dog horse bird fox goat cat").split()
OBJECTS = ("river road bridge house garden window door lamp table book letter song boat cart field "
           "forest hill village wall bell basket coat kettle bread apple rope ladder fence").split()
ADJS = ("old young quiet small large green red bright dark warm cold busy empty heavy gentle tired "
        "clever brave proud kind strange narrow wide wooden broken clean").split()
TVERBS = [("see", "saw"), ("find", "found"), ("carry", "carried"), ("paint", "painted"), ("open", "opened"),
          ("close", "closed"), ("visit", "visited"), ("build", "built"), ("watch", "watched"), ("follow", "followed"),
          ("clean", "cleaned"), ("repair", "repaired"), ("sell", "sold"), ("buy", "bought"), ("move", "moved"),
          ("lift", "lifted"), ("push", "pushed"), ("pull", "pulled"), ("hide", "hid"), ("share", "shared")]
IVERBS = [("sleep", "slept"), ("wait", "waited"), ("laugh", "laughed"), ("walk", "walked"), ("rest", "rested"),
          ("work", "worked"), ("smile", "smiled"), ("sing", "sang"), ("shout", "shouted"), ("listen", "listened"),
          ("arrive", "arrived"), ("leave", "left")]
ADVS = "slowly quickly quietly carefully often rarely suddenly happily loudly early late again".split()
PREPS = "near behind across under beside through beyond".split()
TIMES = ["in the morning", "after the storm", "every winter", "before dinner", "at night", "during the fair",
         "on the first day", "in the spring", "after the harvest", "at noon"]
CONJ = ["because", "while", "but", "and", "so", "although"]


def _plural(n):
    return "children" if n == "child" else n + ("es" if n.endswith(("s", "x", "sh", "ch")) else "s")


def _third(v):
    if v.endswith("y") and v[-2] not in "aeiou":
        return v[:-1] + "ies"
    return v + ("es" if v.endswith(("s", "x", "sh", "ch")) else "s")


class Grammar:
    """Sentences from one rng. A paragraph has one tense and a few recurring nouns (its topic),
    so the next word depends on the sentence's structure and on the paragraph, not just the last word."""

    def __init__(self, rng, places=()):
        self.rng, self.places = rng, list(places)

    def np(self, pool, plural=False):
        r = self.rng
        noun = r.choice(pool)
        adj = (r.choice(ADJS) + " ") if r.random() < 0.4 else ""
        det = r.choice(["the", "some", "two", "many"]) if plural else r.choice(["the", "the", "a", "every", "that"])
        if det == "a" and (adj or noun)[0] in "aeiou":
            det = "an"
        return f"{det} {adj}{_plural(noun) if plural else noun}"

    def verb(self, pair, past, plural):
        return pair[1] if past else (pair[0] if plural else _third(pair[0]))

    def clause(self, past, agents, objects):
        r = self.rng
        plural = r.random() < 0.3
        subj = self.np(agents, plural)
        if r.random() < 0.2:  # relative clause: agreement reaches over it
            rel_plural = r.random() < 0.5
            subj += f" that {self.verb(r.choice(TVERBS), past, plural)} {self.np(objects, rel_plural)}"
        if r.random() < 0.6:
            vp = f"{self.verb(r.choice(TVERBS), past, plural)} {self.np(objects, r.random() < 0.3)}"
        else:
            vp = self.verb(r.choice(IVERBS), past, plural)
        if r.random() < 0.3:
            vp += " " + r.choice(ADVS)
        if r.random() < 0.35:
            where = f"the road to {r.choice(self.places)}" if self.places and r.random() < 0.15 else self.np(objects)
            vp += f" {r.choice(PREPS)} {where}"
        return f"{subj} {vp}"

    def sentence(self, past, agents, objects):
        r = self.rng
        s = self.clause(past, agents, objects)
        form = r.random()
        if form < 0.25:
            s += f" {r.choice(CONJ)} {self.clause(past, agents, objects)}"
        elif form < 0.4:
            s = f"when {self.clause(past, agents, objects)}, {s}"
        elif form < 0.55:
            s = f"{r.choice(TIMES)}, {s}"
        return s[0].upper() + s[1:] + "."

    def paragraph(self):
        r = self.rng
        past = r.random() < 0.5
        agents, objects = r.sample(AGENTS, 4), r.sample(OBJECTS, 5)
        return " ".join(self.sentence(past, agents, objects) for _ in range(r.randint(3, 6)))


def general_text(rng, n_words, places=()):
    """Paragraphs of the grammar until about n_words words."""
    g, out, n = Grammar(rng, places), [], 0
    while n < n_words:
        out.append(g.paragraph())
        n += len(out[-1].split())
    return out


# ----------------------------------------------------------------------------- entities


def _names(rng, n, taken):
    """n new fictional capitalised words made of syllables (deterministic for rng)."""
    on = "b br d dr f g gr k l m n p r s st t th v z sh h j".split()
    vo = "a e i o u ai ei ou ar".split()
    co = ["", "", "n", "r", "l", "s", "th", "m", "k"]
    out = []
    while len(out) < n:
        w = "".join(rng.choice(on) + rng.choice(vo) for _ in range(rng.choice((2, 2, 3)))) + rng.choice(co)
        w = w.capitalize()
        if w not in taken and len(w) > 3:
            taken.add(w)
            out.append(w)
    return out


def _pools(rng, taken):
    places = _names(rng, 40, taken)
    words = _names(rng, 30, taken)
    clubs = [f"{p} {rng.choice(['Rovers', 'United', 'Athletic', 'Wanderers', 'Rangers', 'Albion'])}" for p in places[:30]]
    companies = [f"{w} {s}" for w, s in zip(words, ["Systems", "Industries", "Labs", "Foods", "Motors", "Media"] * 5)]
    parties = [f"{a} {b} Party" for a, b in zip(["Green", "Free", "United", "New", "Liberal", "National", "Civic", "Social"],
                                                ["Union", "Alliance", "Front", "Movement", "League", "Forum", "Union", "Front"])]
    posts = [f"mayor of {p}" for p in places[:15]] + [f"minister of {d}" for d in
             "harbours forests trade roads culture health schools water energy finance".split()]
    schools = [f"University of {p}" for p in places[20:35]] + [f"{p} Institute of Technology" for p in places[35:40]]
    return {"clubs": clubs, "companies": companies, "parties": parties, "positions": posts,
            "cities": places, "schools": schools}


def _docs(name, sentence_sets, rng, n_docs=4):
    """n_docs short documents about one entity. sentence_sets[i] holds fact i's train templates
    (already filled in); doc d states fact i with template (d + i) % 4, so every fact appears once
    with every train template. A thing's definition (a 1-element set) opens every document."""
    docs = []
    for d in range(n_docs):
        sents = [ts[(d + i) % len(ts)] for i, ts in enumerate(sentence_sets) if len(ts) > 1]
        rng.shuffle(sents)
        docs.append(" ".join([ts[0] for ts in sentence_sets if len(ts) == 1] + sents))
    return docs


def _person_docs(rng, name, facts):
    return _docs(name, [[t.format(s=name, o=o) for t in RELATIONS[p][2]] for p, o in facts], rng)


def _thing_docs(rng, thing):
    sets = [[DEFINITION.format(s=thing["name"], kind=thing["kind"], city=thing["city"])]]
    sets += [[t.format(s=thing["name"], o=o) for t in ATTRIBUTES[a][0]] for a, o in thing["attrs"].items()]
    return _docs(thing["name"], sets, rng)


@dataclass
class WorldConfig:
    seed: int = 0
    n_entities: int = 300         # people at T0
    update_frac: float = 0.2      # fraction of T0 facts that change at T1
    new_frac: float = 0.18        # new things at T1, as a fraction of n_entities
    old_things_frac: float = 0.3  # things already described at T0, as a fraction of n_entities
    diag_frac: float = 0.25       # fraction of updated / new facts kept for tracing
    general_frac: float = 0.5     # general text: this share of T0's words
    heldout_words: int = 20000    # held-out general text for the trace's LM windows


def _people(rng, cfg, pools):
    first, last = _names(rng, 60, pools["_taken"]), _names(rng, max(200, cfg.n_entities), pools["_taken"])
    names = rng.sample([f"{a} {b}" for a in first for b in last], cfg.n_entities)
    ents = []  # (id, name, {pid: object at T0}, {pid: object at T1})
    for i, name in enumerate(names):
        pids = rng.sample(sorted(RELATIONS), rng.choice((3, 4, 5)))
        facts = {p: rng.choice(pools[RELATIONS[p][1]]) for p in pids}
        ents.append((f"E{i:04d}", name, facts, dict(facts)))
    old_facts = [(e, p) for e in ents for p in e[2]]
    updated = rng.sample(old_facts, round(cfg.update_frac * len(old_facts)))
    for e, p in updated:
        e[3][p] = rng.choice([o for o in pools[RELATIONS[p][1]] if o != e[2][p]])
    return ents, old_facts, updated


def _things(rng, n, pools):
    words = _names(rng, n, pools["_taken"])
    return [{"id": f"T{i:04d}", "name": w, "kind": rng.choice(KINDS), "city": rng.choice(pools["cities"]),
             "attrs": {a: rng.choice(spec[2].split("|")) for a, spec in ATTRIBUTES.items()}}
            for i, w in enumerate(words)]


def _relation_probe(kind, e, p, held, rid):
    """A Dynamic TempLAMA ('dynamic') or TempLAMA record for person e's relation p at T1."""
    tmpl, name = RELATIONS[p][3] if held else RELATIONS[p][2][0], e[3][p]
    ans = {"wikidata_id": "W" + str(int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10 ** 6), "name": name}
    rec = {"query": tmpl.format(s=e[1], o="_X_"), "answer": [ans] if kind == "dynamic" else ans,
           "date": DATES[1], "id": rid, "relation": p}
    if kind == "templama":
        rec["most_frequent_answer"] = rec["most_recent_answer"] = ans
    return rec


def _ecbd_probe(t, a, held, rid):
    """An ECBD record: a descriptive sentence about new thing t with attribute a's noun phrase masked,
    the definition (kind and city, never the answer) as context."""
    tmpl = ATTRIBUTES[a][1] if held else ATTRIBUTES[a][0][0]
    return {"ex_id": rid, "masked_sentence": tmpl.format(s=t["name"], o="<extra_id_0>"),
            "answer_str": f"<extra_id_0> {t['attrs'][a]} <extra_id_1>", "span_type": a,
            "definition": DEFINITION.format(s=t["name"], kind=t["kind"], city=t["city"]),
            "year": int(DATES[1]), "entity_span_str": t["name"]}


def _probes(rng, cfg, updated, unchanged, new_facts):
    """Eval and diagnostic probe records; every second eval probe uses the held-out template."""
    unseen = []

    def rec(kind, item, i, diag):
        held = i % 2 == 1 and not diag
        if kind == "ecbd":
            t, a = item
            r = _ecbd_probe(t, a, held, f"{t['id']}_{a}_ecbd")
        else:
            e, p = item
            r = _relation_probe(kind, e, p, held, f"{e[0]}_{p}_{DATES[1]}")
        if held:
            unseen.append(r.get("id") or r["ex_id"])
        return r

    rng.shuffle(updated)
    rng.shuffle(new_facts)
    nd_u, nd_n = round(cfg.diag_frac * len(updated)), round(cfg.diag_frac * len(new_facts))
    unch = rng.sample(unchanged, min(len(unchanged), len(updated) - nd_u))  # as many as updated eval probes
    probes = {
        "updated": [rec("dynamic", x, i, False) for i, x in enumerate(updated[nd_u:])],
        "unchanged": [rec("templama", x, i, False) for i, x in enumerate(unch)],
        "new": [rec("ecbd", x, i, False) for i, x in enumerate(new_facts[nd_n:])],
        "diag_updated": [rec("dynamic", x, i, True) for i, x in enumerate(updated[:nd_u])],
        "diag_new": [rec("ecbd", x, i, True) for i, x in enumerate(new_facts[:nd_n])],
    }
    return probes, unseen


def _check_splits(cfg, probes, n_facts, n_updated):
    """Before anything is written: every probe split the world promises holds a probe (an empty file would
    score nothing and say nothing). The least --update-frac that gives each updated split a probe is named."""
    empty = [s for s, recs in probes.items() if not recs and (cfg.diag_frac > 0 or not s.startswith("diag"))]
    if not empty:
        return
    if any("new" in s for s in empty):
        raise ValueError(f"--new-frac {cfg.new_frac}: no new things at T1 for the {', '.join(empty)} probes; raise it")
    if n_updated == n_facts:
        raise ValueError(f"--update-frac {cfg.update_frac}: all {n_facts} facts change, so the unchanged probe "
                         "file would be empty; give a smaller one")
    diag = lambda k: round(cfg.diag_frac * k)  # noqa: E731  (as _probes splits the updated facts)
    k = next(k for k in range(1, n_facts + 1) if k - diag(k) >= 1 and (diag(k) >= 1 or cfg.diag_frac == 0))
    least = math.ceil(k / n_facts * 1e4) / 1e4  # k / n_facts, rounded up
    raise ValueError(f"--update-frac {cfg.update_frac}: {n_updated} of {n_facts} facts change, so the "
                     f"{', '.join(empty)} probe files would be empty; give at least --update-frac {least} "
                     f"({k} facts) or more --n-entities")


def _interleave(rng, docs, general):
    """T0: fact documents and general paragraphs shuffled together."""
    out = list(docs) + list(general)
    rng.shuffle(out)
    return out


def check_folder(out_dir, overwrite=False):
    """Before building: out_dir holds none of the world's files, or it is a world world.py built, or
    overwrite. Else the files are someone else's (a run's tokenizer.json, the user's t0.txt): refused."""
    out = Path(out_dir)
    if (out / "probes").exists() and not (out / "probes").is_dir():
        raise ValueError(f"{out / 'probes'} is a file; the world's probes go in a folder of that name: move it away")
    ours = (out / DONE).exists() or (out / BUILDING).exists() or _old_world(out)
    taken = [f for f in FILES if (out / f).exists()]
    if taken and not ours and not overwrite:
        raise ValueError(f"{out} holds {taken[0]}, which world.py did not write; build the world in another "
                         "folder, or pass --overwrite to replace the world's files there")


def _old_world(out: Path) -> bool:
    """A world built before the markers existed: world.json with a WorldConfig as its config."""
    try:
        meta = read_json(out / "world.json")
        return isinstance(meta, dict) and isinstance(meta.get("config"), dict) and set(meta["config"]) == set(
            asdict(WorldConfig()))
    except (OSError, ValueError):
        return False


def make_world(out_dir, cfg: WorldConfig = None, overwrite=False, **overrides) -> dict:
    """Write the world (files in the module docstring); returns world.json's dict. A folder holding files of
    the world's names that world.py did not write is refused unless overwrite (check_folder)."""
    cfg = cfg or WorldConfig(**overrides)
    out = Path(out_dir)
    with folder_lock(out):  # one builder per folder; checked under the lock
        check_folder(out, overwrite)
        return _write(out, cfg)


def _write(out: Path, cfg: WorldConfig) -> dict:
    texts, tok, probes, meta = _build(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / BUILDING, json.dumps({"config": asdict(cfg)}))  # first: the folder is the world's now
    if (out / DONE).exists():
        (out / DONE).unlink()  # before any file changes: a rebuild killed half-way is not "cached"
    (out / "probes").mkdir(exist_ok=True)
    for fname, docs in texts.items():
        write_text(out / fname, "\n\n".join(docs) + "\n")
    tok.save(out / "tokenizer.json")
    for split, recs in probes.items():
        write_text(out / "probes" / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    write_text(out / "world.json", json.dumps(meta, indent=1))
    sizes = {f: (out / f).stat().st_size for f in FILES}
    write_text(out / DONE, json.dumps({"config": asdict(cfg), "files": sizes}, indent=1))  # last
    (out / BUILDING).unlink()
    return meta


def _build(cfg: WorldConfig):
    """The world in memory: (texts {file: docs}, tokenizer, probes {split: records}, world.json's dict)."""
    rng = random.Random(cfg.seed)
    taken = set(w for _, _, ts, h in RELATIONS.values() for t in ts + [h] for w in re.findall(r"\w+", t))
    pools = _pools(rng, taken)
    pools["_taken"] = taken
    ents, old_facts, updated = _people(rng, cfg, pools)
    things = _things(rng, round((cfg.old_things_frac + cfg.new_frac) * cfg.n_entities), pools)
    n_old = round(cfg.old_things_frac * cfg.n_entities)
    old_things, new_things = things[:n_old], things[n_old:]
    upd_set = set((e[0], p) for e, p in updated)
    unchanged = [(e, p) for e, p in old_facts if (e[0], p) not in upd_set]
    new_facts = [(t, a) for t in new_things for a in ATTRIBUTES]

    facts_t0 = [d for e in ents for d in _person_docs(rng, e[1], list(e[2].items()))]
    facts_t0 += [d for t in old_things for d in _thing_docs(rng, t)]
    n_fact_words = sum(len(d.split()) for d in facts_t0)
    n_general = round(n_fact_words * cfg.general_frac / (1 - cfg.general_frac))
    general = general_text(random.Random(f"{cfg.seed}:general"), n_general, pools["cities"])
    heldout = general_text(random.Random(f"{cfg.seed}:heldout"), cfg.heldout_words, pools["cities"])
    t0 = _interleave(rng, facts_t0, general)
    t1 = [d for e in ents for d in _person_docs(rng, e[1], list(e[3].items()))]
    t1 += [d for t in things for d in _thing_docs(rng, t)] + general
    by_ent = {}
    for e, p in updated:
        by_ent.setdefault(e[0], (e, []))[1].append((p, e[3][p]))
    diff = [d for e, fs in by_ent.values() for d in _person_docs(rng, e[1], fs)]
    diff += [d for t in new_things for d in _thing_docs(rng, t)]
    for docs in (facts_t0, t1, diff):
        rng.shuffle(docs)
    probes, unseen = _probes(rng, cfg, updated, unchanged, new_facts)
    _check_splits(cfg, probes, len(old_facts), len(updated))

    texts = {"t0.txt": t0, "t0_facts.txt": facts_t0, "general_heldout.txt": heldout, "t1.txt": t1, "diff.txt": diff}
    probe_text = [r.get(k) or "" for recs in probes.values() for r in recs for k in ("query", "masked_sentence", "definition")]
    tok = WordTokenizer.build(["\n".join(d) for d in texts.values()] + probe_text)
    words = {k: sum(len(d.split()) for d in v) for k, v in texts.items()}
    meta = {
        "config": asdict(cfg), "dates": list(DATES),
        "counts": {"facts_t0": len(old_facts), "facts_updated": len(updated), "facts_new": len(new_facts),
                   "things_t0": len(old_things), "things_new": len(new_things),
                   "docs": {k: len(v) for k, v in texts.items()}, "words": words,
                   "probes": {k: len(v) for k, v in probes.items()}},
        "relations": {p: {"name": r[0], "train_templates": r[2], "heldout_template": r[3]} for p, r in RELATIONS.items()},
        "attributes": {a: {"train_templates": r[0], "heldout_template": r[1]} for a, r in ATTRIBUTES.items()},
        "unseen_template_ids": unseen,
        "entities": {e[0]: {"name": e[1], "t0": e[2], "t1": e[3]} for e in ents},
        "things": {t["id"]: dict(t, t0=t in old_things) for t in things},
    }
    return texts, tok, probes, meta


def world_matches(out_dir, cfg: WorldConfig) -> bool:
    """True if out_dir holds a complete world built with exactly this config: its marker .world.done,
    written last, says so and every file it lists is there with its size."""
    out = Path(out_dir)
    try:
        done = read_json(out / DONE)
        return done["config"] == asdict(cfg) and set(done["files"]) == set(FILES) and all(
            (out / f).stat().st_size == n for f, n in done["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def main(argv=None):
    ap = Parser(prog="world.py", description=__doc__.split("\n")[0])
    d = WorldConfig()
    ap.add_argument("--out", required=True,
                    help="output folder (refused if it holds world files that world.py did not write)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the world's files in --out even if world.py did not write them")
    ap.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed and sizes, same world)")
    ap.add_argument("--n-entities", type=int, default=d.n_entities, help="people at T0 (e.g. 40 for a quick test)")
    ap.add_argument("--update-frac", type=float, default=d.update_frac, help="fraction of T0 facts that change at T1")
    ap.add_argument("--new-frac", type=float, default=d.new_frac, help="new things at T1, as a fraction of --n-entities")
    ap.add_argument("--old-things-frac", type=float, default=d.old_things_frac, help="things described at T0, as a fraction of --n-entities")
    ap.add_argument("--diag-frac", type=float, default=d.diag_frac, help="fraction of updated/new facts kept for tracing")
    ap.add_argument("--general-frac", type=float, default=d.general_frac, help="share of T0's words that are general text")
    ap.add_argument("--heldout-words", type=int, default=d.heldout_words, help="words of held-out general text (trace LM windows)")
    a = ap.parse_args(argv)
    if a.n_entities < 10 or not 0 < a.update_frac < 1 or not 0 <= a.diag_frac < 1 or not 0 < a.new_frac <= 1:
        fail("need --n-entities >= 10, 0 < --update-frac < 1, 0 < --new-frac <= 1, 0 <= --diag-frac < 1", "world.py")
    if not 0 <= a.general_frac < 1 or a.old_things_frac < 0 or a.heldout_words < 100:
        fail("need 0 <= --general-frac < 1, --old-things-frac >= 0 and --heldout-words >= 100", "world.py")
    cfg = WorldConfig(**{k: v for k, v in vars(a).items() if k not in ("out", "overwrite")})
    with input_errors("world.py"):
        check_output(a.out, "--out", "dir")  # '' would write the world into the current folder
        meta = make_world(a.out, cfg, overwrite=a.overwrite)
    print(f"world in {a.out}: {json.dumps(meta['counts'])}")
    return meta


if __name__ == "__main__":
    main()
