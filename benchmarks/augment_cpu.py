#!/usr/bin/env python
"""Where a float32 batch's time goes on the CPU: the figures behind docs/evidence/benchmarks.md "Data pipeline".

    .venv/bin/python benchmarks/augment_cpu.py [--batch 64] [--size 224] [--repeats 10]

Times, on one uint8 batch (B, 3, S, S) in memory, median ms over --repeats calls each:
  convert+normalize  x.to(float32) * scale - mean, / std (what every float32 pipeline must write)
  crop+flip gathers  danlu's batched index-map gathers (Augment._geometric's path on GPUs)
  crop+flip slices   the per-sample slice loop danlu uses on the CPU (identical output: checked here too)
  Augment            danlu's whole training preprocessing (crop 16 + flip + normalize), as the loader's batches get it
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from danlu.data.augment import Augment, _crop_flip_by_slices, _gather2d
from danlu.engine.speed import reuse_freed_memory


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # as every danlu process does; the side it is compared with runs in this process too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    B, S, pad = args.batch, args.size, 16
    x = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = Augment(crop=pad, flip=True, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    p = aug._draw(B, S, S, torch.Generator().manual_seed(1), x.device)
    rows = torch.arange(S).expand(B, S) + p["oy"][:, None]
    cols = torch.where(p["flip"][:, None], S - 1 - torch.arange(S).expand(B, S), torch.arange(S).expand(B, S))
    cols = cols + p["ox"][:, None]
    xp = F.pad(x, (pad,) * 4)
    assert torch.equal(_gather2d(xp, rows, cols), _crop_flip_by_slices(x, p, pad)), "the two paths differ"
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    g = torch.Generator().manual_seed(2)
    figures = {
        "convert+normalize": timed(lambda: x.to(torch.float32).mul_(1 / 255).sub_(mean).div_(std), args.repeats),
        "crop+flip gathers": timed(lambda: _gather2d(F.pad(x, (pad,) * 4), rows, cols), args.repeats),
        "crop+flip slices": timed(lambda: _crop_flip_by_slices(x, p, pad), args.repeats),
        "Augment": timed(lambda: aug(x, g), args.repeats),
    }
    print(f"batch {B} x 3 x {S} x {S} uint8, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}")
    for name, ms in figures.items():
        print(f"  {name:<18} {ms:8.2f} ms   ({B / ms * 1000:8.0f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
