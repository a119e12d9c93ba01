"""train.py and trace.py --fsdp (FSDP2) with 2 CPU processes (gloo): each equals the one-process run of the same
global batch; sharded checkpoints resume bit for bit and read back whole (export, --init). Tiny configs."""
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import optim
import train
import trace as tgl_trace
from checkpoint import load_checkpoint, load_model
from experiments import export, twiki
from experiments.hf import load_hf
from model import GPT, GPTConfig, unit_names
from test_train import ROOT, TINY, losses, one_thread, run, world  # noqa: F401  (fixtures)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(script, *argv):
    """script under torchrun with 2 CPU processes; one retry, as tests/test_train.py's DDP test (gloo's TCP
    setup has, rarely, aborted a rank on a loaded 2-core machine)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for _ in range(2):
        r = subprocess.run(TORCHRUN + [script, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
        if r.returncode == 0:
            return r
    raise AssertionError(r.stderr[-3000:])


def fsdp_train(world, out, *extra, fsdp=True):
    return torchrun("train.py", "--init", world.base, "--data", world.new, "--out", str(out), "--lr", "1e-3",
                    "--tokenizer", str(world.dir / "tokenizer.json"), "--overwrite", *TINY, *extra,
                    *["--fsdp"] * fsdp)


def whole(run_dir):  # a run's weights, a sharded one's read back whole
    return load_model(str(run_dir)).state_dict()


def grad_logs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["grad_norms"] for line in f]


# clipping at 0.05 / sqrt(units) acts on every unit at every step: the per-unit rule is exercised
ARMS = {"none": ["--probes", "{probes}"], "fp": ["--trace", "{trace}"],
        "alr": ["--trace", "{trace}", "--method", "recadam", "--recadam-t0", "2"],
        "lora": ["--trace", "{trace}", "--method", "lora"],
        # Mix-Review rounds each process's replayed share of its rows: its reference is DDP on 2 processes
        "mixreview": ["--method", "mixreview", "--replay-data", "{old}"]}


@pytest.mark.parametrize("arm", list(ARMS))
def test_fsdp_matches_one_process(world, tmp_path, arm):
    extra = ["--steps", "4", "--grad-accum", "2", "--grad-clip", "0.05", "--dropout", "0"]
    extra += [a.format(old=world.old, trace=world.trace, probes=world.probes) for a in ARMS[arm]]
    extra += ["--tgl", {"lora": "fp", "mixreview": "none"}.get(arm, arm)]
    if arm == "mixreview":
        fsdp_train(world, tmp_path / "one", *extra, fsdp=False)  # DDP
    else:
        run(world, tmp_path / "one", *extra)
    fsdp_train(world, tmp_path / "two", *extra)
    ck = load_checkpoint(tmp_path / "two" / "ckpt.pt")
    assert ck["model"] is None and ck["sharded"].startswith("ckpt.dcp.4.") and ck["world_size"] == 2
    w1, w2, w0 = whole(tmp_path / "one"), whole(tmp_path / "two"), whole(world.base)
    assert max((w1[n] - w2[n]).abs().max().item() for n in w1) < 1e-5
    assert max((w2[n] - w0[n]).abs().max().item() for n in w0) > 1e-3  # it trained
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    g1, g2 = grad_logs(tmp_path / "one"), grad_logs(tmp_path / "two")  # the log's norms, summed over shards
    assert [set(g) for g in g1] == [set(g) for g in g2]
    assert all(g2[s][u] == pytest.approx(g1[s][u], rel=1e-4) and g1[s][u] > 0.05 / 6 ** 0.5 for s in range(4) for u in g1[s])
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert s1["trainable_params"] == s2["trainable_params"]
    if arm == "none":  # the probes, scored by every process under FSDP (each forward gathers the weights)
        (split, r1), = s1["probes"].items()  # {split: {ppl, em, n}}; the split is the probe file's name
        assert s2["probes"][split]["ppl"] == pytest.approx(r1["ppl"], rel=1e-4) and s2["probes"][split]["n"] == 8
    if arm == "fp":  # the units TGL froze: bit-identical to the start
        frozen = [n for n in w0 if n.startswith(("transformer.h.0.mlp", "transformer.h.0.ln_2", "transformer.h.1.attn"))]
        assert frozen and all(torch.equal(w2[n], w0[n]) for n in frozen)


def test_fsdp_resume_continues_bit_for_bit_and_exports(world, tmp_path):
    """Stopped after the checkpoint at step 2 (a later save died half-written), resumed to 4: the same weights
    and losses as the uninterrupted run; a changed run is refused; the run exports as one HF folder."""
    extra = ["--decay", "none", "--dropout", "0.1", "--tgl", "alr", "--trace", world.trace]
    fsdp_train(world, tmp_path / "a", "--steps", "4", *extra)
    fsdp_train(world, tmp_path / "b", "--steps", "2", *extra)
    dead = tmp_path / "b" / "ckpt.dcp.3.999.tmp"  # a save that crashed: ckpt.pt still names step 2's
    dead.mkdir()
    torchrun("train.py", "--init", world.base, "--data", world.new, "--out", str(tmp_path / "b"), "--lr", "1e-3",
             "--tokenizer", str(world.dir / "tokenizer.json"), "--resume", "--fsdp", *TINY, "--steps", "4", *extra,
             "--checkpoint-activations")  # may change on --resume: it changes no number
    assert not dead.exists() and [f for f in os.listdir(tmp_path / "b") if f.startswith("ckpt.dcp")] == \
        [load_checkpoint(tmp_path / "b" / "ckpt.pt")["sharded"]]
    wa, wb = whole(tmp_path / "a"), whole(tmp_path / "b")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    with pytest.raises(SystemExit):  # one process, no --fsdp: another run
        run(world, tmp_path / "b", "--steps", "6", "--resume", *extra)
    hf = export.main(["--init", str(tmp_path / "a"), "--out", str(tmp_path / "hf")])
    got = load_hf(hf).state_dict()
    assert all(torch.equal(got[n], wa[n]) for n in wa)
    # the driver drops a finished stage's moments: the shard folder rewritten without them, resume refused
    before = twiki.checkpoint_bytes(tmp_path / "a")
    twiki.drop_optimizer(tmp_path / "a")
    assert twiki.checkpoint_bytes(tmp_path / "a") < 0.5 * before
    assert len([f for f in os.listdir(tmp_path / "a") if f.startswith("ckpt.dcp")]) == 1
    assert all(torch.equal(whole(tmp_path / "a")[n], wa[n]) for n in wa)
    r = subprocess.run(TORCHRUN + ["train.py", "--init", world.base, "--data", world.new, "--out", str(tmp_path / "a"),
                                   "--lr", "1e-3", "--tokenizer", str(world.dir / "tokenizer.json"), "--resume",
                                   "--fsdp", *TINY, "--steps", "6", *extra],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode != 0 and "train.py: error: optimizer state is for units ['none: twiki.py dropped" in r.stderr
    # DCP's .metadata is a pickle: a foreign one runs no code, and is one line
    folder = tmp_path / "a" / load_checkpoint(tmp_path / "a" / "ckpt.pt")["sharded"]
    for evil, named in ((pickle.dumps(Evil()), "posix.system"), (DOTTED, "os.system")):
        (folder / ".metadata").write_bytes(evil)
        with pytest.raises(ValueError, match=f"not a readable sharded checkpoint .*{named}"):
            load_model(str(tmp_path / "a"))
    shutil.rmtree(folder)
    with pytest.raises(ValueError, match="shards .* are missing"):
        load_model(str(tmp_path / "a"))


def _short(text):  # pickle's SHORT_BINUNICODE
    return b"\x8c" + bytes([len(text)]) + text.encode()


# protocol 4's dotted global: an allowed module's attribute path (its os module's system)
DOTTED = (b"\x80\x04" + _short("torch.distributed.checkpoint.filesystem") + _short("os.system") + b"\x93"
          + _short("false") + b"\x85R.")


class Evil:
    def __reduce__(self):
        return (os.system, ("false",))


def test_fsdp_refused_in_one_process(world, tmp_path, capsys):
    for main, argv in ((train.main, None), (tgl_trace.main, ["--init", world.base, "--probes", world.probes,
                                                             "--text", world.old, "--out", str(tmp_path / "t.json")])):
        with pytest.raises(SystemExit) as e:
            run(world, tmp_path / "x", "--fsdp") if argv is None else main(argv + ["--fsdp"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "--fsdp: run under torchrun" in err[0], err
    assert not (tmp_path / "x").exists() and not (tmp_path / "t.json").exists()
    for flags, msg in ((["--fsdp-bf16"], "--fsdp-bf16 needs --fsdp"),
                       (["--checkpoint-activations"], "--checkpoint-activations needs --fsdp")):
        with pytest.raises(SystemExit):
            run(world, tmp_path / "x", *flags)
        assert msg in capsys.readouterr().err
    os.environ["WORLD_SIZE"] = "2"  # as under torchrun: the CPU refusal comes before any process group
    try:
        with pytest.raises(SystemExit):
            run(world, tmp_path / "x", "--fsdp", "--fsdp-bf16", "--device", "cpu")
    finally:
        del os.environ["WORLD_SIZE"]
    assert "--fsdp-bf16: CUDA only" in capsys.readouterr().err


def test_sharded_trace_equals_one_process(world, tmp_path):
    argv = ["--init", world.base, "--probes", world.probes, "--text", world.old, "--n-lm", "6",
            "--tokenizer", str(world.dir / "tokenizer.json")]
    one = tgl_trace.main(argv + ["--out", str(tmp_path / "one.json")])
    torchrun("trace.py", *argv, "--out", str(tmp_path / "two.json"), "--fsdp")
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["fingerprint"] == one["fingerprint"] and two["selection"]["fp"] == one["selection"]["fp"]
    for key in ("span_norm", "lm_norm", "rgn"):
        assert all(two[key][u] == pytest.approx(one[key][u], rel=1e-5) for u in one["units"])
    assert two["selection"]["alr"] == pytest.approx(one["selection"]["alr"], rel=1e-5)
    assert two["splits"].keys() == one["splits"].keys()


# ----- in-process: 2 spawned processes, gloo

def _shards(rank, store, out):
    """Per process: the local shards hold about half the parameters; clip_gradients on sharded gradients
    equals the unsharded rule on the whole gradients; activation checkpointing changes no gradient; the
    bf16 policy computes close to fp32 and keeps fp32 shards."""
    import torch.distributed as dist
    from experiments.fsdp import save_sharded, shard
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # a file, not a TCP port, to meet: no port can be taken
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    ref, model, ac, bf16 = GPT(config), GPT(config), GPT(config), GPT(config)
    for m in (model, ac, bf16):
        m.load_state_dict(ref.state_dict())
    shard(model, "cpu"), shard(ac, "cpu", checkpoint_activations=True), shard(bf16, "cpu", bf16=True)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    calls, mlp = [], ac.transformer.h[0].mlp  # (a forward hook does not fire on the recomputation)
    mlp.forward = lambda h, forward=mlp.forward: calls.append(1) or forward(h)
    for m in (ref, model, ac, bf16):
        m(x, x.roll(-1, 1))[1].backward()
    got = dict(local=sum(p.to_local().numel() for p in model.parameters()), total=sum(p.numel() for p in ref.parameters()))
    got["ac_forwards"] = len(calls)  # the forward, then its recomputation in the backward
    got["ac"] = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ac.parameters()))
    got["bf16"] = max((p.grad.full_tensor() - q.grad).abs().max().item() / q.grad.abs().max().item()
                      for p, q in zip(bf16.parameters(), ref.parameters()))
    got["bf16_dtype"] = {str(p.dtype) for p in bf16.parameters()} | {str(p.grad.dtype) for p in bf16.parameters()}
    for m in (ref, model):  # FSDP averages the two processes' gradients: the same batch on both
        optim.clip_gradients(optim.AdamW(optim.make_param_groups(m)), 0.1, len(unit_names(2)))
    # Llama's parts (RMSNorm, SwiGLU, rotary, grouped-query attention, an untied head) shard as GPT-2's do
    llama = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, rms_norm=True,
                      mlp="swiglu", rotary_pct=1.0, tie_embeddings=False, bias=False, qkv_bias=False, arch="llama")
    torch.manual_seed(0)
    ref_l, sharded_l = GPT(llama), GPT(llama)
    sharded_l.load_state_dict(ref_l.state_dict())
    shard(sharded_l, "cpu")
    for m in (ref_l, sharded_l):
        m(x, x.roll(-1, 1))[1].backward()
    got["llama"] = max((p.grad.full_tensor() - q.grad).abs().max().item()
                       for p, q in zip(sharded_l.parameters(), ref_l.parameters()))
    blocked = f"{out}.file"  # --out a file: the shard folder cannot be made, on every process
    open(blocked, "w").close()
    bad = SimpleNamespace(step=1, rank=rank, model=model, opt=optim.AdamW(optim.make_param_groups(model)),
                          cfg=SimpleNamespace(out=blocked))
    try:
        save_sharded(bad, {})
    except ValueError as e:
        got["save_error"] = str(e)
    got["clip"] = max((p.grad.full_tensor() - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    torch.save(got, f"{out}.{rank}")
    dist.destroy_process_group()


def test_shards_halve_parameters_clip_exactly_and_knobs(tmp_path):
    mp.spawn(_shards, args=(str(tmp_path / "store"), str(tmp_path / "r")), nprocs=2)
    got = [torch.load(tmp_path / f"r.{rank}") for rank in range(2)]
    assert sum(g["local"] for g in got) == got[0]["total"]  # the shards partition the model
    assert all(abs(g["local"] / g["total"] - 0.5) < 0.02 for g in got)
    assert all(g["clip"] < 1e-7 and g["ac"] == 0 and g["ac_forwards"] == 2 for g in got)
    assert all(g["llama"] < 1e-6 for g in got)
    assert all("the shards could not be written" in g["save_error"] and "ckpt.pt, if any, is good" in g["save_error"]
               for g in got)
    assert all(0 < g["bf16"] < 0.05 and g["bf16_dtype"] == {"torch.float32"} for g in got)


def test_clipping_equals_torchs_per_unit():
    """optim.clip_gradients (norms through optim.group_norms, the one place they are summed over shards)
    equals torch's clip_grad_norm_ applied to each unit's group, as it was before sharding existed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 64, (2, 16))
    model(x, x.roll(-1, 1))[1].backward()
    opt = optim.AdamW(optim.make_param_groups(model))
    want = {id(p): p.grad.clone() for p in model.parameters()}
    before = {id(p): p.grad.clone() for p in model.parameters()}
    wrapped = {id(p): torch.nn.Parameter(p.detach().clone()) for p in model.parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            wrapped[id(p)].grad = want[id(p)]
        torch.nn.utils.clip_grad_norm_([wrapped[id(p)] for p in g["params"]], 0.1 / 6 ** 0.5, foreach=True)
    optim.clip_gradients(opt, 0.1, len(unit_names(2)))
    assert all(torch.allclose(p.grad, want[id(p)], rtol=1e-6, atol=0) for p in model.parameters())
    assert all(p.grad.norm() < 0.1 / 6 ** 0.5 + 1e-6 for p in model.parameters())
    assert sum(not torch.equal(p.grad, before[id(p)]) for p in model.parameters()) > 10  # it clipped


def test_fsdp_killed_mid_run_resumes_bit_for_bit(world, tmp_path):
    """kill -9 of the whole torchrun (maybe mid-save) once a checkpoint exists; --resume from whatever ckpt.pt
    names ends where the uninterrupted run ends, bit for bit."""
    extra = ["--steps", "40", "--save-every", "2", "--dropout", "0.1", "--log-every", "2"]
    fsdp_train(world, tmp_path / "a", *extra)
    argv = ["train.py", "--init", world.base, "--data", world.new, "--out", str(tmp_path / "b"), "--lr", "1e-3",
            "--tokenizer", str(world.dir / "tokenizer.json"), "--fsdp", *TINY, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.Popen(TORCHRUN + argv, cwd=ROOT, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = tmp_path / "b" / "ckpt.pt", time.time() + 120
    while not (ckpt.is_file() and load_checkpoint(ckpt)["step"] >= 4) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # (it ended: the assertion below says so)
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = load_checkpoint(ckpt)["step"]
    assert 4 <= killed_at < 40, killed_at  # killed before the end
    torchrun(*argv, "--resume")
    wa, wb = whole(tmp_path / "a"), whole(tmp_path / "b")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
