"""probe.py: scorer vs a hand computation and transformers, batched == one at a time (right padding changes
nothing), several answers, the CLI. Runs side by side (experiments/compare.py): test_compare.py."""
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import probe
from experiments import textppl
from data import GPT2Tokenizer, WordTokenizer, span_example
from experiments.probe_files import Probe, read_probes
from checkpoint import save_checkpoint
from model import GPT, GPTConfig

WORDS = "Ann Bob Cid Dee plays for works at lives in Kugo Rovers United Acme Labs Oslo Rome Paris the city of .".split()


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer.build([" ".join(WORDS)])


def tiny(vocab, block_size=32, neo=False, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32)
    if neo:  # GPT-Neo: local attention in layer 1 with a short window, no q.k scaling
        cfg.attention_layers, cfg.window_size, cfg.scale_attn, cfg.qkv_bias = ["global", "local"], 3, False, False
        cfg.arch = "gpt_neo"
    return GPT(cfg)


def probes_for_test():
    return [
        Probe("a", "Ann plays for", ["Kugo Rovers"], "updated"),
        Probe("b", "Ann plays for", ["Kugo United", "Rome", "Kugo Rovers"], "updated"),  # shares a's prompt
        Probe("c", "Bob works at", ["Acme Labs"], "new"),
        Probe("d", "Cid lives in the city of", ["Oslo"], "unchanged"),
        Probe("e", "Dee lives in", ["Paris", "Rome"], "unchanged"),
        Probe("f", "", ["Oslo"], "new"),  # no prompt: end-of-text is the context
    ]


def by_hand(model, tok, pr):
    """(nll, n_tokens, em) of the best answer, straight from model(idx) and F.cross_entropy."""
    best, em = None, 0
    for ans in pr.answers:
        idx, tgt = span_example(tok, pr.prompt, ans)
        with torch.no_grad():
            logits, _ = model(torch.tensor([idx]))
        tgt = torch.tensor(tgt)
        nll = F.cross_entropy(logits[0], tgt, ignore_index=-1, reduction="sum").item()
        n = int((tgt != -1).sum())
        em |= int(bool((logits[0].argmax(-1) == tgt)[tgt != -1].all()))
        if best is None or nll / n < best[0] / best[1]:
            best = (nll, n)
    return best[0], best[1], em


@pytest.mark.parametrize("neo", [False, True])
def test_score_matches_hand_computation(tok, neo):
    model = tiny(tok.n_vocab, neo=neo)
    probes = probes_for_test()
    for pr, r in zip(probes, probe.score(model, tok, probes)):
        nll, n, em = by_hand(model, tok, pr)
        assert r["id"] == pr.id and r["split"] == pr.split
        assert r["n_tokens"] == n and r["em"] == em
        assert r["nll"] == pytest.approx(nll, rel=1e-5, abs=1e-5)
        assert r["nll_per_token"] == pytest.approx(nll / n, rel=1e-5, abs=1e-5)


