"""Classify image files with a trained run: the run's final weights, classes and preprocessing.

    from danlu.predict import predict
    result = predict("runs/lenet", ["seven.png", "digits/"], top=3)
    for p in result.predictions:
        print(p.file, p.top[0])          # ('7', 0.998)

Each file is decoded exactly as class-folder training data is (danlu.data.decode: Pillow, the run's channels, gray
or RGB, resized to the run's input size by its `data.resize`: shorter side + centre crop, or stretched), then goes
through the run's own preprocessing (scale, mean, std) in batches on the device. Files that cannot be read are
reported in `result.errors` and the rest go on.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from danlu.errors import DanluError

from danlu.data.decode import IMAGE_EXTENSIONS as IMAGE_SUFFIXES  # what folders are searched for (named files are
# always tried, whatever their suffix)


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first
    ms: float  # milliseconds for this image: its decode + its share of the batch's preprocessing and forward pass


@dataclass
class PredictResult:
    run_dir: str
    device: str
    predictions: list[Prediction] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (file, why it was not classified)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # how to read the figures (e.g. label smoothing's ceiling)

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.seconds / max(1, len(self.predictions))

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "device": self.device, "ms_per_image": round(self.ms_per_image, 3),
                "images": [{"file": p.file, "ms": round(p.ms, 3),
                            "top": [{"class": c, "prob": prob} for c, prob in p.top]} for p in self.predictions],
                "errors": [{"file": f, "error": e} for f, e in self.errors], "notes": self.notes}


def find_images(inputs: list[Union[str, Path]]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to classify: named files as given, folders searched (recursively, sorted) for image suffixes; a file
    reached twice (named and inside a named folder, or through two folders) is classified once, where first met.
    Returns (files, errors) where errors name inputs that do not exist or folders without images."""
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append((str(p), f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append((str(p), "no such file or folder"))
    seen: set[Path] = set()
    unique = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]  # first occurrence kept
    return unique, errors


def read_image(path: Path, shape: tuple[int, int, int], resize: str = "crop") -> torch.Tensor:
    """Decode `path` into a uint8 tensor of `shape` (C, H, W) as training decodes class folders.
    Raises danlu.data.decode.BadImage (with the reason) for a file that is not a readable image."""
    from danlu.data.decode import decode_image

    c, h, w = shape
    # torch.tensor copies: the array from Pillow is read-only
    return torch.tensor(decode_image(path, (h, w), channels=c, resize=resize))  # (C, H, W) uint8


def predict(run_dir: Union[str, Path], inputs: list[Union[str, Path]], *, top: int = 5,
            device: Optional[str] = None, batch_size: Optional[int] = None) -> PredictResult:
    """Top-`top` classes with probabilities for each image file (or image files in folders) in `inputs`."""
    import PIL.Image  # noqa: F401  (imported before the clock starts: the times are per image, not per session)

    from danlu.data.decode import BadImage
    from danlu.runs import device_name, load_run

    if top < 1:
        raise DanluError(f"--top {top}: expected at least 1")
    run = load_run(run_dir, device=device or "auto")
    files, errors = find_images(inputs)
    if not files:
        raise DanluError(_nothing_classified(errors))
    k = min(top, len(run.classes))
    batch_size = batch_size or run.recipe.data.test_batch_size or 4 * run.recipe.data.batch_size
    result = PredictResult(str(run.run_dir), device_name(run.device), errors=errors)
    forward(run, torch.zeros((1, *run.shape), dtype=torch.uint8))  # warm-up: first-call allocations, not timed
    start = time.perf_counter()
    for i in range(0, len(files), batch_size):
        images, names, decode_ms = [], [], []
        for f in files[i:i + batch_size]:
            t0 = time.perf_counter()
            try:
                images.append(read_image(f, run.shape, run.recipe.data.resize))
            except BadImage as e:
                result.errors.append((str(f), str(e)))
                continue
            names.append(str(f))
            decode_ms.append(1000 * (time.perf_counter() - t0))
        if not images:
            continue
        t0 = time.perf_counter()
        probs = forward(run, torch.stack(images))  # (B, classes) on the CPU
        share = 1000 * (time.perf_counter() - t0) / len(images)
        values, index = probs.topk(k, dim=1)  # (B, k)
        for name, ms, v, j in zip(names, decode_ms, values.tolist(), index.tolist()):
            result.predictions.append(Prediction(name, [(run.classes[c], p) for c, p in zip(j, v)], ms + share))
    result.seconds = time.perf_counter() - start
    if not result.predictions:  # e.g. only a text file named: say so, not "0 images in 0.03 s"
        raise DanluError(_nothing_classified(result.errors))
    note = smoothing_note(run.recipe.optim.label_smoothing, len(run.classes),
                          [p.top[0][1] for p in result.predictions])
    if note:
        result.notes.append(note)
    return result


def _nothing_classified(errors: list[tuple[str, str]]) -> str:
    """One line: no image was classified, the inputs skipped and why (the first 4), and what was expected."""
    skipped = "; ".join(f"{f}: {e}" for f, e in errors[:4]) + (f" (+{len(errors) - 4} more)" if len(errors) > 4
                                                               else "")
    return (f"no images to classify: {skipped or 'no inputs'}; expected image files "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}) or folders of them")


