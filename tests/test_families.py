"""The model families beside GPT-2: GPT-NeoX (Pythia), Llama (GQA, untied head, Llama 3 rope scaling) and Qwen2
(q/k/v biases, tied head). Tiny random models written by transformers itself (the numerical reference, imported
inside tests only): their logits, shards, bf16 files, the export back, trace hooks, SDPA, the training methods
on top, the hub download, and the options refused."""
import copy
import json
import random
from argparse import Namespace

import pytest
import torch

import data
import model as M
import train
from checkpoint import load_checkpoint
from experiments import export
from experiments import hf as H
from test_model import forward_and_grads
from test_trace import assert_close, examples, reference

V = 128  # >= the word vocabulary of the training tests
IDX = torch.randint(0, V, (2, 23), generator=torch.Generator().manual_seed(1))
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # with rope_theta 100 and head size 8: all three bands


def hf_config(family):
    import transformers as T
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    if family.startswith("gpt_neox"):  # Pythia: partial rotary, parallel residual; also the sequential form
        rope = {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}
        return T.GPTNeoXConfig(**common, rope_parameters=rope, use_parallel_residual=family == "gpt_neox")
    if family == "llama":
        return T.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                             rope_parameters=dict(LLAMA3, rope_theta=100.0))
    return T.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)


FAMILIES = ["gpt_neox", "gpt_neox_sequential", "llama", "qwen2"]


