"""model.py and checkpoint.py: logits against transformers, the checkpoint layouts, written-out attention
against SDPA, generate, LoRA, units, safetensors errors, the download cache. transformers is imported inside
tests only: it is the numerical reference. The export back to the Hugging Face layout: test_export.py."""
import json

import pytest
import torch

import common
import checkpoint as C
import model as M
from experiments import fetch
from experiments import hf as H
from experiments.export import write_safetensors

VOCAB = 61


def tiny_gpt2_hf(tmp_path, **kw):
    """A random tiny GPT-2 written by transformers itself (large init so differences would show)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_inner=24, n_positions=32, vocab_size=VOCAB,
                     initializer_range=0.3, bos_token_id=0, eos_token_id=0, **kw)
    ref = GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


def tiny_neo_hf(tmp_path):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    torch.manual_seed(0)
    cfg = GPTNeoConfig(num_layers=4, num_heads=2, hidden_size=16, max_position_embeddings=32, vocab_size=VOCAB,
                       attention_types=[[["global", "local"], 2]], window_size=3, initializer_range=0.3,
                       bos_token_id=0, eos_token_id=0)
    ref = GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():  # default init leaves biases and LayerNorms at 0 / 1: make every weight count
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


def ref_logits(ref, idx):
    with torch.no_grad():
        return ref(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


def tiny(arch="gpt2"):
    torch.manual_seed(0)
    if arch == "gpt2":
        return M.GPT(M.GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16))
    return M.GPT(M.GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, arch="gpt_neo",
                             qkv_bias=False, scale_attn=False, attention_layers=["global", "local"], window_size=3))


IDX = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- against transformers

def test_gpt2_logits_match_transformers(tmp_path):
    ref, folder = tiny_gpt2_hf(tmp_path)
    ours = H.load_hf(str(folder))
    assert ours.config.n_inner == 24 and ours.config.arch == "gpt2"
    want = ref_logits(ref, IDX)
    assert want.std() > 0.1  # the comparison means something
    assert (our_logits(ours, IDX) - want).abs().max() < 1e-4


def test_gpt_neo_logits_match_transformers_with_local_layers(tmp_path):
    ref, folder = tiny_neo_hf(tmp_path)
    ours = H.load_hf(str(folder))
    c = ours.config
    assert c.attention_layers == ["global", "local"] * 2 and c.window_size == 3 and not c.scale_attn
    assert IDX.shape[1] > c.window_size
    want = ref_logits(ref, IDX)
    assert (our_logits(ours, IDX) - want).abs().max() < 1e-4
    # the local window matters here: treating every layer as global gives different logits
    ours.transformer.h[1].attn.window = None
    assert (our_logits(ours, IDX) - want).abs().max() > 1e-3


def test_gpt_neo_old_file_with_buffers_head_and_f16(tmp_path):
    ref, folder = tiny_neo_hf(tmp_path)
    sd = {k: v.half() for k, v in ref.state_dict().items()}  # lm_head.weight included (tied: equal to wte)
    for i in range(4):
        sd[f"transformer.h.{i}.attn.attention.bias"] = torch.tril(torch.ones(32, 32, dtype=torch.bool))[None, None]
        sd[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())  # the reference sees the same rounded weights
    ours = H.load_hf(str(folder))
    assert ours.transformer.wte.weight.dtype == torch.float32
    assert (our_logits(ours, IDX) - ref_logits(ref, IDX)).abs().max() < 1e-4
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    torch.save(sd, folder / "pytorch_model.bin")
    assert_one_line_error(lambda: H.load_hf(str(folder)), "lm_head")


def hub_layout(tmp_path, ref):
    """The original hub GPT-2 file: no 'transformer.' prefix, mask buffers stored, no lm_head."""
    sd = {k.removeprefix("transformer."): v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    T = ref.config.n_positions
    for i in range(ref.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "hub"
    folder.mkdir()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: cfg[k] for k in (
        "model_type", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "layer_norm_epsilon")}))
    return sd, folder


def test_hub_layout_safetensors_and_bin(tmp_path):
    ref, _ = tiny_gpt2_hf(tmp_path)
    sd, folder = hub_layout(tmp_path, ref)
    want = ref_logits(ref, IDX)
    torch.save(sd, folder / "pytorch_model.bin")  # the fallback old repositories need
    assert (our_logits(H.load_hf(str(folder)), IDX) - want).abs().max() < 1e-4
    write_safetensors(folder / "model.safetensors", {k: v.float() for k, v in sd.items()})
    assert (our_logits(H.load_hf(str(folder)), IDX) - want).abs().max() < 1e-4


# ----------------------------------------------------------------------------- the model itself

@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_causality(arch):
    model = tiny(arch).eval()
    x = IDX.clone()
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % VOCAB
    a, b = our_logits(model, x), our_logits(model, x2)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_ignores_minus_one_targets():
    model = tiny().eval()
    targets = torch.full_like(IDX, -1)
    targets[0, 5], targets[1, 9], targets[1, 10] = 3, 7, 11
    logits, loss = model(IDX, targets)
    kept = targets != -1
    want = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert torch.allclose(loss, want, atol=1e-6)


def test_lora_zero_start_and_merge():
    model = tiny()
    before = our_logits(model, IDX)
    M.add_lora(model, rank=4, alpha=8.0, units={"h.1.attn", "h.0.mlp"})
    assert torch.equal(our_logits(model, IDX), before)  # B = 0: unchanged at start
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert {M.unit_of(n) for n in trainable} == {"h.1.attn", "h.0.mlp"}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    unmerged = our_logits(model, IDX)
    assert not torch.allclose(unmerged, before)
    M.merge_lora(model)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert (our_logits(model, IDX) - unmerged).abs().max() < 1e-4


def test_unit_of_covers_every_parameter_once():
    model = tiny()
    M.add_lora(model, rank=2)
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # tied, listed once
    units = [M.unit_of(n) for n in names]
    assert set(units) == set(M.unit_names(2))
    assert len(names) == len(set(names)) == sum(p.numel() > 0 for p in model.parameters())
    assert M.unit_of("transformer.h.1.ln_1.weight") == "h.1.attn"
    assert M.unit_of("transformer.h.1.mlp.c_proj.lora_B") == "h.1.mlp"
    with pytest.raises(ValueError):
        M.unit_of("transformer.bogus")


def forward_and_grads(model, use_sdpa, monkeypatch):
    """Logits and every parameter's gradient of a loss that weighs each logit differently."""
    monkeypatch.setattr(M.CausalSelfAttention, "use_sdpa", use_sdpa)
    model.zero_grad()
    logits, _ = model.eval()(IDX)
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_written_out_attention_equals_sdpa(arch, monkeypatch):
    model = tiny(arch)
    with torch.no_grad():  # GPT-2's init leaves biases 0, scores small: make every term count
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if arch == "gpt_neo":  # a local layer shorter than the sequence: the window mask is exercised
        assert model.transformer.h[1].attn.window == 3 < IDX.shape[1]
    fast, fast_grads = forward_and_grads(model, True, monkeypatch)
    slow, slow_grads = forward_and_grads(model, False, monkeypatch)
    assert fast.std() > 0.1
    assert (fast - slow).abs().max() < 1e-5
    for n, g in fast_grads.items():
        assert g.abs().max() > 0, n  # every parameter gets a gradient in both
        assert (g - slow_grads[n]).abs().max() < 1e-5 * max(1.0, g.abs().max().item()), n


