#!/usr/bin/env python
"""Face training speed on this machine: MobileFaceNet (the light face recipe's model) per speed switch, side by side.

    python benchmarks/face_train_speed.py                      # 112 and 64 px, batch 64, fp32/bf16 x NCHW/channels-last
    python benchmarks/face_train_speed.py --sizes 112 --compile off,on --steps 20 --json face_speed.json

Each row is `danlu bench` (danlu's real training step against a plain PyTorch loop, interleaved step by step) for
MobileFaceNet with an identity head over `--classes` people, on synthetic uint8 faces already in memory; the table
adds each row's speed-up over fp32, NCHW, eager at the same size. On a CPU, torch.compile's first steps compile for a
minute or more (left out of the timing as warm-up).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from danlu import bench
from danlu.io import write_json
from danlu.engine.speed import reuse_freed_memory


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # as every danlu process does; the side it is compared with runs in this process too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="112,64", help="input sizes in pixels (default 112,64)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=30, help="identities of the head (default 30, ORL's training set)")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--compile", default="off")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write {env, rows} here")
    a = ap.parse_args(argv)
    results = []
    for size in (int(s) for s in a.sizes.split(",")):
        for layout in (False, True):
            results.append(bench.run(model="mobilefacenet", size=size, batch=a.batch, classes=a.classes,
                                     precisions=bench.parse_list(a.precision, bench.PRECISIONS, "--precision"),
                                     compiles=bench.parse_list(a.compile, bench.COMPILE_WORDS, "--compile"),
                                     steps=a.steps, warmup=a.warmup, device=a.device, channels_last=layout))
    merged = bench.merge(results)
    base = {r["size"]: r["images_per_second"] for r in merged["rows"]
            if r["precision"] == "fp32" and r["compile"] == "off" and not r["channels_last"]}
    print(f"MobileFaceNet, batch {a.batch}, {a.classes} identities, on {merged['env']['device']}, torch "
          f"{merged['env']['torch']}, {merged['env']['date'][:16]}")
    print("| px | precision | layout | compile | img/s | x fp32 NCHW eager | danlu / plain loop |")
    print("|---|---|---|---|---|---|---|")
    for r in merged["rows"]:
        print(f"| {r['size']} | {r['precision']} | {'channels-last' if r['channels_last'] else 'NCHW'} | "
              f"{r['compile']} | {r['images_per_second']:.1f} | {r['images_per_second'] / base[r['size']]:.2f} | "
              f"{r['vs_plain_loop']:.3f} |")
    if a.json:
        write_json(Path(a.json), merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
