"""Downloads that survive bad networks, and archives opened safely.

    path = download(["https://a.example/f.gz", "https://mirror.example/f.gz"], Path("cache/f.gz"), md5="...")
    extract_tar(Path("cache/set.tar.gz"), Path("cache/set"))

`download` writes to `<dest>.part`, resumes a partial file with an HTTP Range request (after a dropped connection,
and in a later call after an interrupted one), checks the finished file against its published MD5 and only then
renames it into place: a file that fails the check is deleted, never kept. Mirrors are tried in order (torchvision's
practice where an official host is known to fail). Every failure becomes one `DanluError` naming the URLs and why.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Optional

from danlu.errors import DanluError
from danlu.io import offline  # noqa: F401  (data sets and model weights ask the same question: io.offline)

CHUNK = 1 << 16
RETRIES = 4  # resumed attempts per mirror after a dropped connection


class NetworkError(DanluError):
    """No mirror could be reached (offline, blocked, DNS): the caller can say which files to place by hand."""


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(urls: Sequence[str], dest: Path, *, md5: Optional[str], timeout: float = 30.0,
             progress: bool = True) -> Path:
    """Fetch `dest` from the first URL that delivers a file with the right MD5; resume `<dest>.part` if present."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problems, reached = [], False
    if offline():
        raise NetworkError(f"{dest.name}: not downloaded (DANLU_OFFLINE is set)")
    for url in urls:
        try:
            _fetch(url, part, timeout, progress)
        except (urllib.error.URLError, HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            reached |= isinstance(e, urllib.error.HTTPError)
            problems.append(f"{url}: {reason}")
            continue
        reached = True
        got = file_md5(part) if md5 else None
        if md5 and got != md5:
            part.unlink()  # a bad file is never kept, and never resumed from
            problems.append(f"{url}: checksum mismatch (md5 {got}, expected {md5}); the file was deleted")
            continue
        os.replace(part, dest)
        return dest
    cls = DanluError if reached else NetworkError
    raise cls(f"{dest.name}: download failed: " + "; ".join(problems))


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Download `url` into `part`, appending to what is there (HTTP Range); retried after dropped connections."""
    for attempt in range(RETRIES + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "danlu (python urllib)"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: the partial file is already whole (checked next)
                return
            raise
        with resp:
            resumed = resp.status == 206
            if have and resumed and not _range_starts_at(resp.headers.get("Content-Range", ""), have):
                raise HTTPException(f"server answered the range request from byte {have} with "
                                    f"{resp.headers.get('Content-Range')!r}")
            total = _total_length(resp, have if resumed else 0)
            got = have if resumed else 0
            try:
                with open(part, "ab" if resumed else "wb") as f:
                    shown = time.monotonic()
                    while block := resp.read(CHUNK):
                        f.write(block)
                        got += len(block)
                        if progress and sys.stderr.isatty() and time.monotonic() - shown > 0.5:
                            shown = time.monotonic()
                            _show(url, got, total)
            except (HTTPException, OSError) as e:  # dropped connection mid-body: keep what arrived, resume
                if attempt == RETRIES:
                    raise HTTPException(f"connection dropped at byte {got} ({e}); {RETRIES} resumes failed") from e
                continue
            if progress and sys.stderr.isatty():
                print(file=sys.stderr)
        if total is None or got >= total:
            return
        if attempt == RETRIES:
            raise HTTPException(f"connection closed at byte {got} of {total}; {RETRIES} resumes failed")


def _range_starts_at(content_range: str, start: int) -> bool:
    m = re.match(r"bytes (\d+)-", content_range.strip())
    return bool(m) and int(m.group(1)) == start


def _total_length(resp, offset: int) -> Optional[int]:
    n = resp.headers.get("Content-Length")
    return offset + int(n) if n is not None and n.isdigit() else None


def _show(url: str, got: int, total: Optional[int]) -> None:
    name = url.rsplit("/", 1)[-1]
    if total:
        print(f"\rdownloading {name}: {got / 2**20:.1f} / {total / 2**20:.1f} MiB ({100 * got / total:.0f}%)",
              end="", file=sys.stderr, flush=True)
    else:
        print(f"\rdownloading {name}: {got / 2**20:.1f} MiB", end="", file=sys.stderr, flush=True)


def extract_tar(archive: Path, dest: Path) -> Path:
    """Extract a tar (.tar, .tar.gz, .tgz) into `dest` with tarfile's "data" filter: no member outside `dest`, no
    absolute or outside-pointing links, no device files. A refused member raises DanluError naming it; nothing is
    left half-extracted (extraction goes to a temporary folder that is renamed into place)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: the same rules, checked here
                for m in tar.getmembers():
                    _refuse_unsafe(m, tmp, archive)
                tar.extractall(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except getattr(tarfile, "FilterError", ()) as e:
        raise DanluError(f"{archive}: refused to extract member '{e.tarinfo.name}' ({e}); the archive is unsafe "
                         f"or corrupted") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DanluError(f"{archive}: not a readable tar archive ({e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _refuse_unsafe(m: tarfile.TarInfo, root: Path, archive: Path) -> None:
    """tarfile's "data" filter for Pythons without it: regular files and folders inside `root`, nothing else."""
    target = os.path.realpath(os.path.join(root, m.name))
    if os.path.isabs(m.name) or os.path.commonpath([os.path.realpath(root), target]) != os.path.realpath(root):
        raise DanluError(f"{archive}: refused to extract member '{m.name}' (outside the destination); the archive "
                         f"is unsafe or corrupted")
    if not (m.isfile() or m.isdir()):
        raise DanluError(f"{archive}: refused to extract member '{m.name}' (a link or special file); the archive "
                         f"is unsafe or corrupted")
