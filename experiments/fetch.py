"""Download the public data sets of the paper's experiment into $TGL_CACHE/data/NAME, resumably
(the command line: `python -m experiments.realdata fetch NAME`).

Hub downloads honour $HF_ENDPOINT (a Hugging Face mirror); TempLAMA and Dynamic TempLAMA come from
$TGL_TEMPLAMA_URL and $TGL_DYNAMIC_TEMPLAMA_URL when set. Files arrive as NAME.part and are resumed
with HTTP Range requests after an interruption (`download`, which checkpoint.py's hub names use too).
"""
import csv
import fcntl
import io
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from common import atomic_path, write_text
from experiments.tools import folder_lock, remove_dead_temporaries

# ----------------------------------------------------------------------------- one resumable download

def _get(url, part, timeout, lock):
    """One request appending to `part` from its size (Range; If-Range: ETag in `lock`)."""
    import requests
    have = os.path.getsize(part) if os.path.exists(part) else 0
    lock.seek(0)
    etag = lock.read()  # the ETag of the file `part` began as: If-Range, so a changed file is sent whole
    h = {"Range": f"bytes={have}-", "If-Range": etag or None}
    with requests.get(url, stream=True, timeout=timeout, **({"headers": h} if have else {})) as r:
        if r.status_code == 404:
            raise FileNotFoundError(url)
        if r.status_code == 416:  # complete, or another file's
            if not r.headers.get("Content-Range", "").endswith(f"/{have}"):
                os.remove(part)
                raise OSError(f"{part} does not fit the file on the server; removed")
            return
        r.raise_for_status()
        if r.status_code != 206:  # 200: all again (the file changed, or the server ignores Range)
            have = 0
        if have and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise OSError(f"asked for bytes {have}-, got {r.headers.get('Content-Range')!r}")
        lock.truncate(0)
        print(r.headers.get("ETag", ""), end="", file=lock, flush=True)
        gzip, length = "Content-Encoding" in r.headers, int(r.headers.get("Content-Length", 0))
        shown = time.time()
        with open(part, "ab" if have else "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                if time.time() - shown > 10:
                    shown = time.time()
                    print(f"{url}: {f.tell() / 1e6:,.0f} of {(have + length) / 1e6:,.0f} MB", file=sys.stderr)
            if length and not gzip and f.tell() != have + length:  # gzip: a compressed length
                raise OSError(f"got {f.tell()} of {have + length} bytes")

def download(url: str, dest: str, retries: int = 3, timeout=30.0) -> str:
    """url -> dest via dest.part, renamed once complete; a broken transfer resumes, here or in a later call;
    no network fails at once."""
    import requests
    part = dest + ".part"
    with open(dest + ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(f"another process is downloading {dest}; wait for it")
        for attempt in range(1, retries + 1):
            before = os.path.getsize(part) if os.path.exists(part) else 0
            try:
                _get(url, part, timeout, lock)
                os.replace(part, dest)
                return dest
            except FileNotFoundError:
                raise
            except (requests.RequestException, OSError) as e:
                moved = os.path.exists(part) and os.path.getsize(part) > before
                if isinstance(e, requests.ConnectionError) and not moved:
                    raise OSError(f"cannot reach {url} ({type(e).__name__}): no network? download it "
                                  "elsewhere and pass the local file or folder") from None
                if attempt == retries:
                    raise OSError(f"download of {url} failed after {retries} tries: {e}") from None
                print(f"download of {url} failed ({e}); retry {attempt}/{retries - 1}", file=sys.stderr)
                time.sleep(2 ** attempt)


def hub_endpoint() -> str:  # the one reading of $HF_ENDPOINT (a Hugging Face mirror)
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def tgl_cache() -> Path:  # the one reading of $TGL_CACHE: hub models, and the data sets under data/
    return Path(os.environ.get("TGL_CACHE") or Path.home() / ".cache" / "tgl")


HUB_EXTRAS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hub_config(name: str, download_it=True) -> str | None:
    """A hub model's config.json alone (a few kB: its sizes before the weights), downloaded once into the
    folder hub_folder fills; None if it is not here and not download_it."""
    path = os.path.join(tgl_cache(), name.replace("/", "--"), "config.json")
    if not os.path.isfile(path) and download_it:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        url = f"{hub_endpoint()}/{name}/resolve/main/config.json"
        try:
            download(url, path)
        except FileNotFoundError:
            raise ValueError(f"{name}: {url} is not there (404): no such hub model? Check the name, "
                             "or pass a local folder") from None
    return path if os.path.isfile(path) else None


def hub_folder(name: str) -> str:
    """A hub model's files, downloaded once (checkpoint.load_model's hub names): config.json, then
    model.safetensors, or model.safetensors.index.json and its shards, or the older pytorch_model.bin;
    then the tokenizer files the repository has (HUB_EXTRAS). .complete, written last, says all is there."""
    folder = os.path.dirname(hub_config(name))
    if os.path.exists(os.path.join(folder, ".complete")):
        return folder
    url = f"{hub_endpoint()}/{name}/resolve/main/"

    def get(f):  # a file not there yet; 404: FileNotFoundError
        path = os.path.join(folder, f)
        if not os.path.exists(path):
            download(url + f, path)
        return path
    from experiments.hf import INDEX, weight_files
    if not {"model.safetensors", INDEX, "pytorch_model.bin"} & set(os.listdir(folder)):
        try:
            get("model.safetensors")
        except FileNotFoundError:
            try:
                get(INDEX)  # a large model: an index of shards
            except FileNotFoundError:  # old repositories have only pytorch_model.bin
                get("pytorch_model.bin")
    if os.path.exists(os.path.join(folder, INDEX)):
        for shard, _ in weight_files(folder):  # weight_files checks the shards' names: plain file names
            get(os.path.basename(shard))
    for f in HUB_EXTRAS:
        try:
            get(f)
        except FileNotFoundError:
            pass  # not every repository has every tokenizer file
    write_text(os.path.join(folder, ".complete"), "")
    return folder


ECBD_HELP = ("ECBD is a browser-only download: open the box.com folder linked from "
             "https://github.com/yasumasaonoe/ecbd, download and unpack it, then run "
             "`python -m experiments.realdata fetch ecbd --folder PATH` (PATH holds one folder per year, e.g. "
             "ecbd2021/np_spans_test.json), or pass its files to --probes directly")
TEMPLAMA_URL = "https://storage.googleapis.com/gresearch/templama"
DYNAMIC_URL = ("https://raw.githubusercontent.com/amazon-science/temporal-robustness/main/data/dynamic-templama/"
               "dataset_from_2019-1-1_to_2022-6-31_per_quarter")
SNAPSHOT_PART = re.compile(r"(?:^|/)wikipedia_(\d{2})_gpt2/[^/]*\.csv$")  # Wikipedia_Full/wikipedia_08_gpt2/part0.csv


def twiki_url():
    return f"{hub_endpoint()}/datasets/seonghyeonye/TemporalWiki/resolve/main"


@dataclass
class Dataset:
    base: object  # () -> the base URL, read when fetching so the environment variables count
    files: tuple  # file names under the base URL
    layout: str  # a regex that some member of the archive (or the file itself) must match
    disk: str  # what it takes on disk, for the help and the README


DATASETS = {
    "twiki-probes": Dataset(twiki_url, ("TWiki_Probes.zip",), r"(?:^|/)\d{4}-\d{4}_(?:un)?changed\.csv$",
                            "620 kB download, a few MB unpacked"),
    "twiki-diffsets": Dataset(twiki_url, ("TWiki_Diffsets.zip",), r"(?:^|/)wikipedia_\d{4}_gpt2\.csv$",
                              "932 MB download plus the unpacked CSVs (checked before unpacking)"),
    "twiki-snapshot": Dataset(twiki_url, ("Wikipedia_Full.zip",), SNAPSHOT_PART.pattern,
                              "24.7 GB download plus the unpacked CSVs; with --max-mb N about N MB"),
    "templama": Dataset(lambda: os.environ.get("TGL_TEMPLAMA_URL", TEMPLAMA_URL).rstrip("/"),
                        ("train.json", "val.json", "test.json"), "query", "about 20 MB"),
    "dynamic-templama": Dataset(lambda: os.environ.get("TGL_DYNAMIC_TEMPLAMA_URL", DYNAMIC_URL).rstrip("/"),
                                ("train.jsonl", "val.jsonl", "test.jsonl"), "query", "about 20 MB"),
}


def cache_root() -> Path:  # the data sets' downloads
    return tgl_cache() / "data"


# ----------------------------------------------------------------------------- archives and files
# An unpack is all or nothing and never touches what it did not create: the archive goes into
# .unpack.PID first (a killed run's folder is removed by the next run), its top-level entries are
# moved into the folder once all is out, and the marker .ARCHIVE.done, written last, lists them and
# every file with its size: "already there" means the marker and those files. .ARCHIVE.unpacking,
# written before the moves, lists the same, so a run killed while moving may replace what it moved.
MAX_RATIO = 100  # a member inflating more than this (and past 1 MB) is refused: text zips to ~1/4


def _check_members(zf, where, layout) -> dict:
    """Refuse an archive that is not the expected layout, would write outside its folder, or inflates
    like a zip bomb. Returns {member: size} of its files."""
    names = zf.namelist()
    bad = [n for n in names if n.startswith(("/", "\\")) or ".." in Path(n).parts]
    if bad:
        raise ValueError(f"{where}: unsafe member path {bad[0]!r}; not unpacking")
    if not any(re.search(layout, n) for n in names):
        raise ValueError(f"{where}: not the expected layout (no member matches {layout!r}; "
                         f"first members: {', '.join(names[:3]) or 'none'})")
    for i in zf.infolist():
        if i.file_size > max(MAX_RATIO * i.compress_size, 1 << 20):
            raise ValueError(f"{where}: member {i.filename} would inflate {i.compress_size:,} bytes to "
                             f"{i.file_size:,} (over {MAX_RATIO}x, a zip bomb?); not unpacking")
    return {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}


def _marker(path: Path):
    """A marker's {"tops": [entries], "files": {name: size}}; None if there is none or it is not one."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("tops"), list) and isinstance(m.get("files"), dict)
    return m if ok else None


def unpacked(folder: Path, fname: str, layout: str) -> bool:
    """Archive fname was unpacked into folder completely: its marker lists files that are all there."""
    done = folder / f".{fname}.done"
    if done.is_file() and done.stat().st_size == 0:  # the first version's empty marker: the layout is there
        return any(re.search(layout, p.relative_to(folder).as_posix()) for p in folder.rglob("*"))
    files = (_marker(done) or {}).get("files")
    return bool(files) and all((folder / n).is_file() and (folder / n).stat().st_size == s
                               for n, s in files.items())


def _check_free(folder: Path, fname: str, tops: set):
    """Before unpacking: a top-level entry of the archive already in folder must be one fetch unpacked
    there (listed by a marker of this archive), else it is the user's and is not replaced."""
    ours = set()
    for path in (folder / f".{fname}.done", folder / f".{fname}.unpacking"):
        m = _marker(path)
        ours |= set(m["tops"]) if m else tops if path.is_file() else set()  # no list: the old empty marker
    taken = sorted(t for t in tops - ours if os.path.lexists(folder / t))
    if taken:
        raise ValueError(f"{folder / taken[0]} is in the way of unpacking {fname} and was not unpacked by "
                         "fetch; move it away, or fetch into another folder with --out")


def _set_aside(archive: Path, why: str) -> ValueError:
    """A corrupt archive (a broken transfer, or a resume appended to another file) is renamed, so that
    the next run fetches it anew instead of failing the same way forever."""
    os.replace(archive, archive.with_name(archive.name + ".bad"))
    return ValueError(f"{archive}: {why}; kept as {archive.name}.bad: run again to fetch it anew")


def _extract(zf, archive: Path, tmp: Path):
    """Every member into tmp; a bad CRC or a member inflating past its declared size names the member."""
    for info in zf.infolist():
        dest = tmp / info.filename
        if info.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(info) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    if out.tell() + len(chunk) > info.file_size:
                        raise zipfile.BadZipFile(f"inflates past its declared {info.file_size:,} bytes")
                    out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise _set_aside(archive, f"member {info.filename} is corrupt ({e})") from None


def unpack(archive: Path, folder: Path, layout: str):
    """Unzip archive into folder, all or nothing (see above). The archive is removed afterwards (it
    doubles the disk)."""
    remove_dead_temporaries(folder, ".unpack")
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise _set_aside(archive, "not a zip file") from None
    with zf:
        files = _check_members(zf, archive, layout)
        need, free = sum(files.values()), shutil.disk_usage(folder).free
        if need > free:
            raise OSError(f"{archive}: unpacking needs {need / 1e9:.1f} GB, {folder} has {free / 1e9:.1f} GB free")
        tops = sorted({Path(n).parts[0] for n in zf.namelist()})
        _check_free(folder, archive.name, set(tops))
        tmp = folder / f".unpack.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _extract(zf, archive, tmp)
            moving = folder / f".{archive.name}.unpacking"
            write_text(moving, json.dumps({"tops": tops, "files": files}))
            for top in tmp.iterdir():
                if (folder / top.name).is_dir() and not (folder / top.name).is_symlink():
                    shutil.rmtree(folder / top.name)  # ours (checked above): a killed earlier unpack's
                os.replace(top, folder / top.name)
            done = {"archive": archive.name, "tops": tops, "files": files}
            write_text(folder / f".{archive.name}.done", json.dumps(done))  # last: now it is complete
            moving.unlink()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    archive.unlink()


def _check_jsonl(path: Path, key: str):
    """A TempLAMA file must be JSON lines with `key`: an HTML error page saved as .json is refused."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        ok = key in json.loads(first)
    except (json.JSONDecodeError, TypeError):
        ok = False
    if not ok:
        path.rename(path.with_suffix(path.suffix + ".bad"))
        raise ValueError(f"{path}: not the expected layout (JSON lines with '{key}'); kept as {path.name}.bad")


def fetch(name: str, out=None, max_mb=None, max_docs=None, month=None) -> Path:
    """Download (and unpack) data set `name` into out (default $TGL_CACHE/data/name); returns the folder.
    A finished fetch is not repeated: a file or completely unpacked archive already there is kept."""
    if name == "ecbd":
        raise ValueError(ECBD_HELP)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(list(DATASETS) + ['ecbd'])}")
    for flag, v in (("--max-mb", max_mb), ("--max-docs", max_docs)):
        if v is not None and not 0 < v < math.inf:  # nan fails too
            raise ValueError(f"{flag} {v}: want a positive finite number")
    ds, folder = DATASETS[name], Path(out or cache_root() / name)
    if (max_mb or max_docs) and name != "twiki-snapshot":
        raise ValueError(f"--max-mb/--max-docs apply to twiki-snapshot only, not {name}")
    # one fetch per folder at a time: a second one would download and unpack into the same files
    with folder_lock(folder):
        folder.mkdir(parents=True, exist_ok=True)
        if max_mb or max_docs:
            return snapshot_prefix(f"{ds.base()}/{ds.files[0]}", folder, max_mb, max_docs, month)
        for fname in ds.files:
            dest = folder / fname
            if unpacked(folder, fname, ds.layout) or (dest.exists() and not fname.endswith(".zip")):
                print(f"{name}: {fname} already in {folder}")
                continue
            if not dest.exists():
                # timeout (connect, read): no network fails fast
                download(f"{ds.base()}/{fname}", str(dest), timeout=(10.0, 60.0))
            if fname.endswith(".zip"):
                unpack(dest, folder, ds.layout)
            else:
                _check_jsonl(dest, ds.layout)
    print(f"{name}: in {folder}")
    return folder


def register_ecbd(src, out=None) -> Path:
    """Check an unpacked ECBD folder (year folders of np_spans_*.json / random_spans_*.json) and
    link it into the cache as data/ecbd."""
    src = Path(src).expanduser().resolve()
    found = sorted(src.glob("*/*_spans_*.json"))
    if not src.is_dir() or not found:
        raise ValueError(f"{src}: not an unpacked ECBD folder (no YEAR/np_spans_*.json inside). {ECBD_HELP}")
    link = Path(out or cache_root() / "ecbd")
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() and not link.is_symlink():
        raise ValueError(f"{link} exists and is not a link; remove it or pass --out")
    if link.is_symlink():
        link.unlink()
    link.symlink_to(src, target_is_directory=True)
    print(f"ecbd: {len(found)} files in {', '.join(sorted({f.parent.name for f in found}))}; linked as {link}")
    return link


# ----------------------------------------------------------------------------- a prefix of the snapshot zip
# Wikipedia_Full.zip is 24.7 GB. A zip's table of contents (the central directory) is at its end, so
# a prefix of the archive cannot be unzipped in general. Instead the remote file is opened as a
# seekable file that reads with HTTP Range requests: zipfile reads the central directory from the
# end (a few MB), then streams only the first CSV parts of one snapshot month, inflating as it
# goes, and stops once --max-mb of text or --max-docs rows are out. Only those bytes are downloaded.

RETRIES = 3


class RangeFile(io.RawIOBase):
    """A remote file as a read-only seekable file; each non-sequential read opens a Range request."""

    def __init__(self, url: str, timeout: float = 60.0):
        import requests
        self.url, self.timeout, self.pos, self.resp, self.resp_pos, self.fetched = url, timeout, 0, None, -1, 0
        try:
            r = requests.get(url, headers={"Range": "bytes=0-0"}, timeout=timeout)
        except requests.ConnectionError as e:
            raise OSError(f"cannot reach {url} ({type(e).__name__})") from None
        if r.status_code == 404:
            raise FileNotFoundError(url)
        r.raise_for_status()
        total = r.headers.get("Content-Range", "").rsplit("/", 1)[-1]
        if r.status_code != 206 or not total.isdigit():
            raise OSError(f"{url}: the server does not serve byte ranges, so no prefix can be read; "
                          "fetch without --max-mb/--max-docs")
        self.size = int(total)

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, b):
        """Read at self.pos; a dropped connection is reopened there (RETRIES tries), then one line."""
        import requests
        import urllib3
        if self.pos >= self.size:
            return 0
        for attempt in range(RETRIES):
            try:
                if self.resp is None or self.resp_pos != self.pos:
                    self._drop()
                    self.resp = requests.get(self.url, headers={"Range": f"bytes={self.pos}-"}, stream=True,
                                             timeout=self.timeout)
                    if self.resp.status_code != 206:
                        raise OSError(f"range request at byte {self.pos} answered {self.resp.status_code}")
                    self.resp_pos = self.pos
                if data := self.resp.raw.read(len(b)):
                    break
                why = "the connection closed"
            except (OSError, urllib3.exceptions.HTTPError) as e:  # requests' errors are OSErrors
                why = str(e) if type(e) is OSError else type(e).__name__  # a status; else a long repr
            self._drop()
            time.sleep(attempt)
        else:
            raise OSError(f"{self.url}: reading at byte {self.pos} of {self.size} failed {RETRIES} times "
                          f"({why}); run again later (the prefix is written only when complete)")
        b[:len(data)] = data
        self.pos += len(data)
        self.resp_pos, self.fetched = self.pos, self.fetched + len(data)
        return len(data)

    def _drop(self):
        if self.resp is not None:
            self.resp.close()
            self.resp = None

    def close(self):
        self._drop()
        super().close()


def _snapshot_members(zf, month, where):
    parts = sorted((n for n in zf.namelist() if SNAPSHOT_PART.search(n)), key=lambda n: (len(n), n))  # part2 < part10
    months = sorted({SNAPSHOT_PART.search(n).group(1) for n in parts})
    if not parts:
        raise ValueError(f"{where}: not the expected layout (no wikipedia_MM_gpt2/*.csv member)")
    month = month or months[0]
    if month not in months:
        raise ValueError(f"{where}: no snapshot for month {month!r}; the archive has {', '.join(months)}")
    return month, [n for n in parts if SNAPSHOT_PART.search(n).group(1) == month]


def _copy_rows(zf, members, w, max_bytes, max_docs, where):
    """Rows of the members' `text` column into csv writer w, until the limits. Returns (docs, bytes)."""
    from data import _csv_records  # the one CSV reader: a short row or an unclosed quote is one line (file:line)
    docs, size = 0, 0
    for m in members:
        with zf.open(m) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
            for _, row in _csv_records(text, f"{where}:{m}", ["text"]):
                w.writerow([row["text"]])
                docs, size = docs + 1, size + len(row["text"].encode())
                if (max_docs and docs >= max_docs) or (max_bytes and size >= max_bytes):
                    return docs, size
    return docs, size


def snapshot_prefix(url: str, folder: Path, max_mb=None, max_docs=None, month=None) -> Path:
    """The first documents of one snapshot month of Wikipedia_Full.zip, read remotely (see above),
    written as wikipedia_MM_gpt2_prefix.csv (a `text` column, as the snapshot parts have)."""
    f = RangeFile(url)
    try:
        with zipfile.ZipFile(io.BufferedReader(f, buffer_size=1 << 18)) as zf:
            month, members = _snapshot_members(zf, month, url)
            dest = folder / f"wikipedia_{month}_gpt2_prefix.csv"
            with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
                w = csv.writer(out)
                w.writerow(["text"])
                docs, size = _copy_rows(zf, members, w, int((max_mb or 0) * 1e6), max_docs, url)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{url}: not a zip file ({e})") from None
    finally:
        f.close()
    print(f"twiki-snapshot: {docs:,} documents, {size / 1e6:.1f} MB of text of month {month} in {dest} "
          f"({f.fetched / 1e6:.1f} MB downloaded of {f.size / 1e6:.1f} MB)", file=sys.stderr)
    return dest