def test_mask_causal_and_local():
    model = tiny("gpt_neo")
    glob, loc = (model.transformer.h[i].attn.mask(6, "cpu") for i in (0, 1))
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(glob, j <= i)
    assert torch.equal(loc, (i - j >= 0) & (i - j < 3))


def test_sdpa_is_the_default_path(monkeypatch):
    assert M.CausalSelfAttention.use_sdpa
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    for arch in ("gpt2", "gpt_neo"):
        calls.clear()
        our_logits(tiny(arch), IDX)
        assert len(calls) == 2  # once per layer, local layer included


# ----------------------------------------------------------------------------- generate

def test_generate_appends_n_tokens_the_same_twice():
    model = tiny().train()
    out = model.generate(IDX[:, :5], 7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], IDX[:, :5])
    assert torch.equal(model.generate(IDX[:, :5], 7), out)  # greedy by default: deterministic
    assert model.training  # the mode it had is given back


def test_greedy_is_argmax_step_by_step_and_top_k_1_is_greedy():
    model = tiny().eval()
    with torch.no_grad():  # a sharper model: argmax ties are unlikely
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    idx = IDX[:, :4]
    for _ in range(6):
        idx = torch.cat((idx, our_logits(model, idx)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(IDX[:, :4], 6), idx)
    seeded = [torch.Generator().manual_seed(s) for s in range(4)]
    assert torch.equal(model.generate(IDX[:, :4], 6, temperature=1.0, top_k=1, generator=seeded[0]), idx)
    draws = {tuple(model.generate(IDX[:1, :4], 6, temperature=2.0, generator=g)[0].tolist()) for g in seeded[1:]}
    assert len(draws) > 1  # temperature > 0 without top_k samples: different seeds, different text


def test_generate_past_block_size_crops_the_context():
    model = tiny()  # block_size 32: position 32 does not exist
    start = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    out = model.generate(start, 10)
    assert out.shape == (2, 40) and torch.equal(out[:, :30], start)
    # the last token was predicted from the last 32 tokens only
    want = our_logits(model, out[:, 7:39])[:, -1].argmax(-1)
    assert torch.equal(out[:, 39], want)


# ----------------------------------------------------------------------------- safetensors and errors

def test_safetensors_dtypes_against_the_reference_library(tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 3, 4).bfloat16(),
               "d": torch.zeros(0, 4)}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    save_file(tensors, tmp_path / "ref.safetensors")
    for got in (load_file(tmp_path / "ours.safetensors"), H.read_safetensors(tmp_path / "ref.safetensors"),
                H.read_safetensors(tmp_path / "ours.safetensors")):
        assert got.keys() == tensors.keys()
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t)


