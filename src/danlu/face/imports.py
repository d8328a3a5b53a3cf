"""Face networks trained elsewhere, as danlu face runs: `danlu face import dlib -o RUN` writes a run folder with no
training that every face verb (verify, embed, enroll, identify, prepare --for) and `danlu serve` accept, and that a
fine-tuning recipe starts from (`model.init=RUN`).

    info = import_face_network("dlib", "runs/dlib")       # dlib's ResNet, its preprocessing, its threshold

dlib's network (dlib_face_recognition_resnet_model_v1, public domain, in the face-recognition-models wheel) is read
without dlib (danlu.face.dlib.network); its preprocessing is dlib's: dlib's CNN face detector (MMOD, read from the
same wheel), dlib's 5 landmarks, dlib's 150 px chip with padding 0.25, RGB, (pixel - mean) / 256; each face is
embedded with its mirror image (the two descriptors added). On LFW's 6,000 pairs: 0.9863 so, 0.9833 without the
mirror image, 0.9788 without it and with OpenCV's Haar boxes instead of MMOD's (docs/evidence/faces.md).
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Union

from danlu.errors import DanluError

NETWORKS = ("dlib",)
# dlib's own rule: one person below Euclidean distance 0.6 between descriptors. danlu compares unit embeddings by
# cosine: the accuracy-best cosine of the imported run on LFW's 6,000 official pairs, through danlu's own pipeline
# (MMOD boxes, 5 landmarks, 150 px chips, each face fused with its mirror image), measured 2026-12-07 on a 2-core
# AMD EPYC VM (10-fold accuracy 0.9863 +- 0.0034; docs/evidence/faces.md has the command)
DLIB_COSINE_THRESHOLD = 0.9128


def import_face_network(name: str, out: Union[str, Path], *, force: bool = False) -> dict[str, Any]:
    """Write the face run folder of network `name` (one of NETWORKS) at `out`: recipe.yaml, model.safetensors
    (the backbone's weights; no identity head), face.json (its preprocessing and threshold) and summary.json (where
    the weights came from). Refuses a folder that holds another run, as training does (`force`: move it aside)."""
    if name not in NETWORKS:
        raise DanluError(f"face import {name}: expected one of {', '.join(NETWORKS)}")
    from safetensors.torch import save

    from danlu.config import build_recipe
    from danlu.face.detect import FaceOptions
    from danlu.face.dlib.network import DAT_NAME, dlib_model_path, load_dlib_weights
    from danlu.io import sha256, write_bytes, write_json
    from danlu.models import create_model
    from danlu.models.dlib_resnet import DLIB_MEAN, DLIB_SCALE, DLIB_STD
    from danlu.runs import new_run_dir, versions
    from danlu.tasks.verification import face_info, write_face_info

    backbone = load_dlib_weights()  # DanluError naming the pip command where the package is missing
    try:
        source, source_sha = str(dlib_model_path()), sha256(dlib_model_path())
    except DanluError:  # converted before, the package since removed: the cache's own record
        source, source_sha = f"{DAT_NAME} (converted before; the package is not installed now)", None
    recipe = build_recipe({
        "model": {"name": "dlib_resnet", "test_flip": True},
        "data": {"name": "store", "size": 150, "channels": 3, "scale": DLIB_SCALE, "mean": list(DLIB_MEAN),
                 "std": list(DLIB_STD), "split": "identities"},
        "optim": {"lr": 0.0}, "run": {"max_iter": 1}, "precision": "fp32"})
    model = create_model("dlib_resnet", num_classes=0, in_channels=3, test_flip=True)
    model.backbone.load_state_dict(backbone)
    run = new_run_dir(out, "dlib", force)
    options = FaceOptions(size=150, channels=3, chip="dlib", margin=0.25, equalize="none", detector="mmod",
                          crop="face")
    write_bytes(run / "recipe.yaml", recipe.to_yaml().encode())
    write_bytes(run / "model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    info = face_info("dlib_resnet", "softmax", True, None, {})
    info.update(preprocess=options.to_dict(), threshold=DLIB_COSINE_THRESHOLD,
                threshold_from="import: the accuracy-best cosine on LFW's 6,000 official pairs (danlu face verify)",
                head=None)
    write_face_info(run, info)
    summary = {"imported": {"network": "dlib_face_recognition_resnet_model_v1", "file": source, "sha256": source_sha,
                            "license": "public domain (CC0 1.0, dlib-models)", "trained_on": "about 3 million faces "
                            "of 7,485 people, none of LFW's (dlib's notes)"},
               "classes": [], "input_shape": [3, 150, 150], "iterations": 0, "test_accuracy": None,
               "run_dir": str(run), "recipe": recipe.to_dict(), "versions": versions(),
               "finished": datetime.now().isoformat(timespec="seconds")}
    write_json(run / "summary.json", summary)
    return {"run_dir": str(run), "network": name, "preprocess": options.to_dict(), "threshold": info["threshold"],
            "source": source}