def test_batched_equals_one_at_a_time_and_padding_changes_nothing(tok, monkeypatch):
    model = tiny(tok.n_vocab, neo=True)  # the local layer's window mask is built inside attention too
    probes = probes_for_test()
    many = probe.score(model, tok, probes, batch_size=64)
    assert len({len(probe.probe_example(tok, pr, a, 32, "span")[0]) for pr in probes for a in pr.answers}) > 2
    for pr, r in zip(probes, many):  # alone, a probe's rows are padded less (or not at all)
        single = probe.score(model, tok, [pr], batch_size=1)[0]
        assert single["nll"] == pytest.approx(r["nll"], rel=1e-5, abs=1e-6) and single["em"] == r["em"]
        assert r["nll"] == pytest.approx(by_hand(model, tok, pr)[0], rel=1e-5, abs=1e-6)
    monkeypatch.setattr(probe, "MAX_TOKENS", 1)  # the token cap: every batch is one row
    assert [r["nll"] for r in probe.score(model, tok, probes)] == pytest.approx([r["nll"] for r in many], rel=1e-5)
    x, y = probe.probe_example(tok, probes[3], "Oslo", 32, "span"), ([1, 2] + [0] * 20, [-1] * 22)
    alone, padded = probe.score_rows(model, [x], 64, "cpu"), probe.score_rows(model, [x, y], 64, "cpu")
    assert padded[0] == pytest.approx(alone[0], rel=1e-6)  # one batch, 14 pad positions after x: same score


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_score_equals_transformers_one_by_one(tmp_path, tok, arch):
    """The reference: transformers' model with the same weights, one (probe, answer) per forward."""
    from transformers import AutoModelForCausalLM
    from experiments.export import save_hf
    model = tiny(tok.n_vocab, neo=arch == "gpt_neo")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases and LayerNorms count too
    save_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for pr, r in zip(probes_for_test(), probe.score(model, tok, probes_for_test())):
        nll, n, em = by_hand(lambda x: (hf(x).logits, None), tok, pr)
        assert (r["n_tokens"], r["em"]) == (n, em) and r["nll"] == pytest.approx(nll, rel=1e-4, abs=1e-4)


def test_best_answer_counts_and_em():
    """A model that always predicts 'Rovers' gets the exact match on the answer 'Rovers'."""
    tok = WordTokenizer.build(["Ann plays for Rovers United"])
    model = tiny(tok.n_vocab)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied with wte: all logits 0 except the bias we add below
        model.transformer.wte.weight[tok.index["Rovers"]] = 1.0
        for b in model.transformer.h:
            b.attn.c_proj.weight.zero_(), b.mlp.c_proj.weight.zero_()
        model.transformer.ln_f.weight.fill_(0.0), model.transformer.ln_f.bias.fill_(1.0)
    r = probe.score(model, tok, [Probe("x", "Ann plays for", ["United", "Rovers", "Rovers United"], "s")])[0]
    assert r["em"] == 1 and r["n_tokens"] == 1  # 'Rovers' is greedy and the best answer
    r = probe.score(model, tok, [Probe("y", "Ann plays for", ["United", "Rovers United"], "s")])[0]
    # both miss ('United' is never greedy); 'Rovers United' has the lower NLL per token (~32/2 vs ~32)
    assert r["em"] == 0 and r["n_tokens"] == 2 and r["nll_per_token"] == pytest.approx(16.0, abs=0.01)


def test_score_restores_mode_and_leaves_no_grad(tok):
    model = tiny(tok.n_vocab)
    model.train()
    probe.score(model, tok, probes_for_test())
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    probe.score(model, tok, probes_for_test())
    assert not model.training


def test_prompt_longer_than_context_is_an_error(tok):
    model = tiny(tok.n_vocab, block_size=4)
    with pytest.raises(ValueError, match="probe d: .* longer than the model's context"):
        probe.score(model, tok, probes_for_test()[3:4])


def test_gpt2_tokenizer_scoring():
    tok = GPT2Tokenizer()
    model = tiny(tok.n_vocab)
    probes = [Probe("p", "The capital of France is", ["Paris", "Lyon"], "s"), Probe("q", "Alex Morgan plays for",
              ["United States women's national soccer team", "Orlando Pride"], "s")]
    for pr, r in zip(probes, probe.score(model, tok, probes, batch_size=1)):
        nll, n, em = by_hand(model, tok, pr)
        assert r["nll"] == pytest.approx(nll, rel=1e-5) and r["n_tokens"] == n


def test_summarize():
    res = [{"split": "a", "nll": 2.0, "n_tokens": 1, "em": 1}, {"split": "a", "nll": 4.0, "n_tokens": 3, "em": 0},
           {"split": "b", "nll": 0.0, "n_tokens": 2, "em": 1}]
    s = probe.summarize(res)
    assert s["a"] == {"ppl": pytest.approx(math.exp(6.0 / 4)), "em": 0.5, "n": 2}
    assert s["b"] == {"ppl": 1.0, "em": 1.0, "n": 1}
    assert probe.evaluate(tiny(50), WordTokenizer(["<eot>", "<unk>", "x"]), [Probe("i", "x", ["x"], "z")])["z"]["n"] == 1