def reference_model(family, seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(hf_config(family)).eval()
    with torch.no_grad():  # default init leaves biases 0 and norms 1: make every weight count
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, the transformers model, the folder it saved itself into)."""
    ref = reference_model(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    ref.save_pretrained(folder)
    return Namespace(name=request.param, ref=ref, folder=folder)


def logits(model, idx=IDX):
    with torch.no_grad():
        out = model.eval()(idx)
    return out[0] if isinstance(out, tuple) else out.logits


def test_logits_match_transformers(family):
    ours = H.load_hf(str(family.folder))
    c = ours.config
    assert c.arch == family.name.removesuffix("_sequential")
    want = logits(family.ref)
    assert want.std() > 0.1  # the comparison means something
    assert (logits(ours) - want).abs().max() < 1e-4
    names = dict(ours.named_parameters())
    if c.arch == "gpt_neox":
        assert c.rotary_pct == 0.5 and c.rope_theta == 100.0 and c.parallel_residual == (family.name == "gpt_neox")
        assert c.mlp == "gelu" and not c.tie_embeddings and "transformer.wpe.weight" not in names
    if c.arch == "llama":
        assert c.n_kv_head == 2 and c.rope_scaling == {k: v for k, v in LLAMA3.items() if k != "rope_type"}
        assert "lm_head.weight" in names and M.unit_of("lm_head.weight") == "embed"  # untied, own matrix
        ours.config.rope_scaling = None  # the scaling matters: without it the logits differ
        assert (logits(ours) - want).abs().max() > 1e-3
    if c.arch == "qwen2":
        assert c.qkv_bias and not c.bias and c.n_kv_head == 2 and c.rms_norm and c.mlp == "swiglu"
        assert ours.lm_head.weight is ours.transformer.wte.weight and "lm_head.weight" not in names


def test_config_json_as_older_transformers_wrote_it(family, tmp_path):
    """Hub checkpoints predate transformers 5: rope_theta and rope_scaling (GPT-NeoX: rotary_pct,
    rotary_emb_base) instead of rope_parameters."""
    cfg = json.loads((family.folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    if cfg["model_type"] == "gpt_neox":
        cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"], rope_scaling=None)
    else:
        cfg.update(rope_theta=rope["rope_theta"], rope_scaling=rope if rope["rope_type"] == "llama3" else None)
    for f in family.folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert (logits(H.load_hf(str(tmp_path))) - logits(family.ref)).abs().max() < 1e-4


def test_sharded_folder_loads_shard_by_shard(family, tmp_path, monkeypatch):
    family.ref.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(set(json.loads((tmp_path / H.INDEX).read_text())["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    read, held = H.read_safetensors, []

    def counted(path):
        held.append(path)
        return read(path)
    monkeypatch.setattr(H, "read_safetensors", counted)
    monkeypatch.setattr(H, "weight_files", lambda folder, wf=H.weight_files: [(p, counted) for p, _ in wf(folder)])
    ours = H.load_hf(str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in held) == shards  # each shard read once
    assert (logits(ours) - logits(family.ref)).abs().max() < 1e-4


def test_a_bad_index_or_a_lost_shard_is_one_line(tmp_path):
    reference_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / H.INDEX).read_text())
    lost = index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    saved = (tmp_path / lost).read_bytes()
    (tmp_path / lost).unlink()
    with pytest.raises(OSError):  # a shard the index names is not there: the OS error names it
        H.load_hf(str(tmp_path))
    (tmp_path / lost).write_bytes(saved)
    for bad in ("../elsewhere.safetensors", 7):
        index["weight_map"]["model.norm.weight"] = bad
        (tmp_path / H.INDEX).write_text(json.dumps(index))
        with pytest.raises(ValueError, match="weight_map"):
            H.load_hf(str(tmp_path))


def test_bf16_file(family, tmp_path):
    rounded = reference_model(family.name)
    with torch.no_grad():  # the fp32 reference computes with the weights the bf16 file holds
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    copy.deepcopy(rounded).to(torch.bfloat16).save_pretrained(tmp_path)  # its rotary table stays fp32
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    ours = H.load_hf(str(tmp_path))
    assert ours.transformer.wte.weight.dtype == torch.float32
    assert (logits(ours) - logits(rounded)).abs().max() < 1e-4


def test_export_reloads_in_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM
    ours = H.load_hf(str(family.folder))
    M.add_lora(ours, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LoRA B too: the merge is exercised
    want = logits(ours)
    export.save_hf(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == ours.config.arch
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(ref).__name__ == H.CLASS[ours.config.arch]
    assert (logits(ref) - want).abs().max() < 1e-4
    assert (logits(H.load_hf(str(tmp_path / "out"))) - want).abs().max() < 1e-4


def test_trace_hooks_equal_autograd(family):
    from trace import trace
    model = H.load_hf(str(family.folder))
    span, lm = examples()
    d = trace(model, span, lm)
    assert_close(d["span_norm"], reference(model, span))
    assert_close(d["lm_norm"], reference(model, lm))
    assert d["units"] == M.unit_names(2) and all(v > 0 for v in d["span_norm"].values())


def test_sdpa_equals_written_out(family, monkeypatch):
    model = H.load_hf(str(family.folder))
    fast, fast_grads = forward_and_grads(model, True, monkeypatch)
    slow, slow_grads = forward_and_grads(model, False, monkeypatch)
    assert fast.std() > 0.1 and (fast - slow).abs().max() < 1e-5
    for n, g in fast_grads.items():
        assert g.abs().max() > 0, n
        assert (g - slow_grads[n]).abs().max() < 1e-5 * max(1.0, g.abs().max().item()), n


def test_lora_finds_every_linear_and_generate_runs(family):
    model = H.load_hf(str(family.folder))
    M.add_lora(model, rank=2)
    adapted = [n for n, p in model.named_parameters() if n.endswith("lora_A")]
    assert len(adapted) == 4 * 2  # c_attn, c_proj, c_fc, c_proj in each of the 2 blocks
    assert {M.unit_of(n) for n in adapted} == set(M.unit_names(2)[1:-1])
    out = model.generate(IDX[:, :5], 4)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], IDX[:, :5])
    assert torch.equal(out[:, 5], logits(model, IDX[:, :5])[:, -1].argmax(-1))


# ----------------------------------------------------------------------------- refusals

def _edit(cfg, change):
    return {**cfg, **change}


REFUSED = [
    ("llama", {"model_type": "mistral"}, "mistral"),  # sliding window by design
    ("llama", {"model_type": "qwen3"}, "qwen3"),  # QK-norm
    ("llama", {"model_type": "mixtral"}, "mixtral"),  # MoE
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"head_dim": 16}, "head_dim"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 100.0}}, "yarn"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ("gpt_neox", {"attention_bias": False}, "attention_bias"),
    ("gpt_neox", {"hidden_act": "relu"}, "hidden_act"),
]


@pytest.mark.parametrize("name,change,word", REFUSED, ids=[w for _, _, w in REFUSED])
def test_unsupported_options_refused_in_one_line(name, change, word, tmp_path):
    ref = reference_model(name)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(_edit(cfg, change)))
    with pytest.raises(ValueError) as e:
        H.load_hf(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and word in msg and "config.json" in msg, msg


def test_a_mix_of_families_is_not_exported(tmp_path):
    model = M.GPT(M.GPTConfig(block_size=16, vocab_size=V, n_layer=1, n_head=2, n_embd=16, arch="llama",
                              rms_norm=True, mlp="swiglu", rotary_pct=1.0, bias=False))  # q/k/v biases: not Llama
    with pytest.raises(ValueError, match="no Hugging Face model matches"):
        export.save_hf(model, tmp_path / "x")


def test_hub_names_and_local_paths(tmp_path):
    assert H.is_hub_name("EleutherAI/pythia-160m") and H.is_hub_name("Qwen/Qwen2.5-0.5B") and H.is_hub_name("gpt2")
    assert not H.is_hub_name("runs/base/ckpt.pt") and not H.is_hub_name("nope") and not H.is_hub_name("a/b/c")
    assert not H.is_hub_name(str(tmp_path))  # exists: a local folder
    with pytest.raises(ValueError, match="nor a hub name"):
        H.load_hf(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- the hub

def test_any_hub_name_downloads_shards_and_tokenizer_files(server, tmp_path):
    ref = reference_model("llama")
    ref.save_pretrained(tmp_path / "repo", max_shard_size="20KB")
    (tmp_path / "repo" / "tokenizer.json").write_text('{"model": {}}')
    for f in (tmp_path / "repo").iterdir():
        server.files[f"/someone/tiny-llama/resolve/main/{f.name}"] = f.read_bytes()
    ours = H.load_hf("someone/tiny-llama")
    assert (logits(ours) - logits(ref)).abs().max() < 1e-4
    cache = tmp_path / "cache" / "someone--tiny-llama"
    assert (cache / "tokenizer.json").is_file() and (cache / H.INDEX).is_file()
    asked = {p.rsplit("/", 1)[1] for p, _ in server.log}
    assert {"model.safetensors", "tokenizer_config.json"} <= asked  # tried; 404: absent, fine
    n = len(server.log)
    H.load_hf("someone/tiny-llama")
    assert len(server.log) == n  # complete in the cache: no request
    with pytest.raises(ValueError, match="no such hub model"):
        H.load_hf("someone/missing")


# ----------------------------------------------------------------------------- the method on top

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Word-level text: new.txt (a* words), old.txt (b* words), probes on new facts, a trace file."""
    d = tmp_path_factory.mktemp("fworld")
    rng = random.Random(0)
    new, old = [f"a{i}" for i in range(40)], [f"b{i}" for i in range(40)]
    for name, words in (("new", new), ("old", old)):
        (d / f"{name}.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(20)) + " ."
                                                   for _ in range(40)))
    data.WordTokenizer.build([" ".join(new + old + ["."])]).save(str(d / "tokenizer.json"))
    with open(d / "probes.jsonl", "w") as f:
        for i in range(4):
            probe = {"query": f"a{i} a{i + 1} _X_.", "answer": [{"name": f"a{i + 2}"}], "id": f"p{i}"}
            f.write(json.dumps(probe) + "\n")
    rgn = {u: (4.0 if u in ("h.0.attn", "h.1.mlp") else 1.0) for u in M.unit_names(2)}
    (d / "trace.json").write_text(json.dumps({"units": M.unit_names(2), "rgn": rgn}))
    return d


