"""Opening a shard: a local path, an http(s) or `pipe:` URL (webdataset's `gopen`: curl, a shell command) or an
object-store URL (fsspec: s3://, gs://, ...), as one readable binary stream; the stage webdataset calls `gopen`.

    stream = open_stream("https://host/shards/train-000000.tar")   # or a path, pipe:CMD, s3://bucket/x.tar
    index = read_bytes("shards/index.json", "index")               # a small file, whole
"""
from __future__ import annotations

import re
from pathlib import Path

from danlu.errors import DanluError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # scheme: http://, s3://, pipe:, file://
_FSSPEC = ("s3", "gs", "gcs", "az", "abfs", "abfss", "hdfs", "webhdfs")  # opened through fsspec


def is_url(path: str) -> bool:
    """Whether `path` has a scheme (http://, s3://, pipe:, file://), not a Windows drive letter."""
    return bool(_URL.match(path)) and not re.match(r"^[a-zA-Z]:[\\/]", path)


def join_url(base: str, rel: str) -> str:
    """`rel` under `base`: a URL's path joined with '/', a folder's with the platform's separator."""
    return base.rstrip("/") + "/" + rel if is_url(base) else str(Path(base) / rel)


def short_name(url: str) -> str:
    """A shard's name in messages: the last two path parts (train/shard-000003.tar)."""
    return "/".join(url.rstrip("/").split("/")[-2:])


def open_stream(url: str, what: str = "shard"):
    """A readable binary stream of a local path, an http(s) / pipe: URL (webdataset's gopen: curl, a shell command)
    or an object-store URL (fsspec: s3://, gs://, ...). A missing file or an unknown scheme: DanluError."""
    scheme = url.split(":", 1)[0].lower() if is_url(url) else ""
    if scheme in ("", "file"):
        path = re.sub(r"^file://", "", url)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise DanluError(f"data.root: {what} {path} not found; expected a readable file") from None
        except OSError as e:
            raise DanluError(f"data.root: {what} {path}: cannot read it ({e.strerror})") from None
    if scheme in _FSSPEC:
        try:
            import fsspec  # an optional extra (danlu[cloud]): imported only for its URLs
        except ImportError:
            raise DanluError(f"data.root={url}: {scheme}:// needs fsspec (pip install 'danlu[cloud]'); expected a "
                             f"folder, an http(s) URL or an installed fsspec") from None
        try:
            return fsspec.open(url, "rb").open()
        except ImportError as e:  # fsspec is there, its s3fs / gcsfs is not
            raise DanluError(f"data.root={url}: {scheme}:// needs another package ({e}); pip install "
                             f"'danlu[cloud]'") from None
        except FileNotFoundError:
            raise DanluError(f"data.root: {what} {url} not found") from None
        except Exception as e:  # noqa: BLE001 - credentials, network: the store's own words, one line
            raise DanluError(f"data.root: {what} {url}: cannot open it ({type(e).__name__}: {e})") from None
    from webdataset.gopen import gopen, gopen_schemes  # webdataset is slow to import: only where a URL opens

    if scheme not in gopen_schemes:
        raise DanluError(f"data.root={url}: unknown scheme '{scheme}:'; expected a folder, http(s)://, pipe:, or "
                         f"with fsspec installed {', '.join(s + '://' for s in _FSSPEC[:3])}")
    try:
        return gopen(url, "rb")
    except Exception as e:  # noqa: BLE001
        raise DanluError(f"data.root: {what} {url}: cannot open it ({e})") from None


def close_stream(stream, url: str, what: str) -> None:  # noqa: ANN001 - a file, a gopen Pipe, an fsspec file
    """Close a stream; a curl or pipe: command that failed (HTTP 404: curl's exit 22) becomes a DanluError."""
    try:
        stream.close()
    except Exception as e:  # noqa: BLE001 - webdataset's Pipe raises IOError with the exit status
        status = getattr(stream, "status", None)
        hint = " (curl's exit 22: the server answered with an error such as 404)" if status == 22 else ""
        raise DanluError(f"data.root: {what} {url} could not be read: exit status {status}{hint}" if status is not None
                         else f"data.root: {what} {url} could not be read ({e})") from None


def read_bytes(url: str, what: str) -> bytes:
    """The whole content of a (small) file or URL: index.json."""
    stream = open_stream(url, what)
    try:
        data = stream.read()
    except Exception as e:  # noqa: BLE001
        close_stream(stream, url, what)
        raise DanluError(f"data.root: {what} {url} could not be read ({e})") from None
    close_stream(stream, url, what)
    return data
