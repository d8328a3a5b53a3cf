"""The catalog against a local HTTP server: download, verify, resume, refuse; native formats; the offline path."""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import pickle
import shutil
import socket

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, run_cli
from danlu.data import catalog
from danlu.data.catalog import RemoteFile, read_cifar_batch, read_idx
from danlu.data.datasets import load_dataset
from danlu.errors import DanluError
import datafiles
from datafiles import cifar_like, idx_bytes, md5, mnist_like, tar_gz

file_server = datafiles.file_server  # the shared fixture, found by pytest under this name


@pytest.fixture
def home(tmp_path, monkeypatch):
    d = tmp_path / "danlu-data"
    monkeypatch.setenv("DANLU_DATA", str(d))
    monkeypatch.delenv("DANLU_OFFLINE", raising=False)
    return d


def _serve_mnist(server, monkeypatch, mirrors=None):
    files, arrays = mnist_like()
    server.files.update(files)
    real = catalog.ENTRIES["mnist"]
    fake = dataclasses.replace(real, mirrors=tuple(mirrors or (server.url,)),
                               files=tuple(RemoteFile(f.name, md5(files[f.name])) for f in real.files))
    monkeypatch.setitem(catalog.ENTRIES, "mnist", fake)
    return files, arrays


def test_good_download_is_parsed_cached_and_not_fetched_again(file_server, home, monkeypatch):
    _, arrays = _serve_mnist(file_server, monkeypatch)
    train, test = load_dataset("mnist")
    assert train.images.shape == (40, 1, 28, 28) and test.images.shape == (12, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train_images"])
    assert np.array_equal(test.labels.numpy(), arrays["test_labels"])
    assert train.classes == [str(d) for d in range(10)]
    assert (home / "mnist" / "danlu-arrays" / "train_images.npy").is_file()
    assert not list((home / "mnist").glob("*.part"))
    n = len(file_server.requests)
    again, _ = load_dataset("mnist")
    assert len(file_server.requests) == n  # served from the cache
    assert torch.equal(again.images, train.images)


def test_a_failing_mirror_falls_through_to_the_next(file_server, home, monkeypatch):
    with _refusing_port() as port:
        dead = f"http://127.0.0.1:{port}/"
        _serve_mnist(file_server, monkeypatch, mirrors=[dead, file_server.url + "nowhere/", file_server.url])
        train, _ = load_dataset("mnist")
    assert len(train) == 40
    assert ("nowhere/train-images-idx3-ubyte.gz", None) in file_server.requests  # the 404 mirror was tried


def test_corrupted_download_is_refused_and_not_kept(file_server, home, monkeypatch):
    files, _ = _serve_mnist(file_server, monkeypatch)
    good = files["t10k-labels-idx1-ubyte.gz"]
    file_server.files["t10k-labels-idx1-ubyte.gz"] = good[:-1] + bytes([good[-1] ^ 0xFF])
    with pytest.raises(DanluError, match=r"t10k-labels-idx1-ubyte.gz.*checksum mismatch.*deleted"):
        load_dataset("mnist")
    assert not (home / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not (home / "mnist" / "t10k-labels-idx1-ubyte.gz.part").exists()
    assert not (home / "mnist" / "danlu-arrays").exists()


def test_interrupted_download_resumes_with_a_range_request(file_server, home, monkeypatch):
    files, arrays = _serve_mnist(file_server, monkeypatch)
    name = "train-images-idx3-ubyte.gz"
    file_server.cut[name] = 1000  # the first response stops after 1,000 bytes
    train, _ = load_dataset("mnist")
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train_images"])
    assert (home / "mnist" / name).read_bytes() == files[name]
    ranges = [r for n, r in file_server.requests if n == name]
    assert ranges == [None, "bytes=1000-"]


def test_unreachable_hosts_give_one_message_naming_files_checksums_and_folder(home, monkeypatch):
    real = catalog.ENTRIES["mnist"]
    with _refusing_port() as port:  # bound, never listening: every connection is refused
        monkeypatch.setitem(catalog.ENTRIES, "mnist",
                            dataclasses.replace(real, mirrors=(f"http://127.0.0.1:{port}/",)))
        with pytest.raises(DanluError) as e:
            load_dataset("mnist")
    msg = str(e.value)
    assert "\n" not in msg and str(home / "mnist") in msg
    for f in real.files:
        assert f.name in msg and f.md5 in msg


def test_cli_offline_names_what_to_place_and_exits_2(tmp_path):
    r = run_cli("data", "get", "cifar10", env={"DANLU_DATA": str(tmp_path), "DANLU_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "cifar-10-python.tar.gz" in r.stderr and "c58f30108f718f92721af3b95e74349a" in r.stderr
    assert str(tmp_path / "cifar10") in r.stderr


def test_cli_data_list_shows_the_catalog(tmp_path):
    r = run_cli("data", "list", env={"DANLU_DATA": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "mnist5k", "synthetic"):
        assert f" {name} " in r.stdout
    assert str(tmp_path) in r.stdout and "not downloaded" in r.stdout


def test_cifar_download_extract_and_parse(file_server, home, monkeypatch):
    archive, arrays = cifar_like()
    file_server.files["cifar-10-python.tar.gz"] = archive
    real = catalog.ENTRIES["cifar10"]
    monkeypatch.setitem(catalog.ENTRIES, "cifar10", dataclasses.replace(
        real, mirrors=(file_server.url,), files=(RemoteFile("cifar-10-python.tar.gz", md5(archive)),)))
    train, test = load_dataset("cifar10")
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), arrays["train_images"])
    assert np.array_equal(test.labels.numpy(), arrays["test_labels"])
    assert train.classes[0] == "airplane" and train.classes[-1] == "truck"
    assert not list((home / "cifar10").glob(".extract-*"))  # the extracted batches are not kept


def test_a_cifar_tar_with_a_parent_member_is_refused_through_the_catalog(file_server, home, monkeypatch):
    # deep enough that an unchecked extraction (into cifar10/.extract-*/.x.*/) would land in `home` itself
    archive = tar_gz({"../../../cifar-10-batches-py/data_batch_1": b"x"})
    file_server.files["cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(catalog.ENTRIES, "cifar10", dataclasses.replace(
        catalog.ENTRIES["cifar10"], mirrors=(file_server.url,),
        files=(RemoteFile("cifar-10-python.tar.gz", md5(archive)),)))
    with pytest.raises(DanluError, match="refused to extract"):
        load_dataset("cifar10")
    assert not (home / "cifar-10-batches-py").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickled_batch_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [1]}, protocol=2))
    with pytest.raises(DanluError, match=r"refused global 'posix.system'|refused global 'os.system'"):
        read_cifar_batch(path)
    assert not (tmp_path / "pwned").exists()
    ok = tmp_path / "ok"
    ok.write_bytes(pickle.dumps({b"data": np.arange(6, dtype=np.uint8), b"labels": [1, 2]}, protocol=2))
    assert read_cifar_batch(ok)["data"].tolist() == list(range(6))


