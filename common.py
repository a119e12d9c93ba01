"""What every script shares and none of them is about: one-line CLI errors, atomic file writes, HTTP downloads.

The method lives in model.py, trace.py and train.py; this file is plumbing, kept apart so that
those files read as the method.
"""
import argparse
import os
import sys
import time
from contextlib import contextmanager


# ----------------------------------------------------------------------------- errors

def fail(msg: str, prog: str = "", code: int = 2):
    """Bad input to a script: one line on stderr ("prog: error: ..."), a non-zero exit, no traceback."""
    print(f"{prog + ': ' if prog else ''}error: {msg}", file=sys.stderr)
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, bad type) are one line too, with no usage block."""

    def error(self, message):
        fail(message, prog=self.prog)


# ----------------------------------------------------------------------------- files

@contextmanager
def atomic_path(path):
    """The one way this project writes a file: yield a temporary path next to `path`, rename it over
    `path` once the write succeeded. A crash mid-write never leaves a half-written file in place of
    a good one; the pid in the name keeps parallel writers (two demo runs, DDP ranks) apart."""
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
