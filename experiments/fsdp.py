"""FSDP2 plumbing for train.py and trace.py --fsdp (docs/fsdp.md): the wrap, sharded checkpoints written with
torch.distributed.checkpoint (DCP), and a sharded checkpoint read back whole in one process (export, --init).

Under FSDP each process holds 1/N of every parameter (a DTensor sharded on dim 0), of its gradient and of
AdamW's moments (zeros_like of a DTensor is one); the forward all-gathers a block's weights just before it
runs and frees them after. optim.AdamW's elementwise update runs unchanged on the shards; norms are the one
thing that spans them (optim.group_norms sums the squared norms of the slices over processes).
"""
import atexit
import os
import pickle
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

import data
from checkpoint import CKPT_NAME, load_model, save_checkpoint
from common import init_distributed

PREFIX = "ckpt.dcp."  # a sharded run's weights and moments: --out/ckpt.dcp.STEP.PID, named by ckpt.pt


def shard(model, device: str, bf16=False, checkpoint_activations=False):
    """fully_shard each block, then the root (the embeddings, ln_f, the tied head): a block's weights are
    gathered only while it runs. bf16: compute in bf16, fp32 master weights, gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.transformer.h:
        if checkpoint_activations:  # recompute the block's activations in the backward: memory for time
            from torch.distributed._composable import checkpoint
            checkpoint(block)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def sharded_model(cfg, device: str):
    """trace.py --fsdp (cfg: its TraceConfig): join torchrun's processes, load --init in CPU memory and shard it
    onto the device (a block at a time). Rank 0 tokenizes --text first; the others then read its token cache.
    -> rank, model, device"""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise ValueError("--fsdp: run under torchrun --nproc_per_node 2+")
    rank, _, device = init_distributed(device)
    atexit.register(dist.destroy_process_group)
    if rank == 0:
        data.load_tokens(cfg.text, data.load_tokenizer(cfg.tokenizer or cfg.init))
    dist.barrier()
    return rank, shard(load_model(cfg.init, "cpu"), device), device


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: read it admitting only DCP's own classes and torch's sizes, dtypes and
    layouts, so that a foreign checkpoint runs no code (as torch.load(weights_only=True) for the tensors)."""
    ALLOWED = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module, name):
        obj = super().find_class(module, name) if "." not in name else None  # "a.b": an attribute path
        dcp_class = isinstance(obj, type) and obj.__module__.startswith("torch.distributed.checkpoint.")
        torch_constant = module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
        if obj is None or not (dcp_class or torch_constant or (module, name) in self.ALLOWED):
            raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")
        return obj


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, rank=None, **kwargs):  # FileSystemReader's, with the unpickler above
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"a {type(metadata).__name__}, not DCP metadata")
        metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _tensors(model, opt) -> dict:  # what DCP writes and reads: each process its own shards
    return dict(model=model.state_dict(), m={str(i): t for i, t in enumerate(opt.exp_avg)},
                v={str(i): t for i, t in enumerate(opt.exp_avg_sq)})


def save_sharded(run, state: dict):
    """Every process writes its shards of the weights and moments into a new folder (.tmp until all have);
    then rank 0 writes ckpt.pt, the rest of the state and the folder's name, atomically, and removes older
    folders. A crash at any point leaves ckpt.pt naming a complete folder."""
    name = [f"{PREFIX}{run.step}.{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)  # rank 0's name for all
    folder = os.path.join(run.cfg.out, name[0])
    try:
        dcp.save(_tensors(run.model, run.opt), checkpoint_id=folder + ".tmp")
    except CheckpointException as e:  # a full disk, say: every process gets it; ckpt.pt stays the last good one
        raise ValueError(f"{folder}.tmp: the shards could not be written ({_why(e)}); "
                         f"{CKPT_NAME}, if any, is good: free space and --resume") from None
    dist.barrier()  # every shard is on disk
    if run.rank == 0:
        os.replace(folder + ".tmp", folder)
        state = dict(state, model=None, sharded=name[0], optimizer=dict(state["optimizer"], m=None, v=None))
        save_checkpoint(os.path.join(run.cfg.out, CKPT_NAME), state)
        prune(run.cfg.out, name[0])
    dist.barrier()


def prune(out: str, keep: str):
    """Every shard folder in out but keep, the one ckpt.pt names: earlier saves, dead writers' .tmp."""
    for old in os.listdir(out):
        if old.startswith(PREFIX) and old != keep:
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)