def fit(world, family, out, *extra):
    argv = ["--init", str(family.folder), "--data", str(world / "new.txt"), "--out", str(out), "--steps", "3",
            "--lr", "1e-3", "--tokenizer", str(world / "tokenizer.json"), "--block-size", "16", "--batch-size",
            "2", "--log-every", "1", "--warmup", "0", "--threads", "1"] + list(extra)
    return train.main(argv)


def test_tgl_fp_and_alr_runs(family, world, tmp_path, capsys):
    fit(world, family, tmp_path / "fp", "--tgl", "fp", "--trace", str(world / "trace.json"))
    assert "| frozen: h.0.mlp h.1.attn\n" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "fp" / "ckpt.pt")
    assert ck["config"]["arch"] == family.name.removesuffix("_sequential")
    base = H.load_hf(str(family.folder)).state_dict()
    for n, w in ck["model"].items():  # frozen units unchanged, trained ones moved
        assert torch.equal(w, base[n]) == (M.unit_of(n) in ("h.0.mlp", "h.1.attn")), n
    out = fit(world, family, tmp_path / "alr", "--tgl", "alr", "--trace", str(world / "trace.json"))
    assert out["final_loss"] > 0


@pytest.mark.parametrize("method", [["--method", "lora", "--tgl", "fp"], ["--method", "recadam"],
                                    ["--method", "mixreview", "--replay-ratio", "0.5"]], ids=lambda m: m[1])