def test_idx_parser_reads_and_rejects(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(a)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a) and np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)
    (tmp_path / "short.idx").write_bytes(idx_bytes(a)[:-5])
    with pytest.raises(DanluError, match="truncated"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(DanluError, match="not an IDX file"):
        read_idx(tmp_path / "text.idx")


MNIST_DIR = SHARED_DATA / "mnist"
_have_mnist = (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not _have_mnist, reason=f"real MNIST files not found in {MNIST_DIR}")
def test_real_mnist_files_placed_by_hand_work_offline(tmp_path, monkeypatch):
    """The user copies the four .gz files into $DANLU_DATA/mnist/ (these are recompressed: their own MD5s differ
    from the published ones, their contents match), and training data loads with no network."""
    monkeypatch.setenv("DANLU_DATA", str(tmp_path))
    monkeypatch.setenv("DANLU_OFFLINE", "1")
    shutil.copytree(MNIST_DIR, tmp_path / "mnist")
    train, test = load_dataset("mnist")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the known start of MNIST
    assert torch.bincount(test.labels).tolist()[:3] == [980, 1135, 1032]


@pytest.mark.skipif(not _have_mnist, reason=f"real MNIST files not found in {MNIST_DIR}")
def test_danlu_data_may_point_at_a_read_only_folder_holding_mnist(monkeypatch):
    monkeypatch.setenv("DANLU_DATA", str(SHARED_DATA))
    monkeypatch.setenv("DANLU_OFFLINE", "1")
    before = sorted(p.name for p in MNIST_DIR.iterdir())
    train, _ = load_dataset("mnist")
    assert len(train) == 60000
    assert sorted(p.name for p in MNIST_DIR.iterdir()) == before  # nothing written into the shared folder


@contextlib.contextmanager
def _refusing_port():
    """A port on 127.0.0.1 held bound, but not listening, while the block runs: connections to it are refused, and
    no other process can take it meanwhile (a port closed right after choosing it could be)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
