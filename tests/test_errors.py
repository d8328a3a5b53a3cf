"""Errors a user reads: one line, and for a feature whose extra is not installed, the pip command that brings it."""
from __future__ import annotations

import sys

import pytest

from danlu.cli import main
from danlu.errors import DanluError, require


def test_require_names_the_extra():
    assert require("json", "serve", "x").__name__ == "json"
    with pytest.raises(DanluError, match=r"^danlu serve needs the fastapi package, which is not installed: "
                                         r"pip install 'danlu\[serve\]'$"):
        with pytest.MonkeyPatch.context() as m:
            m.setitem(sys.modules, "fastapi", None)  # None in sys.modules: `import fastapi` raises ImportError
            require("fastapi", "serve", "danlu serve")


@pytest.mark.parametrize("missing, argv, extra", [
    ("fastapi", ["serve", "RUN"], "serve"),
    ("tensorboard", ["train", "--set", "run.max_iter=1", "--set", "run.tensorboard=true", "--out", "OUT"],
     "tensorboard"),
])
def test_a_feature_without_its_extra_is_one_line_and_exit_2(missing, argv, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)
    if missing == "tensorboard":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    argv = [str(tmp_path / a) if a in ("RUN", "OUT") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"pip install 'danlu[{extra}]'") and len(err.splitlines()) == 1, err


def test_face_detection_without_opencv_names_the_face_extra(monkeypatch, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from danlu.data import decode

    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setattr(decode, "_CV2", [])  # the once-only import runs again, and finds no OpenCV
    for who in ("a", "b"):
        (tmp_path / "raw" / who).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "raw" / who / "1.png")
    assert main(["face", "prepare", str(tmp_path / "raw"), "-o", str(tmp_path / "store"), "--quiet",
                 "--crop", "face", "--equalize", "none"]) == 2
    assert capsys.readouterr().err.strip().endswith("pip install 'danlu[face]'")


def test_wds_shards_without_webdataset_name_the_wds_extra(monkeypatch, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    monkeypatch.setitem(sys.modules, "webdataset", None)
    for label in ("ants", "bees"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photos" / label / "1.png")
    assert main(["prepare", str(tmp_path / "photos"), "-o", str(tmp_path / "shards"), "--format", "wds"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pip install 'danlu[wds]'") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "shards").exists()
