"""WebDataset tar shards: compressed images and labels streamed from a folder or a URL, decoded as they arrive.

    train, test = load_dataset("wds", root="shards", size=224)              # danlu prepare's output (index.json)
    train, test = load_dataset("wds", root="https://host/shards/")          # the same folder served over HTTP
    train, test = load_dataset("wds", root="data/train-{000000..000127}.tar", label_key="json:label")
    loader = make_loader(train.images, train.labels, 64, device="cuda", seed=0, rank=r, world=w)   # a ShardLoader

Reading tar files is the `webdataset` library's job (its tar iterator and sample grouping; its `gopen` opens http(s)
with curl and `pipe:` commands; s3:// gs:// ... go through fsspec where installed). One module per stage of the
stream, as webdataset's own `gopen`, `tariterators` and `shardlists`:

    urls.py      open a shard or a file: a path, http(s)://, pipe:, s3:// ... (open_stream, read_bytes, is_url)
    samples.py   a shard's samples, their images and labels, which are valid (Labels, read_shard)
    shards.py    data.root -> splits of shards with their counts: index.json or a scan; held-out shards
                 (find_shards, open_source, hold_out)
    sets.py      what load_dataset returns: ShardSet, ShardImages (probes, statistics), load_shards
    loader.py    ShardLoader: the epoch's order, reading ahead, decoding in threads or processes, data.timeout
    prepare.py   writing shards (prepare_shards) and looking into any (inspect_shards)

Decoding a batch's rows is danlu.data.decode's (decode_rows on the CPU, decode_cuda with nvJPEG). Importing this
package imports none of its modules: each loads what it needs, and the names below load their module when asked for
(`from danlu.data.wds import ShardLoader`).
"""
from __future__ import annotations

_LAZY = {
    "open_stream": "urls", "read_bytes": "urls", "is_url": "urls",
    "Labels": "samples", "read_shard": "samples",
    "INDEX_NAME": "shards", "Shard": "shards", "Source": "shards", "find_shards": "shards", "open_source": "shards",
    "hold_out": "shards",
    "STATS_SAMPLES": "sets", "ShardSet": "sets", "ShardImages": "sets", "load_shards": "sets",
    "ShardLoader": "loader",
    "prepare_shards": "prepare", "inspect_shards": "prepare",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
