"""danlu.io: a file is replaced whole or not at all (a reader sees the old bytes or the new, never a part), a failed
write is one line saying what was kept, and the checksums and the offline switch the data and weights code relies
on."""
import hashlib
import json

import pytest

from danlu.errors import DanluError
from danlu.io import atomic_write, offline, sha256, write_bytes, write_json


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "iter_00000010.pt"
    atomic_write(path, lambda f: f.write(b"good"))

    def failing(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(DanluError, match="No space left on device.*previous iter_00000010.pt is unchanged"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["iter_00000010.pt"]


def test_while_the_new_file_is_written_the_path_holds_the_old_one(tmp_path):
    """Read `path` from inside the write and from inside `before_rename` (the complete temporary file, beside it):
    the old bytes both times; after the rename, the new bytes and no temporary file."""
    path = tmp_path / "summary.json"
    write_json(path, {"v": 1})
    seen = {}

    def write(f):
        f.write(b'{"v": 2}\n')
        seen["during"] = path.read_bytes()

    def before_rename(tmp):
        seen["before"] = path.read_bytes()
        seen["tmp"] = (tmp.parent == path.parent, tmp.read_bytes())

    atomic_write(path, write, before_rename=before_rename)
    assert seen == {"during": b'{\n  "v": 1\n}\n', "before": b'{\n  "v": 1\n}\n', "tmp": (True, b'{"v": 2}\n')}
    assert json.loads(path.read_text()) == {"v": 2} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_check_that_refuses_the_new_file_keeps_the_old_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    write_bytes(path, b"old")

    def refuse(tmp):
        raise ValueError("checksum of the new file does not match")

    with pytest.raises(ValueError, match="checksum"):
        atomic_write(path, lambda f: f.write(b"new"), before_rename=refuse)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_folder_that_does_not_exist_is_one_line_saying_nothing_was_written(tmp_path):
    path = tmp_path / "gone" / "summary.json"
    with pytest.raises(DanluError) as e:
        write_json(path, {"v": 1})
    assert str(e.value).startswith(f"{path}: cannot write (") and str(e.value).endswith("; nothing was written")
    assert "\n" not in str(e.value) and not (tmp_path / "gone").exists()


def test_json_is_indented_and_ends_with_a_newline(tmp_path):
    write_json(tmp_path / "a.json", {"b": [1, 2]})
    write_json(tmp_path / "c.json", {"b": [1, 2]}, indent=None)
    assert (tmp_path / "a.json").read_text() == '{\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert (tmp_path / "c.json").read_text() == '{"b": [1, 2]}\n'


def test_sha256_is_the_files_digest_across_blocks_and_with_extra_bytes(tmp_path):
    data = bytes(range(256)) * 8193  # 2 MiB + 256 bytes: more than one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert sha256(tmp_path / "f", extra=b"iter 10") == hashlib.sha256(data + b"iter 10").hexdigest()


@pytest.mark.parametrize("value, off", [("1", True), ("true", True), ("YES", True), (" 1 ", True), ("", False),
                                        ("0", False), ("false", False), ("No", False), (None, False)])
def test_danlu_offline_is_read_as_a_switch(monkeypatch, value, off):
    if value is None:
        monkeypatch.delenv("DANLU_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("DANLU_OFFLINE", value)
    assert offline() is off
