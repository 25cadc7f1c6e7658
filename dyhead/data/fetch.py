"""Resumable HTTP downloads, verification and safe extraction: the machinery under fetch-coco and fetch-weights.

A download is written to `<name>.part` and continued from that file's length with an HTTP Range
request, so a cut connection or a killed job costs only the bytes not yet received. The file
gets its final name only once its size and checksum match the manifest, and nothing is extracted
before that. Extraction goes to a scratch directory beside the destination and is moved into
place at the end, so an interrupted extraction never leaves half a data set under the real name.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dyhead.errors import DyheadError

CHUNK = 1 << 20
USER_AGENT = "dyhead-fetch/1.0"


@dataclass(frozen=True)
class Remote:
    """One published file: where it lives and how to recognise it."""

    name: str  # file name on disk
    path: str  # path under the base URL, e.g. "zips/val2017.zip"
    base_url: str
    size: int | None = None  # bytes; None where the publisher gives no exact size
    size_tolerance: int = 0  # bytes; torchvision publishes sizes in MiB rounded to 3 decimals
    md5: str | None = None
    sha256_prefix: str | None = None  # torch.hub's convention: the hex prefix in the file name

    def url(self, mirror: str | None = None) -> str:
        return f"{(mirror or self.base_url).rstrip('/')}/{self.path}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class Progress:
    """One line every `every` seconds (and at the end): logs stay readable under Snakemake and SLURM."""

    def __init__(self, label: str, total: int | None, done: int = 0, log=print, every: float = 10.0):
        self.label, self.total, self.done, self.log, self.every = label, total, done, log, every
        self._start_bytes, self._t0 = done, time.monotonic()
        self._last = self._t0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        rate = (self.done - self._start_bytes) / max(now - self._t0, 1e-6)
        text = f"{self.label}: {_human(self.done)}"
        if self.total:
            text += f" / {_human(self.total)} ({100.0 * self.done / self.total:.1f}%)"
        text += f", {_human(rate)}/s"
        if self.total and rate > 0:
            left = int((self.total - self.done) / rate)
            text += f", eta {left // 3600}h{left // 60 % 60:02d}m{left % 60:02d}s"
        return text


def download(url: str, dest: Path, size: int | None = None, *, retries: int = 5, timeout: float = 60.0,
             backoff: float = 2.0, log=print, progress_every: float = 10.0) -> Path:
    """Fetch `url` into `dest`.part, resuming what is there; return the .part path once complete.

    Complete means: the byte count the server announced (or `size`) has arrived. The caller
    verifies and renames. Consecutive failures without progress are retried `retries` times.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:  # a leftover of another file: start over
            part.unlink()
            have = 0
        if size is not None and have == size:
            return part
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                mode, start = "ab", have
                if have and resp.status != 206:  # the server ignored the range: take the whole file again
                    mode, start = "wb", 0
                    log(f"{dest.name}: server does not resume (HTTP {resp.status}); downloading from the start")
                elif have:
                    first = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                    if first != str(have):
                        raise DyheadError(f"{url}: asked for bytes from {have}, server sent "
                                          f"{resp.headers.get('Content-Range')!r}")
                length = resp.headers.get("Content-Length")
                total = start + int(length) if length is not None else size
                if size is not None and total is not None and total != size:
                    raise DyheadError(f"{url}: server has {total} bytes, the manifest expects {size} "
                                      "(wrong file or mirror)")
                if start:
                    log(f"{dest.name}: resuming at {_human(start)}")
                progress = Progress(dest.name, total, start, log, progress_every)
                with open(part, mode) as fh:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        fh.write(chunk)
                        progress.update(len(chunk))
                got = part.stat().st_size
                if total is not None and got < total:  # closed early without an error
                    raise http.client.IncompleteRead(b"", total - got)
                log(progress.line())
                return part
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: the .part already holds everything
                return part
            if exc.code < 500:  # not found, forbidden...: retrying will not help
                raise DyheadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            error: Exception = exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            error = exc
        now = part.stat().st_size if part.exists() else 0
        failures = 0 if now > have else failures + 1
        if failures > retries:
            raise DyheadError(f"{url}: download failed after {retries} retries ({error}); {part} keeps "
                              f"{now} bytes, run again to resume") from None
        wait = backoff * min(2 ** max(failures - 1, 0), 15)
        log(f"{dest.name}: interrupted at {_human(now)} ({error}); retry {max(failures, 1)}/{retries}, "
            f"resuming in {wait:.0f}s")
        time.sleep(wait)


