"""The face commands as Python functions (the CLI's `danlu face ...` calls these), and `FaceRun`, a trained face
model ready to embed images:

    run = load_face_run("runs/faces")              # the run's model, preprocessing and verification threshold
    emb = run.embed(["a.jpg", b"<png bytes>", uint8_array])    # (3, D) unit embeddings, each face cut as prepare does
    Gallery("staff.sqlite", fingerprint=run.fingerprint).identify(emb, top=5)

A run's `face.json` (written by training, updated by `verify`) holds the preprocessing (from the face store it
trained on), the verification threshold and where that threshold came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from danlu.data.decode import BadImage
from danlu.errors import DanluError
from danlu.io import write_bytes, write_json
from danlu.face.detect import FaceOptions, preprocess

ImageLike = Union[str, Path, bytes, np.ndarray]


@dataclass
class FaceRun:
    """A trained face model with its preprocessing: `embed(images) -> (N, D)` unit embeddings (CPU float32)."""
    run: Any  # danlu.runs.LoadedRun
    options: FaceOptions  # how faces are cut (the face store's, or the run's input size with the defaults)
    threshold: Optional[float]  # cosine similarity at or above which two faces are one person (None: unknown)
    fingerprint: str  # SHA-256 of the weights file, the preprocessing and the whitening: what a gallery is tied to
    info: dict[str, Any]  # face.json

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    def faces(self, images: list[ImageLike]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """(N, C, H, W) uint8 face crops and one info dict per image (see detect.preprocess). An unreadable image
        raises DanluError naming it."""
        crops, infos = [], []
        for k, img in enumerate(images):
            try:
                chw, info = preprocess(img, self.options)
            except BadImage as e:
                name = img if isinstance(img, (str, Path)) else f"image {k + 1}"
                raise DanluError(f"{name}: {e}") from None
            crops.append(chw)
            infos.append(info)
        return torch.from_numpy(np.stack(crops)) if crops else torch.zeros(0, *self.run.shape, dtype=torch.uint8), \
            infos

    @torch.no_grad()
    def embed_crops(self, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """(N, C, H, W) uint8 crops -> (N, D) unit embeddings, float32 on the CPU."""
        out = []
        for lo in range(0, len(x), batch):
            xb = self.run.augment(x[lo:lo + batch].to(self.run.device), train=False)
            with self.run.precision.autocast():
                out.append(self.run.model.embed(xb).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def embed(self, images: list[ImageLike], batch: int = 64) -> torch.Tensor:
        """Paths, encoded bytes or uint8 arrays -> (N, D) unit embeddings (CPU float32)."""
        return self.embed_crops(self.faces(images)[0], batch)

    @property
    def dim(self) -> int:
        return int(self.run.model.embedding_dim)


def load_face_run(run_dir: Union[str, Path], device: Optional[str] = None) -> FaceRun:
    """A finished face run (a model with `embed`), its preprocessing and threshold."""
    from danlu.runs import load_run

    return face_run_from(load_run(run_dir, device=device))


def run_options(run_dir: Union[str, Path], flags: Optional[list[str]] = None) -> FaceOptions:
    """How face run `run_dir` cuts faces (its face.json; where that names none, its input size with the defaults),
    read without loading its model: what `danlu face prepare --for RUN` cuts with. `flags`: cut options also given,
    refused (the run's cut is the point)."""
    from danlu.tasks.verification import FACE_FILE, read_face_info

    run_dir = Path(run_dir)
    info = read_face_info(run_dir)
    if not info:
        raise DanluError(f"--for {run_dir}: no {FACE_FILE} there; expected a face run folder (a trained face model, "
                         f"or one of `danlu face import`)")
    if flags:
        raise DanluError(f"--for {run_dir} cuts faces as that run does; expected no other cut options, got "
                         f"{' '.join(flags)}")
    if info.get("preprocess"):
        return FaceOptions.from_dict(info["preprocess"])
    summary = run_dir / "summary.json"
    shape = json.loads(summary.read_text()).get("input_shape") if summary.is_file() else None
    if not shape:
        raise DanluError(f"--for {run_dir}: its {FACE_FILE} names no preprocessing and it has no summary.json with "
                         f"its input shape; expected a finished face run")
    return FaceOptions(size=int(shape[1]), channels=int(shape[0]))


def face_run_from(run) -> FaceRun:
    """The FaceRun of an already loaded run (danlu.runs.LoadedRun), sharing its model."""
    from danlu.io import sha256
    from danlu.models import is_face_model
    from danlu.tasks.verification import read_face_info

    run_dir = run.run_dir
    if not is_face_model(run.model):
        raise DanluError(f"RUN {run_dir}: model '{run.recipe.model.name}' is not a face model; expected a run of "
                         f"inception_resnet_v1 or mobilefacenet (e.g. recipes face_arcface_light)")
    path = Path(run_dir) / "face.json"
    info = read_face_info(run_dir)
    c, h, _ = run.shape
    opts = FaceOptions.from_dict(info["preprocess"]) if info.get("preprocess") else FaceOptions(size=h, channels=c)
    if (opts.channels, opts.size) != (c, h):
        raise DanluError(f"{path}: preprocessing gives {opts.channels}x{opts.size}x{opts.size}; the model takes "
                         f"{'x'.join(map(str, run.shape))}")
    extra = json.dumps(opts.to_dict(), sort_keys=True).encode()
    for t in run.model.whitening().values():  # model.whiten: part of what an embedding is (mean, then matrix)
        extra += t.numpy().tobytes()
    fingerprint = sha256(run.weights, extra=extra)
    return FaceRun(run, opts, info.get("threshold"), fingerprint, info)


def _save_threshold(run: FaceRun, threshold: float, source: str) -> None:
    from danlu.tasks.verification import write_face_info

    info = {**run.info, "threshold": threshold, "threshold_from": source}
    info.setdefault("preprocess", run.options.to_dict())
    write_face_info(run.run_dir, info)
    run.info, run.threshold = info, threshold


# ---------------------------------------------------------------- commands


def embed(run_dir: Union[str, Path], images: list[Union[str, Path]], device: Optional[str] = None
          ) -> list[dict[str, Any]]:
    """`danlu face embed RUN IMAGES...`: [{'image', 'embedding' (list), 'face' (detect info)}]."""
    run = load_face_run(run_dir, device)
    crops, infos = run.faces([str(p) for p in images])
    emb = run.embed_crops(crops)
    return [{"image": str(p), "embedding": [round(v, 6) for v in e.tolist()], "face": info}
            for p, e, info in zip(images, emb, infos)]


def pairs(root: Union[str, Path], out: Union[str, Path], n: int = 300, folds: int = 10, seed: int = 0
          ) -> dict[str, Any]:
    """`danlu face pairs DIR -o PAIRS.txt`: a balanced, seeded pairs file in LFW's format."""
    from danlu.face.verify import make_pairs

    text, info = make_pairs(root, n, folds, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, text.encode())
    return {**info, "pairs_file": str(out)}


def verify(run_dir: Union[str, Path], pairs_file: Union[str, Path], root: Union[str, Path], *,
           json_out: Union[str, Path, None] = None, roc_png: Union[str, Path, None] = None,
           device: Optional[str] = None, save_threshold: bool = True) -> dict[str, Any]:
    """`danlu face verify RUN --pairs PAIRS.txt --root DIR`: LFW's 10-fold protocol, ROC, TAR at FAR 1e-2 / 1e-3.
    Writes the report (default RUN/verify.json) and the ROC (default beside it, *_roc.png); with `save_threshold`
    the threshold best on all pairs becomes the run's (face.json). The report says what the run's threshold was
    (`run_threshold_before`, `run_threshold_before_from`) and whether this one replaced it (`threshold_saved`)."""
    from danlu.face.verify import draw_roc, read_pairs
    from danlu.tasks.verification import scores

    run = load_face_run(run_dir, device)
    listed, fold_of = read_pairs(pairs_file, root)
    unique = sorted({p for a, b, _ in listed for p in (a, b)})
    crops, infos = run.faces(unique)
    emb = run.embed_crops(crops)
    row = {p: k for k, p in enumerate(unique)}
    a = torch.tensor([row[x] for x, _, _ in listed])
    b = torch.tensor([row[y] for _, y, _ in listed])
    sim = (emb[a] * emb[b]).sum(1).numpy()  # (P,) cosine similarity
    same = np.array([s for _, _, s in listed])
    result = scores(sim, same, folds=int(fold_of.max()) + 1, fold_of=fold_of)
    json_out = Path(json_out) if json_out else run.run_dir / "verify.json"
    roc_png = Path(roc_png) if roc_png else json_out.with_name(json_out.stem + "_roc.png")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    draw_roc(sim, same, roc_png, title=f"{Path(pairs_file).name}: accuracy {result['accuracy_mean']:.4f} "
                                       f"+- {result['accuracy_std']:.4f}")
    report = {**result, "run": str(run.run_dir), "pairs_file": str(pairs_file), "root": str(root),
              "images": len(unique), "centre_squares": sum(i["reason"] is not None for i in infos),
              "preprocess": run.options.to_dict(), "roc_png": str(roc_png), "json": str(json_out),
              "run_threshold_before": run.info.get("threshold"),
              "run_threshold_before_from": run.info.get("threshold_from"), "threshold_saved": save_threshold,
              "face_json": str(run.run_dir / "face.json")}
    write_json(json_out, report)
    if save_threshold:
        _save_threshold(run, result["threshold"], f"face verify {pairs_file} ({len(listed)} pairs)")
    return report


def _gallery_info(run: FaceRun) -> dict[str, Any]:
    return {"run": str(Path(run.run_dir).resolve()), "model": run.run.recipe.model.name, "dim": run.dim,
            "preprocess": run.options.to_dict()}


def enroll(run_dir: Union[str, Path], root: Union[str, Path], gallery: Union[str, Path],
           device: Optional[str] = None, batch: int = 64) -> dict[str, Any]:
    """`danlu face enroll RUN DIR --gallery G.sqlite`: every image of DIR/IDENTITY/ into the gallery (made if
    missing). Enrolling a file again updates its embedding; unreadable files are skipped and listed."""
    from danlu.face.gallery import Gallery
    from danlu.face.verify import identity_folders

    run = load_face_run(run_dir, device)
    g = Gallery(gallery, fingerprint=run.fingerprint, create=True, info=_gallery_info(run))
    ids = identity_folders(Path(root), "DIR")
    items = [(name, p) for name, files in ids.items() for p in files]
    counts = {"added": 0, "updated": 0}
    skipped, centre = [], 0
    for lo in range(0, len(items), batch):
        chunk, crops, keep = items[lo:lo + batch], [], []
        for name, p in chunk:
            try:
                chw, info = preprocess(p, run.options)
            except BadImage as e:
                skipped.append({"file": str(p.relative_to(root)), "reason": str(e)})
                continue
            crops.append(chw)
            keep.append((name, p))
            centre += info["reason"] is not None
        if not crops:
            continue
        emb = run.embed_crops(torch.from_numpy(np.stack(crops)))
        for what in g.add_many([(name, str(p.relative_to(root)), e) for (name, p), e in zip(keep, emb)]):
            counts[what] += 1
    return {"gallery": str(gallery), "identities": len(ids), "images": len(items), **counts,
            "centre_squares": centre, "skipped": skipped, "gallery_identities": len(g.identities())}


def identify(run_dir: Union[str, Path], images: list[Union[str, Path]], gallery: Union[str, Path], top: int = 5,
             threshold: Optional[float] = None, device: Optional[str] = None) -> list[dict[str, Any]]:
    """`danlu face identify RUN IMAGE --gallery G.sqlite`: per image, the `top` identities by cosine similarity and
    the answer: the best one, or 'unknown' below the threshold (the run's verification threshold by default)."""
    from danlu.face.gallery import Gallery

    if top < 1:
        raise DanluError(f"--top {top}: expected at least 1")
    run = load_face_run(run_dir, device)
    g = Gallery(gallery, fingerprint=run.fingerprint)
    t = threshold if threshold is not None else run.threshold
    if t is None:
        raise DanluError(f"RUN {run_dir}: no verification threshold in face.json (train with data.split=identities "
                         f"or run `danlu face verify`); expected --threshold")
    crops, infos = run.faces([str(p) for p in images])
    emb = run.embed_crops(crops)
    out = []
    for p, matches, info in zip(images, g.identify(emb.to(run.run.device), top), infos):
        best_name, best = matches[0]
        out.append({"image": str(p), "identity": best_name if best >= t else "unknown", "similarity": best,
                    "threshold": t, "matches": [{"name": n, "similarity": s} for n, s in matches], "face": info})
    return out