def assert_one_line_error(fn, *words):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_corrupt_and_truncated_files(tmp_path):
    write_safetensors(tmp_path / "ok.safetensors", {"w": torch.randn(4, 4)})
    raw = (tmp_path / "ok.safetensors").read_bytes()
    cases = {
        "tiny": raw[:5],
        "header_len": (10**9).to_bytes(8, "little") + raw[8:],
        "json": raw[:8] + b"{not json" + raw[17:],
        "truncated": raw[:-10],
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        assert_one_line_error(lambda: H.read_safetensors(tmp_path / f"{name}.safetensors"), f"{name}.safetensors")
    bad_dtype = json.dumps({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "dtype.safetensors").write_bytes(len(bad_dtype).to_bytes(8, "little") + bad_dtype + bytes(16))
    assert_one_line_error(lambda: H.read_safetensors(tmp_path / "dtype.safetensors"), "I64")
    bad_shape = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "shape.safetensors").write_bytes(len(bad_shape).to_bytes(8, "little") + bad_shape + bytes(16))
    assert_one_line_error(lambda: H.read_safetensors(tmp_path / "shape.safetensors"), "w", "[3]")


def test_wrong_shape_and_missing_key_name_the_tensor(tmp_path):
    ref, folder = tiny_gpt2_hf(tmp_path)
    sd = H.read_safetensors(folder / "model.safetensors")
    sd["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(25)
    write_safetensors(folder / "model.safetensors", sd)
    assert_one_line_error(lambda: H.load_hf(str(folder)), "h.1.mlp.c_fc.bias", "(25,)")
    del sd["transformer.h.1.mlp.c_fc.bias"]
    write_safetensors(folder / "model.safetensors", sd)
    assert_one_line_error(lambda: H.load_hf(str(folder)), "missing", "h.1.mlp.c_fc.bias")
    sd["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(24)
    sd["transformer.h.9.ln_1.weight"] = torch.zeros(16)
    write_safetensors(folder / "model.safetensors", sd)
    assert_one_line_error(lambda: H.load_hf(str(folder)), "unexpected", "h.9.ln_1.weight")
    assert_one_line_error(lambda: H.load_hf(str(tmp_path / "nope")), "nope")


# ----------------------------------------------------------------------------- the download cache

class FakeResponse:
    def __init__(self, body: bytes, status=200, on_chunk=None):
        self.body, self.status_code, self.on_chunk = body, status, on_chunk
        self.headers = {"Content-Length": str(len(body))}

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def raise_for_status(self):
        if self.status_code >= 400:
            import requests
            raise requests.HTTPError(f"{self.status_code}")

    def iter_content(self, chunk_size=1):
        for i in range(0, len(self.body), 7):
            if self.on_chunk:
                self.on_chunk()
            yield self.body[i:i + 7]


def no_network(monkeypatch):
    import requests

    def fail(*a, **k):
        raise AssertionError("a request was made")
    monkeypatch.setattr(requests, "get", fail)
    monkeypatch.setattr(requests, "Session", fail)
    monkeypatch.setattr(requests, "request", fail)


def test_mocked_download_fills_cache_then_cache_makes_no_request(tmp_path, monkeypatch):
    import requests
    ref, folder = tiny_gpt2_hf(tmp_path)
    files = {"config.json": (folder / "config.json").read_bytes()}
    sd, _ = hub_layout(tmp_path, ref)
    torch.save(sd, tmp_path / "w.bin")
    files["pytorch_model.bin"] = (tmp_path / "w.bin").read_bytes()  # model.safetensors is 404: fallback
    cache = tmp_path / "cache"
    monkeypatch.setenv("TGL_CACHE", str(cache))
    urls = []

    def fake_get(url, stream=False, timeout=None):
        assert timeout and url.startswith(fetch.hub_endpoint() + "/gpt2/resolve/main/")
        urls.append(url)
        name = url.rsplit("/", 1)[1]
        dest = cache / "gpt2" / name

        def check():  # mid-download: only the .part file exists
            assert (cache / "gpt2" / (name + ".part")).exists() and not dest.exists()
        return FakeResponse(files.get(name, b""), status=200 if name in files else 404, on_chunk=check)
    monkeypatch.setattr(requests, "get", fake_get)
    model = H.load_hf("gpt2")
    assert [u.rsplit("/", 1)[1] for u in urls] == ["config.json", "model.safetensors", H.INDEX, "pytorch_model.bin", *fetch.HUB_EXTRAS]
    assert (cache / "gpt2" / "pytorch_model.bin").read_bytes() == files["pytorch_model.bin"]
    assert not list((cache / "gpt2").glob("*.part"))
    assert (our_logits(model, IDX) - ref_logits(ref, IDX)).abs().max() < 1e-4
    no_network(monkeypatch)
    assert (our_logits(H.load_hf("gpt2"), IDX) - ref_logits(ref, IDX)).abs().max() < 1e-4
    assert C.load_model("gpt2").config.n_layer == 2


def test_short_download_is_not_renamed(tmp_path, monkeypatch):
    import requests
    resp = FakeResponse(b"x" * 50)
    resp.headers["Content-Length"] = "80"  # the connection dropped early
    monkeypatch.setattr(requests, "get", lambda *a, **k: resp)
    monkeypatch.setattr("time.sleep", lambda s: None)
    with pytest.raises(OSError, match="50 of 80"):
        fetch.download("http://x/f", str(tmp_path / "f"), retries=2)
    assert not (tmp_path / "f").exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    C.save_checkpoint(path, {"step": 1})
    with pytest.raises(RuntimeError):
        with common.atomic_path(path) as tmp:
            open(tmp, "w").write("half a file")
            raise RuntimeError("crash mid-write")
    assert C.load_checkpoint(path) == {"step": 1}  # the last good file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # and no temporary file is left
    common.write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"
