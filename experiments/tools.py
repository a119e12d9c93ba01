"""What the scripts under experiments/ share: launching the project's scripts, number checks, progress lines."""
import fcntl
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from common import _dead, check_output, duration

ROOT = Path(__file__).resolve().parents[1]  # the repository root: the method's files


def script(name: str, *args) -> list:
    """argv that runs one of this project's scripts with this Python: a top-level file ("train.py") by path,
    an experiment ("experiments.realdata") as a module (its imports need the root on sys.path, so cwd=ROOT)."""
    if name.endswith(".py"):
        return [sys.executable, str(ROOT / name), *map(str, args)]
    return [sys.executable, "-m", name, *map(str, args)]


def remove_dead_temporaries(folder, prefix: str, suffix: str = ""):
    """Remove FOLDER/PREFIX.PID<suffix> folders whose writer PID is dead (a killed run's leftovers), as
    common.atomic_path does for files."""
    for tmp in Path(folder).glob(f"{prefix}.*{suffix}"):
        pid = tmp.name[len(prefix) + 1:len(tmp.name) - len(suffix)]
        if pid.isdigit() and int(pid) != os.getpid() and _dead(pid):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def folder_lock(path, flag="--out"):
    """One writer per folder, for as long as the command runs: an exclusive flock on .NAME.lock beside the
    folder (beside: the folder's own listing stays the command's files). flock, not a pid file made with
    O_EXCL: the OS drops it when its process ends, even killed, so a dead writer's lock never blocks and
    none is taken over by mistake (a pid reused). The file keeps the holder's pid and command for the
    message, and stays (removing it would let two writers lock two files). Locks are per folder: a run
    folder inside a locked --out (twiki's steps) has a lock of its own. Under torchrun only rank 0 writes,
    and only it locks."""
    check_output(str(path), flag, "dir")
    full = os.path.abspath(path)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    try:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        f = open(os.path.join(os.path.dirname(full), f".{os.path.basename(full)}.lock"), "a+")
    except OSError as e:  # a file where a folder should be, no permission
        raise ValueError(f"{flag} {path}: cannot create it ({e.filename}: {e.strerror})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{flag} {path} is being written by {lock_holder(f)}; "
                             f"wait for it to end, or use another {flag}") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} ({' '.join(map(str, sys.argv))[:300]})\n")
        f.flush()
        yield


def lock_holder(f) -> str:
    """The lock file's "pid N (command)": the holder writes it just after it locks, over a dead holder's
    line, so a live pid is waited for (a second at most) rather than naming nobody, or the dead one."""
    for _ in range(40):
        f.seek(0)
        line = f.read().strip()
        pid = line.split()[1] if line.startswith("pid ") and len(line.split()) > 1 else ""
        if pid.isdigit() and not _dead(pid):
            return line
        time.sleep(0.025)
    return "another process"


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
        eta = f", ETA {duration((self.total - done) / rate)}" if self.total and rate > 0 else ""
        m = "" if self.unit == "MB" else "M "
        print(f"\r{self.what}: {done / self.scale:,.1f}{of} {m}{self.unit}, {rate / self.scale:,.2f} {m}{self.unit}/s{eta}   ",
              end="", file=sys.stderr, flush=True)

    def close(self, done: int):
        if self.printed:
            self.shown = 0.0
            self.update(done)
            print(file=sys.stderr)
