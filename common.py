"""Plumbing the scripts share: one-line errors, flags, files, processes."""
import argparse
import errno
import glob
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import MISSING, field, fields, is_dataclass

def fail(msg: str, prog: str = "", code: int = 2):
    """Bad input: one line on stderr, no traceback."""
    print(f"{prog + ': ' if prog else ''}error: {' '.join(str(msg).split())}", file=sys.stderr)
    raise SystemExit(code)

@contextmanager
def input_errors(prog: str):
    """The one error boundary: ValueError, OSError: bad input, one line; a bug keeps its traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        named = isinstance(e, OSError) and e.filename is not None and e.strerror
        fail(f"{e.filename}: {e.strerror}" if named else str(e) or type(e).__name__, prog)

class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (unknown flag, bad value) are one line too
        fail(message, prog=self.prog)

def flag(default, help: str, resume_free=False, **argparse_kw):
    """A config field that is also a flag --field-name (resume_free: may change on --resume)."""
    kw = dict(default_factory=lambda: list(default)) if isinstance(default, list) else dict(default=default)
    return field(**kw, metadata=dict(help=help, resume_free=resume_free, argparse=argparse_kw))

def _default(f):
    return f.default if f.default is not MISSING else f.default_factory()

def add_flags(parser, config):
    """The fields of a config dataclass as flags (a nested one, e.g. a Selection, adds its own); a flag not
    given stays unset (from_args takes the default)."""
    for f in fields(config):
        if is_dataclass(_default(f)):
            add_flags(parser, _default(f))
        elif "help" in f.metadata:
            kw, d = dict(f.metadata["argparse"], help=f.metadata["help"]), _default(f)
            if isinstance(d, bool):
                kw["action"] = "store_true"
            elif d is not None and "type" not in kw and "nargs" not in kw:
                kw["type"] = type(d)
            parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kw)

def from_args(config, args):
    return config(**{f.name: from_args(type(_default(f)), args) if is_dataclass(_default(f))
                     else getattr(args, f.name, _default(f)) for f in fields(config)})

def unused_flag(cfg, given) -> str | None:  # a flag given that cfg.NEEDS says cfg's mode does not use
    for key, table in getattr(cfg, "NEEDS", {}).items():
        for values, names in table.items():
            for n in names.split():
                if n in given and getattr(cfg, key) not in values.split():
                    return f"--{n.replace('_', '-')} needs --{key} {' or '.join(values.split())}"

def parse_config(config, prog: str, doc: str, argv=None):
    parser = Parser(prog=prog, description=doc.split("\n")[0])
    add_flags(parser, config)
    args = parser.parse_args(argv)
    cfg = from_args(config, args)
    unused = unused_flag(cfg, vars(args))  # a flag the chosen method or mode does not read
    if unused:
        parser.error(unused)
    return cfg

def number(interval: str, kind=float):
    """An argparse type: a finite int or float in an interval, e.g. "[0, 1)" or "(0, inf)"."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(v) and (v > lo if interval[0] == "(" else v >= lo)
                and (v < hi if interval[-1] == ")" else v <= hi)):
            raise argparse.ArgumentTypeError(f"want a finite {kind.__name__} in {interval}, got {text}")
        return v
    return parse

POS = number("[1, inf)", int)

def duration(seconds: float) -> str:
    """75 -> '1m15s', 4000 -> '1h06m': an ETA or an elapsed time, as every progress line shows it."""
    minutes, secs = divmod(int(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"

def check_output(path, flag: str, kind: str = "file"):
    """Before slow work: `path` can be written as a `kind` ("file" or "dir"), by a real write where it would
    go: beside a file; in a folder, or the nearest existing folder above it (the one makedirs writes into)."""
    folder = os.path.dirname(path) or "."
    for bad, why in [(not path, "is empty: give a path"),
                     (kind == "dir" and os.path.isfile(path), "is a file, want a folder"),
                     (kind == "file" and os.path.isdir(path), "is a folder, want a file path")]:
        if bad:
            raise ValueError(f"{flag} {path}: {why}")
    if kind == "dir":
        folder = os.path.abspath(path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {path}: cannot create it: {folder} is a file")
    try:  # a real write: root passes os.access in /sys
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None

def init_distributed(device: str, threads=None):
    """Under torchrun, join the process group (NCCL on CUDA, else gloo). -> rank, world, device"""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads or torch.get_num_threads())
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    elif not threads:  # the local processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    return dist.get_rank(), dist.get_world_size(), device

def not_utf8(path, e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at {e.start}); convert it to UTF-8")

def read_text(path) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not text
            return f.read()
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None

def read_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

def _dead(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        pass
    return False

@contextmanager
def atomic_path(path):
    """The one way files are written: into path.PID.tmp, renamed over `path` once complete (a crash never
    leaves half a file); dead writers' temporaries go."""
    for tmp in glob.glob(glob.escape(str(path)) + ".*.tmp"):
        pid = tmp[len(str(path)) + 1:-4]
        if pid.isdigit() and int(pid) != os.getpid() and _dead(pid):
            os.remove(tmp)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's is a RuntimeError, the OSError its __context__
        if errno.ENOSPC in (getattr(e, "errno", 0), getattr(e.__context__, "errno", 0)):
            raise ValueError(f"{path}: the disk is full; free space and run again") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def log_lines(path, step) -> list:
    """A JSON-lines log up to `step`, as a checkpoint saw it; a torn last line is dropped."""
    lines = [line + "\n" for line in read_text(path).splitlines()]
    for n, line in enumerate(lines):
        try:
            if json.loads(line)["step"] > step:
                return lines[:n]
        except (json.JSONDecodeError, TypeError, KeyError):
            if n + 1 < len(lines):
                raise ValueError(f"{path}:{n + 1}: not a log line; move the file away to resume") from None
            return lines[:n]
    return lines

def write_text(path, text: str):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
