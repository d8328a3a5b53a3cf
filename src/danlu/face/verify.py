"""Pairs files in LFW's format and the ROC picture: what `danlu face pairs` writes and `danlu face verify` reads.
The protocol's figures (10 folds, ROC, TAR at FAR) are the verification task's (danlu.tasks.verification), so a
run's test events and `face verify` score pairs the same way.

    pairs, fold_of = read_pairs("pairs.txt", root="lfw")  # LFW's pairs.txt: [(path_a, path_b, same)], fold of each
    text, info = make_pairs("faces/", n=300)               # a balanced, seeded pairs file in LFW's format
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from danlu.errors import DanluError
from danlu.tasks.verification import fold_index, roc, sample_pairs

def draw_roc(similarity, same, out_png: Union[str, Path], title: str = "") -> None:
    """ROC curve (TAR against FAR, log FAR axis) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from danlu.io import atomic_write

    f, t, _ = roc(similarity, same)
    n_diff = max(int((~np.asarray(same, bool)).sum()), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(np.maximum(f, 0.5 / n_diff), t, color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlim(0.5 / n_diff, 1.0)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(f"false accept rate (log; {n_diff} different pairs)")
    ax.set_ylabel("true accept rate")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "ROC")
    fig.tight_layout()
    atomic_write(Path(out_png), lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------- pairs


def identity_images(folder: Path) -> list[Path]:
    """An identity folder's image files in sorted order: LFW's pairs index them from 1 in this order."""
    from danlu.data.decode import IMAGE_EXTENSIONS

    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def identity_folders(root: Path, key: str) -> dict[str, list[Path]]:
    """{identity: its image files, sorted} for every non-empty subfolder of `root` (at least 2); `key` names the
    argument in errors."""
    if not root.is_dir():
        raise DanluError(f"{key} {root}: no such folder; expected a folder with one subfolder of images per identity")
    found = {d.name: identity_images(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    found = {k: v for k, v in found.items() if v}
    if len(found) < 2:
        raise DanluError(f"{key} {root}: {len(found)} identity folder(s) with images; expected at least 2")
    return found


def make_pairs(root: Union[str, Path], n: int = 300, folds: int = 10, seed: int = 0) -> tuple[str, dict[str, Any]]:
    """A balanced pairs file in LFW's format for an identity folder: a header `folds n`, then per fold n same pairs
    (`name i j`) and n different pairs (`name1 i name2 j`), 1-based indices into each folder's sorted listing. When the
    folder holds fewer than folds * n distinct same pairs, n shrinks to what it holds (said in the returned info)."""
    if n < 1 or folds < 1:
        raise DanluError(f"--n {n} --folds {folds}: expected positive numbers")
    ids = identity_folders(Path(root), "DIR")
    names = list(ids)
    sizes = [len(ids[k]) for k in names]
    possible = sum(k * (k - 1) // 2 for k in sizes)
    per_fold = min(n, possible // folds)
    if per_fold < 1:
        raise DanluError(f"DIR {root}: {possible} same-identity pairs; expected at least {folds} (one per fold: add "
                         f"images or use --folds)")
    drawn = sample_pairs(sizes, folds * per_fold, folds * per_fold, seed)
    same, diff = drawn[:folds * per_fold], drawn[folds * per_fold:]
    if len(diff) < folds * per_fold:
        per_fold = len(diff) // folds
    lines = [f"{folds}\t{per_fold}"]
    for k in range(folds):
        lines += [f"{names[g]}\t{i + 1}\t{j + 1}" for g, i, _, j in same[k * per_fold:(k + 1) * per_fold]]
        lines += [f"{names[g1]}\t{i + 1}\t{names[g2]}\t{j + 1}" for g1, i, g2, j in diff[k * per_fold:(k + 1) * per_fold]]
    info = {"folds": folds, "per_fold": per_fold, "requested": n, "identities": len(names), "images": sum(sizes),
            "possible_same_pairs": possible}
    return "\n".join(lines) + "\n", info


def read_pairs(path: Union[str, Path], root: Union[str, Path]) -> tuple[list[tuple[Path, Path, bool]], np.ndarray]:
    """LFW pairs file -> ([(image_a, image_b, same)], (P,) fold of each pair). Lines: `name i j` (same person) or
    `name1 i name2 j`; an optional first line `folds n` (LFW: `10 300`, folds of 2n consecutive pairs); without it
    the pairs are cut into 10 consecutive folds. Bad lines raise DanluError naming the line."""
    path, root = Path(path), Path(root)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DanluError(f"--pairs {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not root.is_dir():
        raise DanluError(f"--root {root}: no such folder; expected the folder of identity folders the pairs name")
    listings: dict[str, list[Path]] = {}
    pairs: list[tuple[Path, Path, bool]] = []
    folds, fold_size = 10, None

    def image(name: str, idx: str, line: int) -> Path:
        if name not in listings:
            d = root / name
            if not d.is_dir() or name in ("..", ".") or os.sep in name:
                raise DanluError(f"{path} line {line}: identity '{name}' has no folder under {root}")
            listings[name] = identity_images(d)
        try:
            i = int(idx)
        except ValueError:
            raise DanluError(f"{path} line {line}: image index {idx!r} is not a number; expected 1..") from None
        files = listings[name]
        if not 1 <= i <= len(files):
            raise DanluError(f"{path} line {line}: image {i} of '{name}' does not exist; expected 1..{len(files)} "
                             f"(the folder's sorted listing)")
        return files[i - 1]

    for no, raw in enumerate(text.splitlines(), 1):
        parts = raw.split()
        if not parts:
            continue
        if not pairs and no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
            folds, fold_size = int(parts[0]), 2 * int(parts[1])
            if folds < 2:
                raise DanluError(f"{path} line 1: {folds} fold(s); expected at least 2")
            continue
        if len(parts) == 3:
            pairs.append((image(parts[0], parts[1], no), image(parts[0], parts[2], no), True))
        elif len(parts) == 4:
            pairs.append((image(parts[0], parts[1], no), image(parts[2], parts[3], no), False))
        else:
            raise DanluError(f"{path} line {no}: {len(parts)} fields; expected 'name i j' (same person) or "
                             f"'name1 i name2 j'")
    if fold_size is not None and len(pairs) != folds * fold_size:  # a cut or padded file: its folds would be wrong
        raise DanluError(f"{path}: {len(pairs)} pairs, but line 1 says {folds} folds of {fold_size // 2} same + "
                         f"{fold_size // 2} different pairs; expected {folds * fold_size} pairs")
    if len(pairs) < folds:
        raise DanluError(f"{path}: {len(pairs)} pairs; expected at least {folds}")
    return pairs, fold_index(len(pairs), folds, fold_size)