def test_cli_json(tmp_path, tok, capsys):
    run = tmp_path / "run"
    run.mkdir()
    model = tiny(tok.n_vocab)
    save_checkpoint(run / "ckpt.pt", {"config": asdict(model.config), "model": model.state_dict(), "lora": None,
                                      "step": 0, "tokenizer": "word"})
    tok.save(run / "tokenizer.json")
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"query": f"{q} _X_.", "answer": a, "split": s}) + "\n" for q, a, s in
                          [("Ann plays for", "Kugo Rovers", "updated"), ("Bob works at", "Acme Labs", "new")]))
    out = tmp_path / "out.json"
    summary = probe.main(["--init", str(run), "--probes", str(pf), "--json", str(out)])
    table = capsys.readouterr().out
    assert "updated" in table and "new" in table and set(summary) == {"updated", "new"}
    assert table.splitlines()[0].split() == ["split", "n", "ppl", "EM", "%"] and "{" not in table
    d = json.loads(out.read_text())
    assert d["summary"] == summary and len(d["results"]) == 2
    expect = probe.summarize(probe.score(model, tok, read_probes(pf)))
    assert summary["new"]["ppl"] == pytest.approx(expect["new"]["ppl"], rel=1e-5)
    for bad in (["--init", str(run), "--probes", str(tmp_path / "none.jsonl")], ["--probes", str(pf)],
                ["--init", str(run)], ["--init", str(run), "--probes", str(pf), "--compare", str(out)]):
        with pytest.raises(SystemExit) as e:
            probe.main(bad)
        assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_sentence_metric_scores_every_token_of_the_sentence(tok):
    model = tiny(tok.n_vocab).eval()
    probes = probes_for_test()
    got = probe.score(model, tok, probes, metric="sentence")
    for pr, r in zip(probes, got):
        best = None
        for ans in pr.answers:  # by hand: <eot> then 'prompt answer', every token a target
            ids = [tok.eot] + tok.encode(f"{pr.prompt} {ans}".strip())
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids[:-1]]))
            nll = F.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="sum").item()
            if best is None or nll / (len(ids) - 1) < best[0] / best[1]:
                best = (nll, len(ids) - 1)
        assert r["nll"] == pytest.approx(best[0], rel=1e-4) and r["n_tokens"] == best[1], pr.id
    span = probe.score(model, tok, probes)
    assert all(s["n_tokens"] < t["n_tokens"] for s, t in zip(span, got) if probes[[p.id for p in probes].index(s["id"])].prompt)
    with pytest.raises(ValueError, match="--metric"):
        probe.score(model, tok, probes, metric="word")


def test_text_ppl_is_the_mean_nll_of_consecutive_windows(tok):
    model = tiny(tok.n_vocab, block_size=8).eval()
    tokens = torch.randint(0, tok.n_vocab, (50,), generator=torch.Generator().manual_seed(0)).numpy()
    got, scored = textppl.text_ppl(model, tokens, n_tokens=40, batch_size=2)
    nlls = []
    for s in range(0, 41 - 8, 8):  # windows 0..7 -> 1..8, ..., 32..39 -> 33..40: 5 windows, 40 targets
        with torch.no_grad():
            logits, _ = model(torch.tensor(tokens[s:s + 8], dtype=torch.long)[None])
        nlls.append(F.cross_entropy(logits[0], torch.tensor(tokens[s + 1:s + 9], dtype=torch.long), reduction="sum").item())
    assert len(nlls) == 5 and scored == 40 and got == pytest.approx(math.exp(sum(nlls) / 40), rel=1e-5)
    with pytest.raises(ValueError, match="too few"):
        textppl.text_ppl(model, tokens[:1])
