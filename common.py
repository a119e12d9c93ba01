"""What every script shares and none of them is about: one-line CLI errors, atomic file writes, HTTP downloads.

The method lives in model.py, trace.py and train.py; this file is plumbing, kept apart so that
those files read as the method.
"""
import argparse
import glob
import json
import math
import os
import sys
import time
from contextlib import contextmanager


# ----------------------------------------------------------------------------- errors

def fail(msg: str, prog: str = "", code: int = 2):
    """Bad input to a script: one line on stderr ("prog: error: ..."), a non-zero exit, no traceback."""
    print(f"{prog + ': ' if prog else ''}error: {msg}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def input_errors(prog: str):
    """The one error boundary of every script. Errors caused by input (a missing or unreadable file, a
    file that is not what it should be, a bad value found deep inside: ValueError and OSError, which is
    what this project raises for them) become one line naming the file or flag and a non-zero exit.
    Anything else is a bug in tgl and keeps its traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        fail(one_line(e), prog=prog)


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"  # e.g. "runs/x: Is a directory"
    return " ".join((str(e) or type(e).__name__).split())


def check_number(flag: str, value, low=None, high=None, low_open=False, high_open=False, integer=False):
    """A flag's value must be a finite number in [low, high] (open ends where asked): else one clear line."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (not integer or float(value).is_integer())
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{flag} must be a finite number {' and '.join(x for x in (lo, hi) if x)}, got {value}")


def check_output(path, flag: str, kind: str = "file"):
    """Before any slow work: `path` can be written as a `kind` ("file" or "dir"). A file must not be an
    existing folder and its folder must exist; a folder must not be an existing file."""
    if not path:
        raise ValueError(f"{flag} is empty: give a path")
    if kind == "dir":
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path}: is a file, want a folder; pick another path")
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder, want a file path")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist; create it first")


def script(name: str, *args) -> list:
    """argv that runs one of this project's scripts with this Python: what demo.py and twiki.py launch."""
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), name), *map(str, args)]


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, bad type) are one line too, with no usage block."""

    def error(self, message):
        fail(message, prog=self.prog)


# ----------------------------------------------------------------------------- files

def not_utf8(path, e: UnicodeDecodeError) -> ValueError:
    """The error for a file that is not UTF-8: the codec's own message names a byte, not the file."""
    return ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert it to UTF-8")


def read_text(path) -> str:
    """A UTF-8 text file; a binary or mis-encoded file is a one-line error that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def read_json(path):
    """A JSON file; bad JSON is a one-line error that names the file and the line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def remove_stale_temporaries(path):
    """Remove `path.PID.tmp` files left by processes that died mid-write (kill -9 during a save)."""
    folder, name = os.path.split(os.fspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(folder or "."), glob.escape(name) + ".*.tmp")):
        pid = tmp[len(os.path.join(folder, name)) + 1:-4] if folder else tmp[len(name) + 1:-4]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.remove(tmp)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


