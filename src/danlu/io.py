"""Files that are never seen half-written: run folders, stores, snapshots and reports are written through here (a
leaf: it imports nothing of danlu but its error type).

    write_json(run_dir / "summary.json", summary)      # temporary file, fsync, rename
    write_bytes(path, data)
    atomic_write(path, lambda f: torch.save(state, f), before_rename=check)
    sha256(path)                                        # hex digest of the file's bytes

A reader sees the old file or the whole new one, never a part; a full or read-only disk raises a one-line DanluError
and leaves the old file as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Optional, Union

from danlu.errors import DanluError

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any],
                 before_rename: Optional[Callable[[Path], None]] = None) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`. `before_rename(tmp)` runs on
    the complete, fsynced temporary file (snapshots write their checksum there)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except OSError as e:
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
        raise DanluError(f"{path}: cannot write ({e.strerror or e}); {kept}") from e
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    atomic_write(path, lambda f: f.write(data))


def write_json(path: PathLike, data: Any, indent: Optional[int] = 2) -> None:
    """Atomically replace `path` with `data` as JSON (and a final newline)."""
    write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode())


def fsync_dir(folder: PathLike) -> None:
    """Make a rename in `folder` durable (POSIX: a rename lives in the directory's metadata)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path: PathLike, extra: bytes = b"") -> str:
    """SHA-256 of the file's bytes followed by `extra`, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(extra)
    return h.hexdigest()


def offline() -> bool:
    """DANLU_OFFLINE=1: never touch the network (air-gapped machines, tests): data sets and model weights."""
    return os.environ.get("DANLU_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