def _read(sd: dict, path: str, saved: dict, whole=False):
    """DCP's load of the folder ckpt.pt names into sd (whole: every key, in one process); a missing, damaged or
    foreign folder is one line."""
    folder = os.path.join(os.path.dirname(path), saved["sharded"])
    try:
        SafeReader(folder).read_metadata()  # checked first: DCP would log a traceback per failed try
    except Exception as e:  # noqa: BLE001  whatever a damaged pickle raises
        missing = isinstance(e, FileNotFoundError)
        raise ValueError(f"{path}: its shards {folder} are missing: copy the run folder whole" if missing else
                         f"{folder}: not a readable sharded checkpoint ({type(e).__name__}: {e})") from None
    try:
        with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore")
            if whole:  # as DCP's own dcp_to_torch_save: dcp.load fills only the keys given
                _load_state_dict(sd, storage_reader=SafeReader(folder), planner=_EmptyStateDictLoadPlanner(),
                                 no_dist=True)
            else:
                dcp.load(sd, storage_reader=SafeReader(folder))
    except CheckpointException as e:  # a shard file damaged or missing
        raise ValueError(f"{folder}: not a readable sharded checkpoint ({_why(e)}); restore it from a copy") from None


def _why(e: CheckpointException) -> str:  # the first failure DCP gathered from the processes, in one line
    why = next(iter(e.failures.values()), (e,))
    why = why[0] if isinstance(why, tuple) else why  # (exception, traceback) as gathered
    return f"{type(why).__name__}: {' '.join(str(why).split())[:200]}"


def load_sharded(run, saved: dict):
    """--resume: each process reads its own shards of the weights and moments into saved (as train.restore
    then loads a ckpt.pt); the same number of processes (train_config's "processes"). Moments of other
    units (or dropped, experiments.twiki) are not read: AdamW.load_state_dict refuses them in one line."""
    sd = _tensors(run.model, run.opt)
    if saved["optimizer"]["units"] != [g["unit"] for g in run.opt.param_groups]:
        sd = dict(model=sd["model"])
    _read(sd, os.path.join(run.cfg.out, CKPT_NAME), saved)
    saved["model"] = sd["model"]
    if "m" in sd:
        saved["optimizer"] = dict(saved["optimizer"], m=list(sd["m"].values()), v=list(sd["v"].values()))


def read_sharded(path: str, saved: dict) -> dict:
    """A sharded run's ckpt.pt with its weights (and moments) whole, read in one process: --init, export."""
    sd = {}
    _read(sd, path, saved, whole=True)
    m, v = sd.get("m", {}), sd.get("v", {})
    return dict(saved, model=sd["model"], optimizer=dict(saved["optimizer"], m=[m[str(i)] for i in range(len(m))],
                                                        v=[v[str(i)] for i in range(len(v))]))


def drop_moments(path: str, saved: dict) -> dict:
    """experiments.twiki's drop_optimizer on a sharded run: its weights, read whole, written again into a new
    folder without the moments (one process). -> saved naming it; the caller writes ckpt.pt, then prunes."""
    whole, name = read_sharded(path, saved), f"{PREFIX}{saved['step']}.{os.getpid()}"
    name += ".w" if name == saved["sharded"] else ""  # never the folder ckpt.pt names now
    folder = os.path.join(os.path.dirname(path), name)
    with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(dict(model=whole["model"]), checkpoint_id=folder + ".tmp", no_dist=True)
    os.replace(folder + ".tmp", folder)
    return dict(saved, sharded=name)