def file_digest(path: Path, algorithm: str, log=print, label: str | None = None) -> str:
    h = hashlib.new(algorithm)
    total = path.stat().st_size
    progress = Progress(f"{label or path.name}: {algorithm}", total, log=log, every=30.0)
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * CHUNK):
            h.update(chunk)
            progress.update(len(chunk))
    return h.hexdigest()


def verify(path: Path, remote: Remote, log=print) -> None:
    """Size, then checksum; one-line error naming the file on a mismatch."""
    path = Path(path)
    actual = path.stat().st_size
    if remote.size is not None and abs(actual - remote.size) > remote.size_tolerance:
        what = "truncated" if actual < remote.size else "too long"
        raise DyheadError(f"{path}: {actual} bytes, expected {remote.size} ({what}: incomplete download or wrong file)")
    if remote.md5:
        got = file_digest(path, "md5", log, remote.name)
        if got != remote.md5:
            raise DyheadError(f"{path}: md5 {got} does not match the published {remote.md5} (corrupt or wrong file)")
    if remote.sha256_prefix:
        got = file_digest(path, "sha256", log, remote.name)
        if not got.startswith(remote.sha256_prefix):
            raise DyheadError(f"{path}: sha256 {got[:16]}... does not start with the published "
                              f"{remote.sha256_prefix} (corrupt or wrong file)")


def fetch_file(remote: Remote, dest: Path, *, mirror: str | None = None, log=print, **download_kw) -> Path:
    """Download (resuming), verify, then give `dest` its final name. An existing `dest` is re-verified."""
    dest = Path(dest)
    if dest.exists():
        verify(dest, remote, log)
        log(f"{dest}: present and verified")
        return dest
    url = remote.url(mirror)
    log(f"{remote.name}: downloading {url}" + (f" ({_human(remote.size)})" if remote.size else ""))
    part = download(url, dest, remote.size, log=log, **download_kw)
    try:
        verify(part, remote, log)
    except DyheadError as exc:
        bad = dest.with_name(dest.name + ".corrupt")
        os.replace(part, bad)  # keep it for inspection; a later run downloads afresh
        raise DyheadError(f"{exc}; moved to {bad}, not extracted") from None
    os.replace(part, dest)
    return dest


def _member_path(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name)
    drive = bool(p.parts) and ":" in p.parts[0]  # "C:/..." written on Windows
    if p.is_absolute() or ".." in p.parts or drive or "\\" in name:
        raise DyheadError(f"{archive}: refusing to extract the unsafe member path {name!r}")
    return p


def _merge_into(src: Path, dst: Path) -> None:
    """Move src to dst; directories that exist on both sides are merged (two archives share annotations/)."""
    if src.is_dir() and not src.is_symlink() and dst.is_dir() and not dst.is_symlink():
        for child in src.iterdir():
            _merge_into(child, dst / child.name)
        src.rmdir()
    else:
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(src, dst)


def extract_zip(archive: Path, dest: Path, log=print) -> list[str]:
    """Extract `archive` into `dest`, CRC-checked, via a scratch directory; return its top-level names."""
    archive, dest = Path(archive), Path(dest)
    scratch = dest / f".extract-{archive.name}"
    if scratch.exists():
        shutil.rmtree(scratch)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                _member_path(m.filename, archive)
                if stat.S_ISLNK(m.external_attr >> 16):  # zipfile would write the link's target as a file's text
                    raise DyheadError(f"{archive}: refusing to extract the symbolic link member {m.filename!r}")
            log(f"{archive.name}: extracting {len(members)} entries into {dest}")
            progress = Progress(f"{archive.name}: extract", sum(m.file_size for m in members), log=log, every=30.0)
            for m in members:
                zf.extract(m, scratch)  # zipfile checks each member's CRC as it reads
                progress.update(m.file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise DyheadError(f"{archive}: not a valid zip archive ({exc})") from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    top = sorted(p.name for p in scratch.iterdir())
    for name in top:
        _merge_into(scratch / name, dest / name)
    scratch.rmdir()
    return top