def smoothing_note(smoothing: float, classes: int, tops: list[float]) -> Optional[str]:
    """Why a run trained with label smoothing is rarely sure: its target for the true class was 1 - s + s/K (and s/K
    for each other), so its probabilities mostly stop about there even for a clear image. Said only where it explains
    the figures shown: none of the images' top probabilities (`tops`) is well above that target."""
    target = 1 - smoothing + smoothing / classes
    if not smoothing or not tops or max(tops) > target + 0.02:
        return None
    return (f"the run trained with optim.label_smoothing={smoothing:g}, which aims the true class at {target:.2f} "
            f"(1 - {smoothing:g} + {smoothing:g}/{classes}): a probability near that is as sure as it gets; compare "
            f"them with each other, not with 1")


@torch.no_grad()
def forward(run, x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) on the CPU -> class probabilities (B, classes) float32 on the CPU, through a loaded run's
    preprocessing, model and precision (danlu.runs.LoadedRun), and its test-time flip where it has one."""
    from danlu.models import is_face_model

    x = run.augment(x.to(run.device), train=False)  # (B, C, H, W) float32, the run's preprocessing
    flip = bool(run.recipe.model.test_flip) and not is_face_model(run.model)  # classifiers: mean of x and its mirror
    with run.precision.autocast():
        logits = run.model(x) if not flip else run.model(torch.cat([x, x.flip(-1)]))  # (B or 2B, classes)
    if flip:
        logits = (logits[:len(x)].float() + logits[len(x):].float()) / 2
    return logits.float().softmax(dim=1).cpu()  # .cpu() waits for the device, so the timing is honest


def format_lines(result: PredictResult) -> list[str]:
    """One line per image ('file  7 0.9981  1 0.0012 ...  (1.3 ms)') and a closing summary line."""
    lines = []
    for p in result.predictions:
        classes = "  ".join(f"{c} {prob:.4f}" for c, prob in p.top)
        lines.append(f"{p.file}  {classes}  ({p.ms:.1f} ms)")
    n = len(result.predictions)
    bad = f"; {len(result.errors)} not classified" if result.errors else ""
    lines.append(f"{n} image{'s' if n != 1 else ''} in {result.seconds:.2f} s ({result.ms_per_image:.1f} ms per image)"
                 f" on {result.device}{bad}")
    return lines


def write_json(result: PredictResult, out: Union[str, Path]) -> None:
    _write(out, json.dumps(result.to_dict(), indent=2) + "\n")


def write_csv(result: PredictResult, out: Union[str, Path], top: int) -> None:
    """file, ms, class_1, prob_1, ..., class_k, prob_k, error: one row per image, unreadable files included."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "ms"] + [f"{name}_{i}" for i in range(1, top + 1) for name in ("class", "prob")] + ["error"])
    for p in result.predictions:
        cells = [x for c, prob in p.top for x in (c, f"{prob:.6f}")]
        w.writerow([p.file, f"{p.ms:.3f}"] + cells + [""] * (2 * top - len(cells)) + [""])
    for f, e in result.errors:
        w.writerow([f, ""] + [""] * (2 * top) + [e])
    _write(out, buf.getvalue())


def _write(out: Union[str, Path], text: str) -> None:
    """'-' is standard output; a file is written atomically."""
    if str(out) == "-":
        print(text, end="")
        return
    from danlu.io import write_bytes

    write_bytes(Path(out), text.encode())
