"""A shard's samples: its tar members grouped by key (webdataset's `tariterators`), each sample's image and label,
and which samples are valid; the stage webdataset calls `tariterators`.

    labels = Labels("cls", ["ant", "bee"])                       # .cls holds a class index; by_name: a class name
    good, skipped = read_shard("shards/train-000000.tar", labels)  # [(key, image bytes, class)], [{shard, key, reason}]

A sample is `{key}.jpg` (or .jpeg, .png, .webp) with its label in `{key}.{label_key}` (`cls` by default; `txt`;
`json:FIELD` reads a field of `{key}.json`): an integer class index or a class name. A sample without an image or a
label is skipped and counted; a shard that ends early (truncated, corrupt) gives the samples read before, and says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from danlu.data.wds.urls import close_stream, open_stream
from danlu.errors import few

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Labels:
    """How a sample's label is read: the key (`cls`, `txt`, `json:FIELD`, or any extension) and whether the labels
    are class indices (`by_name=False`: an integer 0..len(classes)-1) or class names."""
    key: str
    classes: list[str]
    by_name: bool = False

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.classes)}

    @property
    def ext(self) -> str:
        return "json" if self.key.startswith("json:") else self.key

    def lookup(self, text: str) -> Union[int, str]:
        """The class index of a raw label, or the reason it is not one."""
        if self.by_name:
            return self._index.get(text, f"label '{text[:40]}' is not one of the classes ({few(self.classes, 3)})")
        if text.isdigit() and int(text) < len(self.classes):
            return int(text)
        return f"label '{text[:40]}' is not a class index 0..{len(self.classes) - 1}"


def raw_label(sample: dict[str, Any], key: str) -> tuple[Optional[str], str]:
    """(the label as text, '') or (None, why there is none) of a grouped sample."""
    ext = "json" if key.startswith("json:") else key
    if ext not in sample:
        return None, f"no label (.{ext})"
    try:
        text = bytes(sample[ext]).decode("utf-8").strip()
        if key.startswith("json:"):
            value: Any = json.loads(text)
            for part in key[5:].split("."):
                value = value[part] if isinstance(value, dict) else None
            if value is None or isinstance(value, (dict, list, bool, float)):
                return None, f"no label ('{key[5:]}' in .json)"
            text = str(value).strip()
    except (UnicodeDecodeError, ValueError):
        return None, f"unreadable label (.{ext} is not UTF-8 text{' or JSON' if ext == 'json' else ''})"
    return (text, "") if text else (None, f"empty label (.{ext})")


@dataclass
class RawSample:
    """One grouped sample of a shard, before its label is checked against the classes."""
    key: str
    image: Optional[bytes]  # None: no image in the sample
    ext: str  # the image's extension ('' without one)
    label: Optional[str]  # the label as text, None without one
    reason: str  # why there is no label ('' with one)


class _Tail:
    """A read-only stream that remembers its last 1024 bytes: a whole tar ends with two zero blocks, a tar cut at a
    member boundary does not (Python's tarfile reads both as a normal end)."""

    def __init__(self, f):  # noqa: ANN001
        self.f, self.tail = f, b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.tail = (self.tail + data[-1024:])[-1024:]
        return data

    def whole(self) -> bool:
        while self.read(1 << 16):  # what tarfile left unread after the first zero block
            pass
        return self.tail == bytes(1024)

    def __getattr__(self, name: str) -> Any:  # close(), status, ...: the wrapped stream's
        return getattr(self.f, name)


def read_samples(url: str, label_key: str) -> tuple[list[RawSample], Optional[str]]:
    """Every sample of one shard in file order (webdataset's tar iterator and key grouping), and the error that ended
    the shard early (a truncated or corrupt tar), if one did."""
    from webdataset.tariterators import group_by_keys, tar_file_expander  # slow to import: only where shards are read

    errors: list[BaseException] = []

    def stop(exn: BaseException) -> bool:  # webdataset's handler: record, end this shard
        errors.append(exn)
        return False

    stream = _Tail(open_stream(url))
    out = []
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=stop)
        for s in group_by_keys(files, handler=stop):
            ext = next((k for k in IMAGE_KEYS if k in s), "")
            text, reason = raw_label(s, label_key)
            out.append(RawSample(s["__key__"], bytes(s[ext]) if ext else None, ext, text, reason))
        whole = not errors and stream.whole()
    finally:
        close_stream(stream, url, "shard")
    if not errors:
        return out, None if whole else (f"shard ends early (no end-of-archive blocks: truncated); {len(out)} "
                                         f"samples read before")
    e = errors[0]
    msg = str(e.args[0] if e.args else e).split(" @ ")[0].strip() or type(e).__name__
    return out, f"shard ends early ({type(e).__name__}: {msg[:120]}); {len(out)} samples read before"


def class_index(r: RawSample, labels: Labels) -> Union[int, str]:
    """A raw sample's class index, or why it is skipped."""
    if r.image is None:
        return "no image (.jpg, .jpeg, .png or .webp)"
    if r.label is None:
        return r.reason
    return labels.lookup(r.label)


def read_shard(url: str, labels: Labels) -> tuple[list[tuple[str, bytes, int]], list[dict[str, Any]]]:
    """The valid samples of one shard in file order, (key, image bytes, class index), and the skipped ones
    ({shard, key, reason}; a shard that ends early adds one entry without a key)."""
    raw, broken = read_samples(url, labels.key)
    good, skipped = [], []
    for r in raw:
        v = class_index(r, labels)
        if isinstance(v, int):
            good.append((r.key, r.image, v))
        else:
            skipped.append({"shard": url, "key": r.key, "reason": v})
    if broken:
        skipped.append({"shard": url, "reason": broken})
    return good, skipped
