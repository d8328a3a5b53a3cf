"""Shards over URLs (wds.urls): the same batches over HTTP as on disk; s3:// through fsspec, or one line naming the
extra to install."""
from __future__ import annotations

import pytest
import torch

from danlu.data.datasets import load_dataset
from danlu.data.loader import make_loader
from danlu.data.wds.prepare import prepare_shards
from danlu.errors import DanluError
import datafiles
from datafiles import class_folder
from shardfiles import load, write_shards

file_server = datafiles.file_server  # the shared fixture, found by pytest under this name


def test_shards_over_http_give_the_same_batches_as_on_disk(tmp_path, file_server):
    src = class_folder(tmp_path / "p", classes=("a", "b", "c"), per_class=8, ext=".png", size=(16, 16))
    prepare_shards(src, tmp_path / "o", shard_mb=0.01, quiet=True)
    for p in (tmp_path / "o").iterdir():
        file_server.files[f"data/{p.name}"] = p.read_bytes()
    local, _ = load_dataset("wds", root=str(tmp_path / "o"), size=8, val_fraction=0.3, streams=4)
    remote, _ = load_dataset("wds", root=file_server.url + "data", size=8, val_fraction=0.3, streams=4)
    a = list(make_loader(local.images, None, 4, device="cpu", seed=2).epoch(1))
    b = list(make_loader(remote.images, None, 4, device="cpu", seed=2).epoch(1))
    assert len(a) == len(b) > 0 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert any(name.endswith(".tar") for name, _ in file_server.requests)


def test_s3_urls_need_fsspec_and_read_through_it(tmp_path, monkeypatch):
    """Without s3fs the error names the extra to install; with a moto server the same shards read as on disk."""
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(DanluError, match=r"s3:// needs .*danlu\[cloud\]"):
            load_dataset("wds", root="s3://bucket/train-{000000..000001}.tar")
        pytest.skip("s3fs (danlu[cloud]) and moto[server] are not installed: the S3 path is untested here")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        import fsspec

        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})  # every s3:// open
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bucket")
        write_shards(tmp_path / "s", [5, 5])
        for p in (tmp_path / "s").iterdir():
            fs.put(str(p), f"bucket/{p.name}")
        remote, _ = load("s3://bucket/train-{000000..000001}.tar", streams=2)
        local, _ = load(tmp_path / "s" / "train-{000000..000001}.tar", streams=2)
        a = list(make_loader(local.images, None, 2, device="cpu", seed=2).epoch(1))
        b = list(make_loader(remote.images, None, 2, device="cpu", seed=2).epoch(1))
        assert len(a) == len(b) > 0 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    finally:
        server.stop()
