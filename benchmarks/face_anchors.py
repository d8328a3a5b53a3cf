#!/usr/bin/env python
"""Face verification anchors: what a learned recognizer must beat, on the same pairs as `danlu face verify`.

    python benchmarks/face_anchors.py --train ORL_TRAIN --test ORL_TEST --n 300 --size 112
    python benchmarks/face_anchors.py --train LFW_TRAIN --test LFW_IMAGES --pairs pairs1.txt --size 112 --json a.json

Every image is cut exactly as `danlu face prepare` / `danlu face verify` cut it (danlu.face.detect.preprocess with
the same options: detection, margin, equalization, size), and the pairs are the ones `danlu face pairs TEST --n N`
writes (seed 0), or an LFW-format `--pairs` file. Scored with LFW's protocol (danlu.face.verify.scores: per fold the
threshold best on the other nine; mean and std of the ten accuracies). Methods:

- raw: cosine similarity of the raw pixel vectors of the two crops;
- eigenfaces: PCA fitted on the crops of the training people only (Turk & Pentland 1991), `--components` (default
  100) components, cosine similarity of the projections (the training mean subtracted);
- dlib: dlib's ResNet face descriptor (trained on about 3 million faces; 0.9938 on LFW's 6,000 pairs) on the
  original images, with dlib's landmarks inside the box danlu's detector found (the whole image where it found
  none). Only where the optional packages `dlib-bin` (or `dlib`) and `face-recognition-models` are installed; they
  are never dependencies of danlu.

Prints a table and, with --json, writes the figures with the machine, versions and the command.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from danlu.face.detect import FaceOptions, crop_policy, equalize_policy, preprocess, read_image
from danlu.face.verify import identity_images, make_pairs, read_pairs
from danlu.tasks.verification import scores
from danlu.runs import environment


def crops(paths: list[Path], opts: FaceOptions) -> tuple[np.ndarray, list[dict]]:
    """(N, C*S*S) float64 pixel vectors of the face crops, and the detection info of each."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor() as pool:
        done = list(pool.map(lambda p: preprocess(p, opts), paths))
    return np.stack([c.reshape(-1).astype(np.float64) for c, _ in done]), [i for _, i in done]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return (a * b).sum(1)


def eigenfaces(train: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (k, D)) of the training crops."""
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    return mean, vt[:k]


def dlib_embedder():
    """A function path, box -> 128-d dlib descriptor, or None (and the reason) without the optional packages."""
    import importlib.util

    try:
        import dlib
    except ImportError as e:
        return None, f"not installed ({e.name}); pip install dlib-bin face-recognition-models"
    # the model files' folder, found without importing the package (its __init__ needs setuptools' pkg_resources)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None, "not installed (face_recognition_models); pip install face-recognition-models"
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    predictor = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(path: Path, box) -> np.ndarray:
        rgb = read_image(path)
        h, w = rgb.shape[:2]
        x, y, bw, bh = box if box is not None else (0, 0, w, h)
        rect = dlib.rectangle(int(x), int(y), int(x + bw), int(y + bh))
        return np.asarray(encoder.compute_face_descriptor(np.ascontiguousarray(rgb), predictor(rgb, rect)))

    return embed, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="identity folders of the training people (eigenfaces' PCA)")
    ap.add_argument("--test", required=True, help="identity folders of the people to verify")
    ap.add_argument("--pairs", help="an LFW-format pairs file over --test (default: danlu face pairs --n N, seed 0)")
    ap.add_argument("--n", type=int, default=300, help="pairs of each kind per fold for the generated pairs")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--channels", type=int, default=3, choices=[1, 3])
    ap.add_argument("--equalize", default="auto", choices=["auto", "tantriggs", "hist", "clahe", "none"],
                    help="as danlu face prepare's (auto: decided on the training set)")
    ap.add_argument("--align", action="store_true")
    ap.add_argument("--crop", default="auto", choices=["auto", "face", "full"], help="as danlu face prepare's")
    ap.add_argument("--components", type=int, default=100)
    ap.add_argument("--max-train-images", type=int, default=4000, help="PCA on at most this many (seeded sample)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    train_paths = [p for d in sorted(Path(a.train).iterdir()) if d.is_dir() for p in identity_images(d)]
    crop = a.crop if a.crop != "auto" else crop_policy(train_paths)[0]  # decided on the training set, as prepare
    equalize = a.equalize if a.equalize != "auto" else equalize_policy(train_paths)[0]
    opts = FaceOptions(size=a.size, channels=a.channels, align=a.align, equalize=equalize, crop=crop)
    pairs_file = a.pairs
    if pairs_file is None:  # danlu face pairs TEST --n N: beside the JSON, else in a temporary folder
        import tempfile

        text, _ = make_pairs(a.test, n=a.n)
        pairs_file = Path(a.json).with_suffix(".pairs.txt") if a.json else \
            Path(tempfile.mkdtemp(prefix="face_anchors-")) / "pairs.txt"
        pairs_file.write_text(text)
    listed, fold_of = read_pairs(pairs_file, a.test)
    unique = sorted({p for x, y, _ in listed for p in (x, y)})
    row = {p: i for i, p in enumerate(unique)}
    ia = np.array([row[x] for x, _, _ in listed])
    ib = np.array([row[y] for _, y, _ in listed])
    same = np.array([s for _, _, s in listed])
    test_x, infos = crops(unique, opts)
    rng = np.random.default_rng(0)
    if len(train_paths) > a.max_train_images:
        train_paths = [train_paths[i] for i in sorted(rng.choice(len(train_paths), a.max_train_images, False))]
    train_x, _ = crops(train_paths, opts)
    folds = int(fold_of.max()) + 1

    results = {}
    results["raw pixels, cosine"] = scores(cosine(test_x[ia], test_x[ib]), same, folds, fold_of)
    mean, comps = eigenfaces(train_x, a.components)
    proj = (test_x - mean) @ comps.T
    results[f"eigenfaces ({len(comps)} components, PCA on {len(train_x)} training images)"] = \
        scores(cosine(proj[ia], proj[ib]), same, folds, fold_of)
    embed, why = dlib_embedder()
    if embed is not None:
        e = np.stack([embed(p, i["box"]) for p, i in zip(unique, infos)])
        results["dlib ResNet descriptor (pretrained)"] = scores(cosine(e[ia], e[ib]), same, folds, fold_of)
    else:
        print(f"dlib: {why}", file=sys.stderr)

    print(f"{len(listed)} pairs ({int(same.sum())} same) of {len(unique)} images from {a.test}; crops "
          f"{a.channels}x{a.size}x{a.size}, crop {crop}, equalize {equalize}{', aligned' if a.align else ''}")
    print(f"| method | accuracy (mean +- std over {folds} folds) | ROC AUC |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | {r['roc_auc']:.4f} |")
    if a.json:
        out = {"command": " ".join(["python", "benchmarks/face_anchors.py", *(argv or sys.argv[1:])]),
               "date": datetime.now().astimezone().isoformat(timespec="seconds"), "seconds": time.perf_counter() - t0,
               "env": environment(__import__("torch").device("cpu")), "pairs_file": str(pairs_file),
               "options": opts.to_dict(), "results": {k: {m: v[m] for m in ("accuracy_mean", "accuracy_std",
                                                                            "roc_auc", "pairs")}
                                                      for k, v in results.items()}}
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
