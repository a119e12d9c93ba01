"""trace.py: hook norms vs torch.autograd.grad, tied weights, state left untouched, selection, CLI."""
import json
import math
import sys
from dataclasses import asdict

import pytest
import torch
from common import parse_config

import trace as tgl_trace
from experiments import plot
from checkpoint import save_checkpoint
from model import GPT, GPTConfig, add_lora, unit_names, unit_of
from trace import GradNormHooks, grad_norms, select, trace

V = 64


def tiny(arch="gpt2", seed=0):
    torch.manual_seed(seed)
    extra = dict(arch="gpt_neo", qkv_bias=False, scale_attn=False, attention_layers=["global", "local"],
                 window_size=4) if arch == "gpt_neo" else {}
    return GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=16, **extra))


def lora_model(units=None):
    m = tiny()
    add_lora(m, rank=2, alpha=4.0, units=units)
    with torch.no_grad():  # B = 0 at init would make every lora_A gradient 0: a weak test
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    return m


def examples(seed=1, n_span=4, n_lm=3, n_ans=3):
    g = torch.Generator().manual_seed(seed)
    span = []
    for k in range(n_span):
        L = 6 + 2 * k
        idx = torch.randint(0, V, (L,), generator=g).tolist()
        span.append((idx, [-1] * (L - n_ans) + torch.randint(0, V, (n_ans,), generator=g).tolist()))
    wins = [torch.randint(0, V, (21,), generator=g).tolist() for _ in range(n_lm)]
    return span, [(w[:-1], w[1:]) for w in wins]


def reference(model, exs):
    """Mean per-unit gradient norm with torch.autograd.grad, one example at a time (no hooks)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {}
    model.eval()
    for idx, tgt in exs:
        _, loss = model(torch.tensor([idx]), torch.tensor([tgt]))
        grads = torch.autograd.grad(loss, [p for _, p in named])
        sq = {}
        for (n, _), g in zip(named, grads):
            sq[unit_of(n)] = sq.get(unit_of(n), 0.0) + g.double().square().sum().item()
        for u, v in sq.items():
            total[u] = total.get(u, 0.0) + math.sqrt(v)
    return {u: v / len(exs) for u, v in total.items()}


def assert_close(got, want, rel=1e-5):
    assert set(got) == set(want)
    for u in want:
        assert abs(got[u] - want[u]) <= rel * abs(want[u]), (u, got[u], want[u])


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo", "lora"])
def test_hook_norms_match_autograd(kind):
    model = lora_model() if kind == "lora" else tiny(kind)
    span, lm = examples()
    d = trace(model, span, lm)
    assert_close(d["span_norm"], reference(model, span))
    assert_close(d["lm_norm"], reference(model, lm))
    for u in d["units"]:
        assert d["rgn"][u] == pytest.approx(d["span_norm"][u] / d["lm_norm"][u])
        assert d["span_norm"][u] > 0
    # LoRA: only adapters require grad, so only block units are traced
    assert d["units"] == (unit_names(2)[1:-1] if kind == "lora" else unit_names(2))


def test_lora_traces_only_its_adapters():
    model = lora_model(units={"h.1.mlp"})
    span, lm = examples()
    flags = [p.requires_grad for p in model.parameters()]
    assert trace(model, span, lm)["units"] == ["h.1.mlp"]
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())


def test_tied_weight_counted_once():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    calls = []
    model.transformer.wte.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    (idx, tgt), = examples(n_span=1)[0][:1]
    with GradNormHooks(model) as hooks:
        _, loss = model(torch.tensor([idx]), torch.tensor([tgt]))
        loss.backward()
        got = hooks.norms()["embed"] ** 2
    assert len(calls) == 1  # one hook call per backward for the tied weight
    assert model.transformer.wte.weight.grad is None  # read, then dropped: tracing keeps no gradient
    _, loss = model(torch.tensor([idx]), torch.tensor([tgt]))
    loss.backward()  # the same backward without hooks
    g = model.transformer.wte.weight.grad  # embedding + lm_head contributions, summed by autograd
    want = g.square().sum().item() + model.transformer.wpe.weight.grad.square().sum().item()
    assert got == pytest.approx(want, rel=1e-5)  # counted twice would be about 2x


def test_every_param_in_exactly_one_unit():
    model = lora_model()
    for p in model.parameters():
        p.requires_grad_(True)
    hooks = GradNormHooks(model)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) == len(hooks.named)
    assert all(unit_of(n) in unit_names(2) for n in names)
    assert list(hooks.norms()) == unit_names(2)


def test_state_untouched_and_deterministic():
    model = tiny()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old = torch.ones_like(model.transformer.ln_f.weight)
    model.transformer.ln_f.weight.grad = old  # a caller's pending gradient survives the trace
    model.transformer.wpe.weight.requires_grad_(False)
    span, lm = examples()
    d1, d2 = trace(model, span, lm), trace(model, span, lm)
    assert d1 == d2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    assert model.transformer.ln_f.weight.grad is old
    assert all(p.grad is None for n, p in model.named_parameters() if n != "transformer.ln_f.weight")
    assert not model.transformer.wpe.weight.requires_grad


def test_hooks_removed_after_context():
    model = tiny()
    (idx, tgt), = examples(n_span=1)[0]
    with GradNormHooks(model) as hooks:
        pass
    hooks.reset()
    _, loss = model(torch.tensor([idx]), torch.tensor([tgt]))
    loss.backward()
    assert all(v == 0 for v in hooks.norms().values())
    assert model.transformer.wte.weight.grad is not None  # the backward did run and kept its gradient


def test_training_grad_norms_are_of_the_accumulated_gradient():
    """train.py logs grad_norms(model) after the last micro-step: the norm of the summed .grad, per unit,
    which equals autograd's gradient of the summed loss."""
    model = tiny()
    span, _ = examples()
    for idx, tgt in span[:3]:  # three micro-steps into one .grad
        _, loss = model(torch.tensor([idx]), torch.tensor([tgt]))
        (loss / 3).backward()
    got = grad_norms(model)
    model.zero_grad()
    loss = sum(model(torch.tensor([i]), torch.tensor([t]))[1] for i, t in span[:3]) / 3
    grads = torch.autograd.grad(loss, list(model.parameters()))
    sq = {}
    for (n, _), g in zip(model.named_parameters(), grads):
        sq[unit_of(n)] = sq.get(unit_of(n), 0.0) + g.double().square().sum().item()
    assert_close(got, {u: math.sqrt(v) for u, v in sq.items()})


