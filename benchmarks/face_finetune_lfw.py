#!/usr/bin/env python
"""Does fine-tuning make unseen people worse? LFW fold 1 verified by an imported face run as it is (zero-shot) and
after `face_finetune` on people of the other nine folds, through the README's commands.

    .venv/bin/python benchmarks/face_finetune_lfw.py --lfw lfw/ --run runs/dlib --out lfw_ft/
    .venv/bin/python benchmarks/face_finetune_lfw.py --lfw lfw/ --run runs/dlib --out lfw_ft/ --set optim.lr=0.000003

LFW's folds share no person. The training people: `--people` (default 300) chosen at random (seed 0) among those
with at least 4 photos who are in no pair of fold 1, with at most `--photos` (8) photos each, linked into OUT/train.
Fold 1's 300 same and 300 different pairs are regrouped into 10 folds of 30 + 30 (OUT/fold1.txt) so that `danlu face
verify` scores them with LFW's protocol (each fold's threshold from the other nine). Then, in OUT:

    danlu face prepare train -o store --for RUN
    danlu train face_finetune --out ft --set model.init=RUN --set data.root=store [--set ...]
    danlu face verify RUN --pairs fold1.txt --root LFW/images --keep-threshold
    danlu face verify ft --pairs fold1.txt --root LFW/images --keep-threshold

and one Markdown table of the two, with the fine-tuned run's training seconds and its `keep_start` figures.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path


def fold1_pairs(lfw: Path) -> tuple[list[str], set[str]]:
    """Fold 1 of LFW's pairs.txt regrouped as 10 folds of 30 same + 30 different pairs (lines of a pairs file), and
    the people in it."""
    lines = (lfw / "pairs.txt").read_text().splitlines()
    n = int(lines[0].split()[1])
    same, diff = lines[1:1 + n], lines[1 + n:1 + 2 * n]
    k = n // 10
    out = ["10\t%d" % k]
    for f in range(10):
        out += same[f * k:(f + 1) * k] + diff[f * k:(f + 1) * k]
    people = {w for row in same + diff for w in row.split() if not w.isdigit()}
    return out, people


def link_training_people(lfw: Path, train: Path, avoid: set[str], people: int, photos: int) -> int:
    """Links `photos` photos each of `people` people (not in `avoid`, with at least 4 photos) into train/NAME/."""
    candidates = [d for d in sorted((lfw / "images").iterdir())
                  if d.is_dir() and d.name not in avoid and len(list(d.iterdir())) >= 4]
    n = 0
    for d in random.Random(0).sample(candidates, min(people, len(candidates))):
        (train / d.name).mkdir(parents=True, exist_ok=True)
        for p in sorted(d.iterdir())[:photos]:
            (train / d.name / p.name).symlink_to(p.resolve())
            n += 1
    return n


def danlu(*args: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "danlu", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"danlu {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", type=Path, required=True, help="an LFW folder: pairs.txt and images/NAME/NAME_0001.jpg")
    ap.add_argument("--run", type=Path, required=True, help="the face run to start from (danlu face import dlib)")
    ap.add_argument("--out", type=Path, required=True, help="a new folder for the links, store, runs and reports")
    ap.add_argument("--people", type=int, default=300)
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="a face_finetune recipe key=value (repeatable)")
    a = ap.parse_args(argv)
    lfw, run = a.lfw.resolve(), a.run.resolve()
    a.out.mkdir(parents=True, exist_ok=False)
    pairs, fold1_people = fold1_pairs(lfw)
    (a.out / "fold1.txt").write_text("\n".join(pairs) + "\n")
    images = link_training_people(lfw, a.out / "train", fold1_people, a.people, a.photos)
    danlu("face", "prepare", "train", "-o", "store", "--for", str(run), cwd=a.out)
    sets = [x for kv in a.set for x in ("--set", kv)]
    danlu("train", "face_finetune", "--out", "ft", "--device", "cpu", "--quiet", "--set", f"model.init={run}",
          "--set", "data.root=store", *sets, cwd=a.out)
    rows = []
    for name, folder in (("zero-shot", run), ("face_finetune" + "".join(f" {kv}" for kv in a.set), a.out / "ft")):
        danlu("face", "verify", str(folder), "--pairs", "fold1.txt", "--root", str(lfw / "images"), "--json",
              f"{folder.name}.json", "--keep-threshold", cwd=a.out)
        rows.append((name, json.loads((a.out / f"{folder.name}.json").read_text())))
    summary = json.loads((a.out / "ft" / "summary.json").read_text())
    print(f"LFW fold 1 (600 pairs as 10 folds of 60); fine-tuned on {images} photos of {a.people} people of the "
          f"other folds in {summary['train_seconds']:.0f} s; keep_start: {summary.get('keep_start')}")
    print("| start | accuracy | ROC area | TAR at FAR 1e-2 |\n|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | {r['roc_auc']:.4f} | "
              f"{r['tar_at_far_1e-2']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