def test_methods_run_on_llama(world, tmp_path, method):
    fam = Namespace(folder=tmp_path / "hf", name="llama")
    reference_model("llama").save_pretrained(fam.folder)
    extra = ["--replay-data", str(world / "old.txt")] if "mixreview" in method else []
    extra += ["--trace", str(world / "trace.json")] if "--tgl" in method else []
    out = fit(world, fam, tmp_path / "run", *method, *extra, "--probes", str(world / "probes.jsonl"))
    assert out["final_loss"] > 0 and out["probes"]
    if "lora" in method:
        assert {M.unit_of(n) for n in load_checkpoint(tmp_path / "run" / "ckpt.pt")["model"] if "lora_" in n} == \
            {"h.0.attn", "h.1.mlp"}


def test_resume_matches_uninterrupted_on_qwen2(world, tmp_path, monkeypatch):
    fam = Namespace(folder=tmp_path / "hf", name="qwen2")
    reference_model("qwen2").save_pretrained(fam.folder)
    extra = ["--steps", "6", "--save-every", "3", "--dropout", "0.1"]
    fit(world, fam, tmp_path / "a", *extra)
    real_next = data.Stream.next

    def crash(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_next(self, step)
    monkeypatch.setattr(data.Stream, "next", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(world, fam, tmp_path / "b", *extra)
    monkeypatch.setattr(data.Stream, "next", real_next)
    fit(world, fam, tmp_path / "b", *extra, "--resume")
    wa, wb = (load_checkpoint(tmp_path / r / "ckpt.pt")["model"] for r in "ab")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_ddp_two_processes_match_one_on_llama(world, tmp_path):
    import os
    import subprocess
    import sys
    fam = Namespace(folder=tmp_path / "hf", name="llama")
    reference_model("llama").save_pretrained(fam.folder)
    extra = ["--steps", "3", "--batch-size", "4", "--grad-accum", "2"]
    fit(world, fam, tmp_path / "one", *extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--init", str(fam.folder), "--data", str(world / "new.txt"), "--out", str(tmp_path / "two"), "--lr", "1e-3",
           "--tokenizer", str(world / "tokenizer.json"), "--block-size", "16", "--log-every", "1", "--warmup", "0",
           "--threads", "1", "--overwrite"] + extra
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for attempt in range(2):  # one retry, as test_train's DDP test (gloo's setup on a loaded machine)
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr[-2000:]
    w1, w2 = (load_checkpoint(tmp_path / r / "ckpt.pt")["model"] for r in ("one", "two"))
    assert max((w1[n] - w2[n]).abs().max().item() for n in w1) < 1e-5

