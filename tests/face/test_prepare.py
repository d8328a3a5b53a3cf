import json

import pytest
import torch

from danlu.data.datasets import ImageSet, identity_split, load_dataset
from danlu.errors import DanluError
from danlu.face.prepare import prepare_faces
from tests.conftest import SHARED_DATA

YALE = SHARED_DATA / "yalefaces" / "images"


def test_identity_split_holds_back_whole_identities():
    labels = torch.arange(10).repeat_interleave(3)  # 10 identities x 3 images
    full = ImageSet(torch.zeros(30, 1, 4, 4, dtype=torch.uint8), labels, [f"p{i}" for i in range(10)])
    train, test = identity_split(full, 0.3, seed=1)
    assert len(train.classes) == 7 and len(test.classes) == 3 and not set(train.classes) & set(test.classes)
    assert len(train) == 21 and len(test) == 9 and int(train.labels.max()) == 6 and int(test.labels.max()) == 2
    assert identity_split(full, 0.3, seed=1)[1].classes == test.classes != identity_split(full, 0.3, seed=2)[1].classes
    with pytest.raises(DanluError, match="at least 4"):
        identity_split(ImageSet(full.images[:9], labels[:9], full.classes[:3]), 0.3, 0)
    a, b = load_dataset("synthetic", num_classes=8, train_size=64, test_size=32, split="identities", val_fraction=0.25)
    assert (len(a.classes), len(b.classes), len(a) + len(b)) == (6, 2, 96)


def test_no_face_skip_drops_and_lists(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for who in ("ann", "bob"):
        (tmp_path / "raw" / who).mkdir(parents=True)
        for k in range(2):
            Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(tmp_path / "raw" / who / f"{k}.png")
    with pytest.raises(DanluError, match="has no readable image"):  # every image dropped: nothing to store
        prepare_faces(tmp_path / "raw", tmp_path / "s1", size=16, crop="face", no_face="skip", quiet=True)
    meta = prepare_faces(tmp_path / "raw", tmp_path / "s2", size=16, crop="face", quiet=True)  # default: centre squares
    report = json.loads((tmp_path / "s2" / "prepare_report.json").read_text())
    assert meta["splits"]["train"]["count"] == 4 and report["centre_squares"] == 4 and report["face_found"] == 0
    # crop auto: no clear face in the sample, so every image is cut whole (already-cropped faces); none is dropped
    meta = prepare_faces(tmp_path / "raw", tmp_path / "s4", size=16, no_face="skip", quiet=True)
    report = json.loads((tmp_path / "s4" / "prepare_report.json").read_text())
    assert meta["splits"]["train"]["count"] == 4 and report["options"]["crop"] == "full"
    assert report["crop_auto_found_share"] == 0 and report["face_found"] is None
    # equalize auto: noise is lit evenly, so no Tan-Triggs; the choice and its measure are recorded
    assert report["options"]["equalize"] == "none" and 0 <= report["equalize_auto_side_light"] < 0.3
    with pytest.raises(DanluError, match="--no-face maybe"):
        prepare_faces(tmp_path / "raw", tmp_path / "s3", no_face="maybe")


@pytest.mark.skipif(not YALE.is_dir(), reason=f"real data not present: {YALE} (../shared/data)")
def test_yale_faces_are_found(tmp_path):
    """Yale: 320x243 gray GIFs with background; the Haar cascade finds one face in (nearly) every image."""
    raw = tmp_path / "yale"
    for name in ("subject01", "subject02", "subject03"):
        raw.mkdir(exist_ok=True)
        (raw / name).symlink_to(YALE / name)
    meta = prepare_faces(raw, tmp_path / "store", size=64, align=True, quiet=True)
    report = json.loads((tmp_path / "store" / "prepare_report.json").read_text())
    assert report["images"] == meta["splits"]["train"]["count"] == sum(len(list((raw / n).iterdir()))
                                                                        for n in ("subject01", "subject02", "subject03"))
    assert report["face_found"] >= 0.9 * report["images"] and report["skipped_count"] == 0
