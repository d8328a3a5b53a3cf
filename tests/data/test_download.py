"""danlu.data.download against a local HTTP server: a partial file resumed, a file that fails its checksum never
kept, mirrors tried in order, no network touched offline; and archives extracted whole or refused."""
from __future__ import annotations

import io
import os
import socket
import tarfile

import pytest

import datafiles
from danlu.data.download import NetworkError, download, extract_tar, file_md5
from danlu.errors import DanluError
from datafiles import md5, tar_gz

file_server = datafiles.file_server  # the shared fixture, found by pytest under this name


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv("DANLU_OFFLINE", raising=False)


def test_a_partial_file_from_an_earlier_run_is_resumed(file_server, tmp_path):
    data = os.urandom(50_000)
    file_server.files["blob.bin"] = data
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(data[:12_345])
    download([file_server.url + "blob.bin"], dest, md5=md5(data), progress=False)
    assert dest.read_bytes() == data
    assert file_server.requests == [("blob.bin", "bytes=12345-")]


def test_a_partial_file_that_is_already_whole_is_checked_and_kept(file_server, tmp_path):
    """The server has nothing past its end (416): the .part is checked against the MD5 and renamed into place."""
    data = os.urandom(3_000)
    file_server.files["blob.bin"] = data
    (tmp_path / "blob.bin.part").write_bytes(data)
    download([file_server.url + "blob.bin"], tmp_path / "blob.bin", md5=md5(data), progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == data and not (tmp_path / "blob.bin.part").exists()
    assert file_server.requests == [("blob.bin", "bytes=3000-")]


def test_a_dropped_connection_is_resumed_where_it_stopped(file_server, tmp_path):
    data = os.urandom(200_000)
    file_server.files["blob.bin"] = data
    file_server.cut["blob.bin"] = 70_000  # the first response ends after 70,000 bytes
    download([file_server.url + "blob.bin"], tmp_path / "blob.bin", md5=md5(data), progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert file_server.requests == [("blob.bin", None), ("blob.bin", "bytes=70000-")]


def test_mirrors_are_tried_in_order_until_one_delivers_the_right_file(file_server, tmp_path):
    data, wrong = os.urandom(5_000), os.urandom(5_000)
    file_server.files.update({"a/blob.bin": wrong, "b/blob.bin": data})
    urls = [file_server.url + d + "blob.bin" for d in ("missing/", "a/", "b/")]
    download(urls, tmp_path / "blob.bin", md5=md5(data), progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert [name for name, _ in file_server.requests] == ["missing/blob.bin", "a/blob.bin", "b/blob.bin"]
    assert file_md5(tmp_path / "blob.bin") == md5(data)


def test_a_file_that_fails_its_checksum_everywhere_is_refused_and_not_kept(file_server, tmp_path):
    file_server.files["blob.bin"] = b"not what was published"
    with pytest.raises(DanluError) as e:
        download([file_server.url + "blob.bin"], tmp_path / "blob.bin", md5="0" * 32, progress=False)
    assert not isinstance(e.value, NetworkError)  # the host answered: placing the file by hand is not the advice
    message = str(e.value)
    assert message.startswith("blob.bin: download failed: ") and "\n" not in message
    assert f"checksum mismatch (md5 {md5(b'not what was published')}, expected {'0' * 32}); the file was deleted" \
        in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part to resume from


def test_unreachable_mirrors_are_a_network_error_naming_each(tmp_path):
    with socket.socket() as s:  # bound, never listening: every connection is refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/blob.bin"
        with pytest.raises(NetworkError, match=f"blob.bin: download failed: {url}: .*refused"):
            download([url], tmp_path / "blob.bin", md5=None, progress=False)


def test_offline_nothing_is_fetched(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_OFFLINE", "1")
    file_server.files["blob.bin"] = b"x"
    with pytest.raises(NetworkError, match=r"blob.bin: not downloaded \(DANLU_OFFLINE is set\)"):
        download([file_server.url + "blob.bin"], tmp_path / "blob.bin", md5=None, progress=False)
    assert file_server.requests == []


def test_an_archive_is_extracted_whole_in_place_of_the_old_folder(tmp_path):
    archive = tmp_path / "set.tar.gz"
    archive.write_bytes(tar_gz({"set/a.txt": b"a", "set/sub/b.txt": b"b"}))
    dest = tmp_path / "out"
    (dest / "stale").mkdir(parents=True)
    assert extract_tar(archive, dest) == dest
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.txt")) == ["set/a.txt", "set/sub/b.txt"]
    assert not (dest / "stale").exists()  # the old folder's content is gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "set.tar.gz"]  # no temporary folder left


@pytest.mark.parametrize("python_has_filters", [True, False])
def test_tar_with_a_parent_member_is_refused(tmp_path, monkeypatch, python_has_filters):
    if not python_has_filters:  # older Pythons: danlu applies the same rules itself
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(tar_gz({"ok.txt": b"fine", "../escaped.txt": b"gotcha"}))
    with pytest.raises(DanluError, match=r"refused to extract member '\.\./escaped\.txt'"):
        extract_tar(archive, tmp_path / "out" / "x")
    assert not (tmp_path / "out" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out" / "x").exists()  # nothing half-extracted
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


@pytest.mark.parametrize("python_has_filters", [True, False])
def test_a_link_pointing_out_of_the_archive_is_refused(tmp_path, monkeypatch, python_has_filters):
    if not python_has_filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (tmp_path / "evil.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(DanluError, match=r"refused to extract member 'passwd'"):
        extract_tar(tmp_path / "evil.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_tar_is_one_line(tmp_path):
    (tmp_path / "set.tar.gz").write_bytes(b"<html>a login page</html>")
    with pytest.raises(DanluError, match=r"set.tar.gz: not a readable tar archive") as e:
        extract_tar(tmp_path / "set.tar.gz", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