@contextmanager
def atomic_path(path):
    """The one way this project writes a file: yield a temporary path next to `path`, rename it over
    `path` once the write succeeded. A crash mid-write never leaves a half-written file in place of
    a good one; the pid in the name keeps parallel writers (two demo runs, DDP ranks) apart, and the
    temporaries of writers that died are removed on the next write."""
    remove_stale_temporaries(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str):
    """Write a text file atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------- progress

def _duration(s: float) -> str:
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.0f}m" if s < 5400 else f"{s / 3600:.1f}h"


class Progress:
    """One self-overwriting line on stderr: done, rate and ETA. Silent for jobs shorter than
    `after` seconds, so quick runs and tests print nothing."""

    def __init__(self, what: str, total: int = 0, unit: str = "MB", scale: float = 1e6, start: int = 0, after=2.0):
        self.what, self.total, self.unit, self.scale, self.after = what, total, unit, scale, after
        self.t0, self.start, self.shown, self.printed = time.time(), start, 0.0, False

    def update(self, done: int, total: int = None):
        self.total = total or self.total
        now = time.time()
        if now - self.t0 < self.after or now - self.shown < 0.5:
            return
        self.shown, self.printed = now, True
        rate = (done - self.start) / (now - self.t0)
        of = f" of {self.total / self.scale:,.1f}" if self.total else ""
        eta = f", ETA {_duration((self.total - done) / rate)}" if self.total and rate > 0 else ""
        m = "" if self.unit == "MB" else "M "
        print(f"\r{self.what}: {done / self.scale:,.1f}{of} {m}{self.unit}, {rate / self.scale:,.2f} {m}{self.unit}/s{eta}   ",
              end="", file=sys.stderr, flush=True)

    def close(self, done: int):
        if self.printed:
            self.shown = 0.0
            self.update(done)
            print(file=sys.stderr)


# ----------------------------------------------------------------------------- downloads

def _resume_offset(r, have: int) -> int:
    """Where the body of response r starts: `have` when the server honoured our Range, else 0."""
    if have and r.status_code == 206:
        start = r.headers.get("Content-Range", "").replace("bytes ", "").split("-")[0]
        if start.strip() != str(have):
            raise OSError(f"asked for bytes from {have}, the server sent {r.headers.get('Content-Range')!r}")
        return have
    return 0


def _announced_size(r, offset: int) -> int:
    """The full file size the server announces (0 if unknown). With gzip, Content-Length counts
    compressed bytes: no size check then."""
    cr = r.headers.get("Content-Range", "")
    if "/" in cr and cr.rsplit("/", 1)[1].strip().isdigit():
        return int(cr.rsplit("/", 1)[1])
    if r.headers.get("Content-Encoding") or not r.headers.get("Content-Length"):
        return 0
    return offset + int(r.headers["Content-Length"])


def _fetch_once(url: str, part: str, timeout: float, size: int) -> int:
    """One request: append to part from its current size (HTTP Range), or start over when the server
    ignores the range. Returns the file size announced (0 if unknown)."""
    import requests
    have = os.path.getsize(part) if os.path.exists(part) else 0
    kw = {"headers": {"Range": f"bytes={have}-"}} if have else {}  # no headers kwarg on a fresh start
    with requests.get(url, stream=True, timeout=timeout, **kw) as r:
        if r.status_code == 404:
            raise FileNotFoundError(url)
        if r.status_code == 416:  # asked past the end: the .part is complete, or stale
            total = int(r.headers.get("Content-Range", "*/0").rsplit("/", 1)[1] or 0)
            if total != have:
                os.remove(part)
                raise OSError(f"{part} ({have} bytes) does not fit the file on the server ({total} bytes); removed")
            return total
        r.raise_for_status()
        offset = _resume_offset(r, have)
        total = _announced_size(r, offset)
        if size and total and total != size:
            raise ValueError(f"size mismatch: the server has {total:,} bytes for {url}, expected {size:,}")
        progress = Progress(f"downloading {url.rsplit('/', 1)[-1]}", total or size, start=offset)
        done = offset
        with open(part, "ab" if offset else "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 16):  # small: a dropped connection loses little
                f.write(chunk)
                done += len(chunk)
                progress.update(done)
        progress.close(done)
    return total


def download(url: str, dest: str, retries: int = 3, timeout=30.0, size: int = 0) -> str:
    """Fetch url into dest.part, renamed to dest only when complete and of the announced size (and of
    `size` bytes, when given). An interrupted transfer is resumed from the .part file with an HTTP
    Range request, by the retries here or by a later call. No network at all fails at once (the
    caller says what to do); a transfer that breaks off midway is retried."""
    import requests
    part = dest + ".part"
    for attempt in range(1, retries + 1):
        before = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            total = _fetch_once(url, part, timeout, size)
            got = os.path.getsize(part)
            if (total and got != total) or (size and got != size):
                raise OSError(f"got {got} of {total or size} bytes")
            os.replace(part, dest)
            return dest
        except (FileNotFoundError, ValueError):
            raise
        except (requests.RequestException, OSError) as e:
            progressed = os.path.exists(part) and os.path.getsize(part) > before
            if isinstance(e, requests.ConnectionError) and not progressed:
                raise OSError(f"cannot reach {url} ({type(e).__name__}): no network? download it on a machine "
                              "that has one and pass the local file or folder instead") from None
            if attempt == retries:
                raise OSError(f"download of {url} failed after {retries} tries: {e}") from None
            print(f"download of {url} failed ({e}); retry {attempt}/{retries - 1}", file=sys.stderr)
            time.sleep(2 ** attempt)
