"""world.py: the synthetic temporal world (general language, updated relations, new entities)."""
import json
import re

import pytest

from experiments import world
from data import load_tokenizer
from experiments.probe_files import read_probes
from experiments.world import WorldConfig, make_world, world_matches

FILES = ["t0.txt", "t0_facts.txt", "general_heldout.txt", "t1.txt", "diff.txt", "tokenizer.json", "world.json"] + [
    f"probes/{s}.jsonl" for s in ("updated", "unchanged", "new", "diag_updated", "diag_new")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, make_world(out, WorldConfig(seed=3, n_entities=60, heldout_words=2000))


def test_deterministic_and_seeded(tmp_path, built):
    out, _ = built
    make_world(tmp_path / "again", WorldConfig(seed=3, n_entities=60, heldout_words=2000))
    for f in FILES:
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    make_world(tmp_path / "other", WorldConfig(seed=4, n_entities=60, heldout_words=2000))
    assert (out / "t0.txt").read_bytes() != (tmp_path / "other" / "t0.txt").read_bytes()


def test_world_matches_only_same_config(built):
    out, meta = built
    assert world_matches(out, WorldConfig(**meta["config"]))
    assert not world_matches(out, WorldConfig(seed=3, n_entities=61, heldout_words=2000))
    assert not world_matches(out / "missing", WorldConfig(**meta["config"]))


def test_general_language_mixed_into_t0_not_heldout(built):
    out, meta = built
    w = meta["counts"]["words"]
    assert 0.4 < 1 - w["t0_facts.txt"] / w["t0.txt"] < 0.6  # general_frac 0.5 of T0's words
    t0, heldout = (out / "t0.txt").read_text(), (out / "general_heldout.txt").read_text()
    paras = [p for p in heldout.split("\n\n") if p.strip()]
    assert len(paras) > 20 and sum(p in t0 for p in paras) <= 1  # held out: (almost surely) not in T0
    # the grammar: agreement holds (present tense: "the dog sleeps", "two dogs sleep")
    assert re.search(r"\bthe \w+ \w+s\b", heldout) and len(set(heldout.split())) > 150
    facts = (out / "t0_facts.txt").read_text()
    assert all(d in t0 for d in facts.split("\n\n")[:20])


def test_sizes_and_splits(built):
    out, meta = built
    c, ents = meta["counts"], meta["entities"]
    assert c["facts_updated"] == round(0.2 * c["facts_t0"]) and 3 * 60 <= c["facts_t0"] <= 5 * 60
    changed = sum(o != e["t1"][p] for e in ents.values() for p, o in e["t0"].items())
    assert changed == c["facts_updated"]
    assert c["things_new"] == round(0.18 * 60) and c["facts_new"] == 3 * c["things_new"]
    for split, n in c["probes"].items():
        probes = read_probes(out / "probes" / f"{split}.jsonl")
        assert len(probes) == n > 0 and {p.split for p in probes} == {split}
    assert c["probes"]["updated"] + c["probes"]["diag_updated"] == c["facts_updated"]
    assert c["probes"]["new"] + c["probes"]["diag_new"] == c["facts_new"]
    for p in read_probes(out / "probes" / "updated.jsonl"):  # the T1 object, which differs from T0's
        e = ents[p.id.split("_")[0]]
        assert p.answers == [e["t1"][p.relation]] != [e["t0"][p.relation]]


def test_new_entities_are_ecbd_not_relations(built):
    out, meta = built
    things, t0, diff = meta["things"], (out / "t0.txt").read_text(), (out / "diff.txt").read_text()
    rel_templates = {t.split("{o}")[0].replace("{s}", "").strip() for r in world.RELATIONS.values() for t in r[2] + [r[3]]}
    for p in read_probes(out / "probes" / "new.jsonl") + read_probes(out / "probes" / "diag_new.jsonl"):
        t = things[p.id.split("_")[0]]
        assert not t["t0"] and t["name"] not in t0 and t["name"] in diff  # first appears at T1
        assert p.answers == [t["attrs"][p.relation]] and len(p.answers[0].split()) >= 2  # a noun phrase
        assert p.prompt.replace(t["name"], "").strip() not in rel_templates


def test_diag_disjoint_unseen_templates_and_vocab(built):
    out, meta = built
    key = lambda p: tuple(p.id.split("_")[:2])  # (entity, relation or attribute)
    for ev, dg in (("updated", "diag_updated"), ("new", "diag_new")):
        a = {key(p) for p in read_probes(out / "probes" / f"{ev}.jsonl")}
        b = {key(p) for p in read_probes(out / "probes" / f"{dg}.jsonl")}
        assert a and b and not a & b
    train_text = "".join((out / f).read_text() for f in ("t0.txt", "t1.txt", "diff.txt"))
    unseen = set(meta["unseen_template_ids"])
    evals = [p for s in ("updated", "unchanged", "new") for p in read_probes(out / "probes" / f"{s}.jsonl")]
    assert 0.3 < sum(p.id in unseen for p in evals) / len(evals) < 0.7
    for p in evals:  # unseen-template prompts never occur in training text; seen ones do
        assert (p.prompt not in train_text) == (p.id in unseen), p
    tok = load_tokenizer(out)
    everything = train_text + (out / "general_heldout.txt").read_text()
    everything += " ".join(p.prompt + " " + p.answers[0] for p in evals)
    assert tok.unk not in tok.encode(everything) and tok.n_vocab < 5000


def test_cli(tmp_path, capsys):
    meta = world.main(["--out", str(tmp_path / "w"), "--seed", "1", "--n-entities", "20", "--heldout-words", "500"])
    assert "facts_t0" in capsys.readouterr().out and json.load(open(tmp_path / "w" / "world.json")) == meta
    with pytest.raises(SystemExit) as e:
        world.main(["--out", str(tmp_path / "w"), "--n-entities", "2"])
    assert e.value.code == 2 and "--n-entities" in capsys.readouterr().err
