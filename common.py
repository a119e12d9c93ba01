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


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, bad type) are one line too, with no usage block."""

    def error(self, message):
        fail(message, prog=self.prog)


# ----------------------------------------------------------------------------- files

def read_text(path) -> str:
    """A UTF-8 text file; a binary or mis-encoded file is a one-line error that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "convert it to UTF-8") from None


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


# ----------------------------------------------------------------------------- downloads

def download(url: str, dest: str, retries: int = 3, timeout: float = 30.0) -> str:
    """Fetch url into dest.part, renamed to dest only when complete and of the announced size."""
    import requests
    for attempt in range(1, retries + 1):
        try:
            with requests.get(url, stream=True, timeout=timeout) as r:
                if r.status_code == 404:
                    raise FileNotFoundError(url)
                r.raise_for_status()
                # with gzip, Content-Length counts compressed bytes: check the size only without it
                total = 0 if r.headers.get("Content-Encoding") else int(r.headers.get("Content-Length") or 0)
                done, shown = 0, 0.0
                with open(dest + ".part", "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        if time.time() - shown > 0.5 or done == total:
                            shown, of = time.time(), f" of {total / 1e6:.1f}" if total else ""
                            print(f"\rdownloading {url}: {done / 1e6:.1f}{of} MB", end="", file=sys.stderr, flush=True)
                print(file=sys.stderr)
            if total and done != total:
                raise OSError(f"got {done} of {total} bytes")
            os.replace(dest + ".part", dest)
            return dest
        except FileNotFoundError:
            raise
        except (requests.RequestException, OSError) as e:
            if attempt == retries:
                raise OSError(f"download of {url} failed after {retries} tries: {e}") from None
            print(f"download of {url} failed ({e}); retry {attempt}/{retries - 1}", file=sys.stderr)
            time.sleep(2 ** attempt)