def test_trace_works_under_no_grad_and_restores_it():
    model = tiny()
    span, lm = examples()
    with torch.no_grad():
        d = trace(model, span, lm)
        assert not torch.is_grad_enabled()  # the tracing context turned it on, and back off
    assert d == trace(model, span, lm)


def test_select_rules():
    rgn = {"embed": 1.0, "h.0.attn": 4.0, "h.0.mlp": 2.0, "h.1.attn": 3.0, "h.1.mlp": 0.0, "ln_f": 2.0}
    # mean = 2.0: strictly above it
    assert select(rgn, "fp") == {"embed": 0.0, "h.0.attn": 1.0, "h.0.mlp": 0.0, "h.1.attn": 1.0, "h.1.mlp": 0.0, "ln_f": 0.0}
    assert {u for u, s in select(rgn, "fp", "topk:3").items() if s} == {"h.0.attn", "h.1.attn", "h.0.mlp"}  # tie -> earlier
    assert {u for u, s in select(rgn, "fp", "frac:0.5").items() if s} == {"h.0.attn", "h.1.attn", "h.0.mlp"}
    assert sum(select(rgn, "fp", "frac:0.01").values()) == 1.0
    assert sum(select(rgn, "fp", "topk:99").values()) == 6.0
    blocks = ["h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp"]  # mean 2.25; embed, ln_f unranked -> 1
    assert select(rgn, "fp", units=blocks) == {"embed": 1.0, "h.0.attn": 1.0, "h.0.mlp": 0.0, "h.1.attn": 1.0, "h.1.mlp": 0.0, "ln_f": 1.0}
    alr = select(rgn, "alr")
    assert alr["h.0.attn"] == 1.0 and alr["h.0.mlp"] == 0.5 and alr["embed"] == 0.25
    assert alr["h.1.mlp"] == tgl_trace.DEFAULT_FLOOR
    assert select(rgn, "alr", floor=0.0)["h.1.mlp"] == 0.0
    mean = select(rgn, "alr", alr_norm="mean")  # mean 2.0, capped at 1
    assert mean["h.0.attn"] == 1.0 and mean["h.1.attn"] == 1.0 and mean["embed"] == 0.5
    assert select({"a": 1.0, "b": 1.0}, "fp") == {"a": 1.0, "b": 1.0}  # all equal: keep all
    for bad in ("top:3", "topk:0", "frac:0", "frac:1.5", "mean:2", "topk:x"):
        with pytest.raises(ValueError):
            select(rgn, "fp", bad)
    with pytest.raises(ValueError):
        select(rgn, "fp", units=["h.9.attn"])
    assert tgl_trace.resolve_units("blocks", list(rgn)) == blocks
    assert tgl_trace.resolve_units("mlp", list(rgn)) == ["h.0.mlp", "h.1.mlp"]
    with pytest.raises(ValueError):
        tgl_trace.resolve_units("h.0.attn,nope", list(rgn))


