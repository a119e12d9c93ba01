"""Plumbing every script shares and none is about: one-line errors, atomic writes, downloads."""
import argparse
import glob
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import MISSING, field, fields, is_dataclass

def fail(msg: str, prog: str = "", code: int = 2):
    """Bad input: one line on stderr ("prog: error: ..."), a non-zero exit, no traceback."""
    print(f"{prog + ': ' if prog else ''}error: {' '.join(str(msg).split())}", file=sys.stderr)
    raise SystemExit(code)

@contextmanager
def input_errors(prog: str):
    """The one error boundary. ValueError and OSError are what this project raises for bad input (a
    missing file, a malformed line, a bad value): one line naming the file or flag, exit 2. Anything
    else is a bug in tgl and keeps its traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        named = isinstance(e, OSError) and e.filename is not None and e.strerror
        fail(f"{e.filename}: {e.strerror}" if named else str(e) or type(e).__name__, prog)

class Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, bad type) are one line too, with no usage block."""

    def error(self, message):
        fail(message, prog=self.prog)

def flag(default, help: str, resume_free=False, **argparse_kw):
    """A config field that is also a command-line flag (--field-name); argparse keywords ride along.
    resume_free: the flag may change when a run is resumed (it does not change what the run computes)."""
    factory = dict(default_factory=lambda: list(default)) if isinstance(default, list) else dict(default=default)
    return field(**factory, metadata=dict(help=help, resume_free=resume_free, argparse=argparse_kw))

def add_flags(parser, config):
    """The flags of a config dataclass, from its fields: the one place a script's flags are declared.
    A field whose default is itself a dataclass (e.g. train's Selection) adds that one's flags too."""
    for f in fields(config):
        default = f.default if f.default is not MISSING else f.default_factory()
        if is_dataclass(default):
            add_flags(parser, default)
        elif "help" in f.metadata:
            kw = dict(f.metadata["argparse"], help=f.metadata["help"])
            if isinstance(default, bool):
                kw["action"] = "store_true"
            elif default is not None and "type" not in kw and "nargs" not in kw:
                kw["type"] = type(default)
            parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kw)

def from_args(config, args):
    """A config dataclass filled from parsed flags (nested dataclasses too)."""
    values = {}
    for f in fields(config):
        default = f.default if f.default is not MISSING else f.default_factory()
        values[f.name] = from_args(type(default), args) if is_dataclass(default) else getattr(args, f.name)
    return config(**values)

def number(interval: str, kind=float):
    """An argparse type for a finite number in an interval such as "[0, 1)" or "(0, inf)"; kind int or float."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want {kind.__name__}, got {text!r}") from None
        inside = (v > lo if interval[0] == "(" else v >= lo) and (v < hi if interval[-1] == ")" else v <= hi)
        if not (math.isfinite(v) and inside):
            raise argparse.ArgumentTypeError(f"want a finite {kind.__name__} in {interval}, got {text}")
        return v
    return parse

def check_output(path, flag: str, kind: str = "file"):
    """Before slow work: `path` can be written as a `kind` ("file" or "dir")."""
    if not path:
        raise ValueError(f"{flag} is empty: give a path")
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a file, want a folder; pick another path")
    if kind == "file" and os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder, want a file path")
    if kind == "file" and not os.path.isdir(os.path.dirname(path) or "."):
        raise ValueError(f"{flag} {path}: the folder {os.path.dirname(path)} does not exist; create it first")

def not_utf8(path, e: UnicodeDecodeError) -> ValueError:
    """The codec's own message names a byte, not the file."""
    return ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert it to UTF-8")

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

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return True

@contextmanager
def atomic_path(path):
    """The one way this project writes a file: into `path.PID.tmp`, renamed over `path` once complete, so
    a crash mid-write never leaves half a file where a good one was. Temporaries of dead writers go."""
    for tmp in glob.glob(glob.escape(str(path)) + ".*.tmp"):
        pid = tmp[len(str(path)) + 1:-4]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            os.remove(tmp)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def write_text(path, text: str):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)

def _get(url, part, timeout, size) -> int:
    """One request, appended to `part` from its size (HTTP Range). Returns the full size announced (0: unknown)."""
    import requests
    have = os.path.getsize(part) if os.path.exists(part) else 0
    kw = {"headers": {"Range": f"bytes={have}-"}} if have else {}
    with requests.get(url, stream=True, timeout=timeout, **kw) as r:
        if r.status_code == 404:
            raise FileNotFoundError(url)
        total = r.headers.get("Content-Range", "").rpartition("/")[2]
        if r.status_code == 416:  # asked past the end: the .part is complete, or stale
            if total != str(have):
                os.remove(part)
                raise OSError(f"{part} ({have} bytes) does not fit the file on the server ({total} bytes); removed")
            return have
        r.raise_for_status()
        start = int(r.headers["Content-Range"].split()[1].split("-")[0]) if r.status_code == 206 else 0
        if start not in (0, have):
            raise OSError(f"asked for bytes from {have}, the server sent {r.headers['Content-Range']!r}")
        length = r.headers.get("Content-Length")
        if total.isdigit():
            total = int(total)
        else:  # under gzip, Content-Length counts compressed bytes: no size check then
            total = start + int(length) if length and not r.headers.get("Content-Encoding") else 0
        if size and total and total != size:
            raise ValueError(f"size mismatch: the server has {total:,} bytes for {url}, expected {size:,}")
        done, shown = start, time.time()
        with open(part, "ab" if start else "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 16):  # small: a dropped connection loses little
                f.write(chunk)
                done += len(chunk)
                if time.time() - shown > 5:
                    shown = time.time()
                    print(f"{url.rsplit('/', 1)[-1]}: {done / 1e6:,.0f} of {(total or size) / 1e6:,.0f} MB", file=sys.stderr)
    return total

def download(url: str, dest: str, retries: int = 3, timeout=30.0, size: int = 0) -> str:
    """url -> dest, through dest.part, renamed only once complete (of the announced size, and of `size`
    bytes when given). A broken transfer resumes from the .part with an HTTP Range request, here or on
    a later call; no network at all fails at once."""
    import requests
    part = dest + ".part"
    for attempt in range(1, retries + 1):
        before = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            total, got = _get(url, part, timeout, size), os.path.getsize(part)
            if (total and got != total) or (size and got != size):
                raise OSError(f"got {got} of {total or size} bytes")
            os.replace(part, dest)
            return dest
        except (FileNotFoundError, ValueError):
            raise
        except (requests.RequestException, OSError) as e:
            moved = os.path.exists(part) and os.path.getsize(part) > before
            if isinstance(e, requests.ConnectionError) and not moved:
                raise OSError(f"cannot reach {url} ({type(e).__name__}): no network? download it on a machine "
                              "that has one and pass the local file or folder instead") from None
            if attempt == retries:
                raise OSError(f"download of {url} failed after {retries} tries: {e}") from None
            print(f"download of {url} failed ({e}); retry {attempt}/{retries - 1}", file=sys.stderr)
            time.sleep(2 ** attempt)