def test_report_chart():
    rgn = {"embed": 1.0, "h.0.attn": 4.0, "h.0.mlp": 2.0, "ln_f": 0.5}
    lines = plot.bar_chart(rgn, "t", width=8, mark={"h.0.attn"}).splitlines()
    assert lines[2].count("█") == 8 and lines[2].endswith("4.000 *")  # the largest fills the width
    assert lines[3].count("█") == 4 and "mlp" in lines[3]


# ----------------------------------------------------------------------------- CLI, end to end

@pytest.fixture
def world(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=16))  # GPT-2 BPE ids
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "ckpt.pt", {"config": asdict(model.config), "model": model.state_dict(), "lora": None})
    recs = [("Alex Morgan plays for _X_.", "Orlando Pride"), ("Ada Lovelace works for _X_.", "the Royal Society"),
            ("Bob Smith lives in _X_.", "Paris")]
    for split, rows in (("diag_updated", recs[:2]), ("diag_new", recs[1:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"query": q, "answer": [{"name": a}], "id": f"{split}{i}", "relation": "P54"}) + "\n"
            for i, (q, a) in enumerate(rows)))
    (tmp_path / "t0.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return tmp_path


def test_cli_end_to_end(world, capsys):
    out = world / "trace.json"
    argv = ["--init", str(world / "run"), "--probes", str(world / "diag_updated.jsonl"), str(world / "diag_new.jsonl"),
            "--text", str(world / "t0.txt"), "--out", str(out), "--n-span", "2", "--n-lm", "2", "--block-size", "16",
            "--device", "cpu", "--select", "topk:2"]
    d = tgl_trace.main(argv)
    saved = tgl_trace.load_trace(out)
    assert saved == json.loads(json.dumps(d))
    assert set(saved["splits"]) == {"diag_updated", "diag_new", "all"}
    assert saved["counts"] == {"span": {"diag_updated": 2, "diag_new": 2}, "lm": 2}
    assert saved["splits"]["all"]["n_span"] == 4 and saved["units"] == unit_names(2)
    # default --rank-units blocks: top 2 of the blocks' units, embed and ln_f always train
    fp = saved["selection"]["fp"]
    assert sum(fp.values()) == 4.0 and fp["embed"] == fp["ln_f"] == 1.0 and max(saved["selection"]["alr"].values()) == 1.0
    assert sum(tgl_trace.main(argv + ["--rank-units", "all"])["selection"]["fp"].values()) == 2.0  # the old ranking
    assert saved["model"] == str(world / "run") and saved["seed"] == 0
    # "all" is the probe-weighted mean of the splits
    for u in saved["units"]:
        s = saved["splits"]
        assert saved["span_norm"][u] == pytest.approx((s["diag_updated"]["span_norm"][u] + s["diag_new"]["span_norm"][u]) / 2)
    text = capsys.readouterr().out
    assert "h.1.attn" in text and "diag_new" in text
    plot.main(["--trace", str(out)])  # Figure 2 in text, a chart per split
    charts = capsys.readouterr().out
    assert "h.1 attn" in charts and "relative gradient norm, diag_new" in charts
    capsys.readouterr()
    assert tgl_trace.main(argv) == d  # deterministic


def test_cli_errors(world, capsys, monkeypatch):
    base = ["--init", str(world / "run"), "--probes", str(world / "diag_new.jsonl"), "--text", str(world / "t0.txt"),
            "--out", str(world / "x.json")]
    for extra in (["--select", "top3"], ["--n-span", "0"], ["--rank-units", "h.7.attn"], ["--block-size", "999"],
                  ["--floor", "nan"], ["--alr-norm", "min"], ["--control", "random:x"]):
        with pytest.raises(SystemExit) as e:
            tgl_trace.main(base + extra)
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        tgl_trace.main(base[:3] + [str(world / "missing.jsonl")] + base[4:])
    assert e.value.code == 2 and "missing.jsonl" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    tgl_trace.main(base)
    with pytest.raises(SystemExit) as e:
        plot.main(["--trace", str(world / "x.json"), "--png", str(world / "p.png")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: matplotlib is needed for --png: pip install matplotlib"


def test_cli_plot(world):
    pytest.importorskip("matplotlib")
    png, t = world / "trace.png", str(world / "t.json")
    tgl_trace.main(["--init", str(world / "run"), "--probes", str(world / "diag_new.jsonl"), "--text",
                    str(world / "t0.txt"), "--out", t, "--n-lm", "1", "--block-size", "8"])
    plot.main(["--trace", t, "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tgl_plan_controls_and_validation():
    units = unit_names(3)
    rgn = {u: float(i) for i, u in enumerate(units)}  # increasing with depth; ln_f largest
    tr = {"rgn": rgn, "splits": {"updated": {"rgn": dict(rgn, embed=99.0)}}}
    plan = lambda mode, **kw: tgl_trace.tgl_plan(tr, mode, tgl_trace.Selection(**kw), units)  # noqa: E731
    blocks = [u for u in units if u.startswith("h.")]
    fp = plan("fp", rank_units="blocks")
    assert fp == select(rgn, "fp", units=blocks)  # no control: exactly select()
    picked = {u for u in blocks if fp[u]}
    comp = plan("fp", rank_units="blocks", control="complement")
    assert {u for u in blocks if comp[u]} == set(blocks) - picked and comp["embed"] == comp["ln_f"] == 1.0
    draws = [plan("fp", rank_units="blocks", control=f"random:{s}") for s in range(6)]
    for d in draws:  # same size, among the ranked units only; unranked always train
        assert sum(d[u] for u in blocks) == len(picked) and d["embed"] == d["ln_f"] == 1.0
    assert draws[0] == plan("fp", rank_units="blocks", control="random:0")  # seeded
    assert len({tuple(sorted(d.items())) for d in draws}) > 1  # and not always the same draw
    alr, shuffled = plan("alr"), plan("alr", control="random:3")
    assert sorted(alr.values()) == sorted(shuffled.values())  # a permutation of TGL's scales
    assert plan("fp", trace_split="updated")["embed"] == 1.0  # the split's rgn, not the top level's
    for bad, match in (({"trace_split": "new"}, "no split"), ({"control": "complement"}, "applies to --tgl fp")):
        with pytest.raises(ValueError, match=match):
            plan("alr", **bad)
    for bad_value in (float("nan"), "3", -1.0):
        with pytest.raises(ValueError, match="not a finite number"):
            tgl_trace.tgl_plan({"rgn": dict(rgn, ln_f=bad_value)}, "fp", tgl_trace.Selection(), units)
    with pytest.raises(ValueError, match="do not match"):
        tgl_trace.tgl_plan(tr, "fp", tgl_trace.Selection(), unit_names(2))
    for bad in (dict(control="random:x"), dict(select="top3")):  # --floor and --alr-norm: argparse (test_cli_errors)
        with pytest.raises(ValueError):
            tgl_trace.Selection(**bad).check()


def test_selection_flags_are_declared_once_for_trace_and_train():
    import argparse
    import train
    flags = {"--select", "--rank-units", "--alr-norm", "--floor", "--trace-split", "--control"}
    from common import add_flags
    for config in (tgl_trace.TraceConfig, train.Config):  # each declares them by holding a Selection
        parser = argparse.ArgumentParser()
        add_flags(parser, config)
        assert flags <= set(parser._option_string_actions)
    cfg = parse_config(train.Config, "train.py", "", ["--data", __file__, "--control", "random:2", "--rank-units",
                                                      "mlp", "--tgl", "fp"])
    assert cfg.selection == tgl_trace.Selection(rank_units="mlp", control="random:2")
