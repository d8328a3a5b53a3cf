"""Face verification: is this pair one person? LFW's protocol, ROC and TAR at a fixed FAR.

    result = ten_fold(similarity, same)        # (P,) cosine similarities, (P,) bools; 10 folds in file order
    result["accuracy_mean"], result["accuracy_std"], result["fold_accuracies"], result["threshold"]
    pairs = read_pairs("pairs.txt", root="lfw")   # LFW's pairs.txt: [(path_a, path_b, same)], fold of each pair
    text = make_pairs("faces/", n=300)            # a balanced, seeded pairs file in LFW's format

The protocol (Huang et al. 2007, LFW View 2): the pairs are cut into 10 folds; for each fold the threshold that is
most accurate on the other 9 is applied to it; the figures are the mean and the (population) std of the 10 fold
accuracies. A pair is called "same" when its similarity is at least the threshold. During training,
`VerificationEval` scores seeded pairs of the held-out identities the same way (Parts.evaluate of face runs).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from danlu.errors import DanluError

FARS = (1e-2, 1e-3)


# ---------------------------------------------------------------- thresholds, folds, ROC


def best_threshold(similarity: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising the accuracy of `similarity >= threshold` on these pairs. Candidates are the
    midpoints between consecutive distinct similarities plus one below all and one above all; the lowest of equally
    accurate thresholds is taken."""
    s, y = np.asarray(similarity, np.float64), np.asarray(same, bool)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    n = len(s)
    # a cut before position i (0..n) calls pairs i.. "same": correct = different below + same at or above
    diff_below = np.concatenate([[0], np.cumsum(~y)])  # (n+1,)
    same_above = np.concatenate([[0], np.cumsum(y[::-1])])[::-1]  # (n+1,)
    correct = diff_below + same_above
    valid = np.ones(n + 1, bool)
    valid[1:n] = s[1:] > s[:-1]  # no cut between equal similarities
    i = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if i == 0:
        t = s[0] - 1.0 if n else 0.0
    elif i == n:
        t = s[-1] + 1.0
    else:
        t = (s[i - 1] + s[i]) / 2
    return float(t), float(correct[i] / max(n, 1))


def fold_index(n: int, folds: int = 10, fold_size: Optional[int] = None) -> np.ndarray:
    """(n,) fold of each pair: consecutive blocks of `fold_size` (LFW: 600), else `folds` near-equal blocks."""
    if fold_size:
        return np.minimum(np.arange(n) // fold_size, folds - 1)
    return np.concatenate([np.full(len(b), k) for k, b in enumerate(np.array_split(np.arange(n), folds))])


def ten_fold(similarity, same, folds: int = 10, fold_of: Optional[np.ndarray] = None) -> dict[str, Any]:
    """LFW's protocol: per fold, the best threshold on the other folds applied to it. Returns accuracy_mean,
    accuracy_std (population), fold_accuracies, fold_thresholds, and `threshold` (the best on all pairs)."""
    s = np.asarray(similarity, np.float64)
    y = np.asarray(same, bool)
    if len(s) < folds:
        raise DanluError(f"verification: {len(s)} pairs; expected at least {folds} (one per fold)")
    fold_of = fold_index(len(s), folds) if fold_of is None else np.asarray(fold_of)
    accs, thresholds = [], []
    for k in range(folds):
        test = fold_of == k
        t, _ = best_threshold(s[~test], y[~test])
        thresholds.append(t)
        accs.append(float(((s[test] >= t) == y[test]).mean()) if test.any() else float("nan"))
    t_all, acc_all = best_threshold(s, y)
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "fold_accuracies": accs,
            "fold_thresholds": thresholds, "threshold": t_all, "accuracy_at_threshold": acc_all, "pairs": len(s),
            "same_pairs": int(y.sum()), "different_pairs": int((~y).sum())}


def roc(similarity, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds): accepting pairs with similarity >= threshold, for every distinct threshold, from
    accepting none to accepting all."""
    s, y = np.asarray(similarity, np.float64), np.asarray(same, bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[s[1:] < s[:-1], True]  # the last of each run of equal similarities
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    n_same, n_diff = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    far = np.r_[0.0, fp / n_diff]
    tar = np.r_[0.0, tp / n_same]
    return far, tar, np.r_[np.inf, s[last]]


def tar_at_far(similarity, same, far: float) -> float:
    """The highest true-accept rate whose false-accept rate is at most `far`. With D different pairs, FAR below 1/D
    means no false accept at all."""
    f, t, _ = roc(similarity, same)
    return float(t[f <= far + 1e-12].max())


def scores(similarity, same, folds: int = 10, fold_of: Optional[np.ndarray] = None) -> dict[str, Any]:
    """ten_fold plus TAR at FAR 1e-2 and 1e-3 and the ROC's area. With D different pairs the lowest FAR the pairs can
    measure is 1/D (one false accept): a FAR below it is None (not measured), and `lowest_far` = 1/D with
    `tar_at_lowest_far` says what the pairs do measure (270 different pairs: TAR at FAR 3.7e-3, not at 1e-3)."""
    out = ten_fold(similarity, same, folds, fold_of)
    lowest = 1.0 / max(out["different_pairs"], 1)
    for far in FARS:
        out[f"tar_at_far_{far:.0e}".replace("e-0", "e-")] = tar_at_far(similarity, same, far) if far >= lowest \
            else None
    out["lowest_far"], out["tar_at_lowest_far"] = lowest, tar_at_far(similarity, same, lowest)
    f, t, _ = roc(similarity, same)
    out["roc_auc"] = float(np.trapezoid(t, f) if hasattr(np, "trapezoid") else np.trapz(t, f))
    return out


def describe_tar(r: dict[str, Any]) -> str:
    """'TAR 0.812 at FAR 1e-2, 0.640 at FAR 1e-3' from a scores() dict, saying so where the pairs cannot measure a
    FAR: 'TAR 0.812 at FAR 1e-2, 0.640 at FAR 3.7e-3 (the lowest 270 different pairs measure)'."""
    parts = [f"{r[f'tar_at_far_{far:.0e}'.replace('e-0', 'e-')]:.4f} at FAR {far:.0e}".replace("e-0", "e-")
             for far in FARS if r.get(f"tar_at_far_{far:.0e}".replace("e-0", "e-")) is not None]
    if len(parts) < len(FARS):
        lowest = f"{r['lowest_far']:.1e}".replace("e-0", "e-")
        parts.append(f"{r['tar_at_lowest_far']:.4f} at FAR {lowest} (the lowest "
                     f"{r.get('different_pairs', round(1 / r['lowest_far']))} different pairs measure)")
    return "TAR " + ", ".join(parts)


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


def sample_pairs(group_sizes: list[int], n_same: int, n_diff: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Distinct pairs (g1, i, g2, j) of members i of group g1 and j of g2: n_same with g1 == g2 (i < j), then n_diff
    with g1 != g2; fewer same pairs when the groups do not hold that many. Seeded."""
    rng = random.Random(seed)
    possible = sum(k * (k - 1) // 2 for k in group_sizes)
    n_same = min(n_same, possible)
    same: list[tuple[int, int, int, int]] = []
    if possible <= 4 * n_same:  # few: enumerate them all, take a seeded sample
        every = [(g, i, g, j) for g, k in enumerate(group_sizes) for i in range(k) for j in range(i + 1, k)]
        same = rng.sample(every, n_same)
    else:
        multi = [g for g, k in enumerate(group_sizes) if k > 1]
        weights = [group_sizes[g] * (group_sizes[g] - 1) for g in multi]  # uniform over all same pairs
        seen: set[tuple[int, int, int, int]] = set()
        while len(same) < n_same:
            g = rng.choices(multi, weights)[0]
            i, j = sorted(rng.sample(range(group_sizes[g]), 2))
            if (g, i, g, j) not in seen:
                seen.add((g, i, g, j))
                same.append((g, i, g, j))
    groups = [g for g, k in enumerate(group_sizes) if k > 0]
    if len(groups) < 2:
        raise DanluError(f"pairs: {len(groups)} identity with images; expected at least 2 for different pairs")
    possible_diff = (sum(group_sizes) ** 2 - sum(k * k for k in group_sizes)) // 2
    n_diff = min(n_diff, possible_diff)
    diff, seen_d = [], set()
    while len(diff) < n_diff:
        g1, g2 = sorted(rng.sample(groups, 2))
        pair = (g1, rng.randrange(group_sizes[g1]), g2, rng.randrange(group_sizes[g2]))
        if pair not in seen_d:
            seen_d.add(pair)
            diff.append(pair)
    return same + diff


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
    if len(pairs) < folds:
        raise DanluError(f"{path}: {len(pairs)} pairs; expected at least {folds}")
    return pairs, fold_index(len(pairs), folds, fold_size)


# ---------------------------------------------------------------- the training-time evaluator


def _embedder(model: torch.nn.Module) -> torch.nn.Module:
    """The face model under DDP / torch.compile wrappers."""
    from danlu.models import is_face_model, unwrap

    net = unwrap(model)
    if not is_face_model(net):
        raise DanluError(f"data.split=identities: model {type(net).__name__} has no embed(); expected a face "
                         f"model (inception_resnet_v1, mobilefacenet)")
    return net


@torch.no_grad()
def embed_loader(model: torch.nn.Module, loader, augment, precision) -> torch.Tensor:
    """(N, D) float32 unit embeddings of a loader's images, in its order."""
    net = _embedder(model)
    net.eval()
    out = []
    for x, _ in loader.epoch(0):
        with precision.autocast():
            out.append(net.embed(augment(x, train=False)).float())
    return torch.cat(out)


class VerificationEval:
    """Parts.evaluate for face runs: embeds the held-out identities' images, scores `n_pairs` seeded same and
    different pairs, and returns LFW's 10-fold accuracy as `verification_acc` (+ std, the ROC's area as
    `verification_auc`, threshold, TAR@FAR); with a margin head also `head_cosine`, its identity weights' mean cosine
    (CosineHead.mean_cosine: a collapse shows)."""

    def __init__(self, labels: torch.Tensor, n_pairs: int, seed: int):
        y = labels.cpu().numpy()
        members = [np.flatnonzero(y == c) for c in range(int(y.max()) + 1)]
        sizes = [len(m) for m in members]
        n = min(n_pairs, sum(k * (k - 1) // 2 for k in sizes))  # balanced: as many different pairs as same ones
        drawn = sample_pairs(sizes, n, n, seed)
        self.a = torch.tensor([members[g1][i] for g1, i, _, _ in drawn])
        self.b = torch.tensor([members[g2][j] for _, _, g2, j in drawn])
        self.same = np.array([g1 == g2 for g1, _, g2, _ in drawn])

    def __call__(self, model, loader, augment, precision, dist, max_batches=None, label_smoothing=0.0) -> dict:
        emb = embed_loader(model, loader, augment, precision)  # (N, D); every rank sees the whole held-out set
        sim = (emb[self.a.to(emb.device)] * emb[self.b.to(emb.device)]).sum(1).cpu().numpy()  # (P,) cosine
        r = scores(sim, self.same)
        head = getattr(_embedder(model), "head", None)
        spread = {"head_cosine": head.mean_cosine()} if hasattr(head, "mean_cosine") else {}
        return {**spread, "verification_acc": r["accuracy_mean"], "verification_std": r["accuracy_std"],
                "verification_auc": r["roc_auc"], "threshold": r["threshold"], "tar_at_far_1e-2": r["tar_at_far_1e-2"],
                "tar_at_far_1e-3": r["tar_at_far_1e-3"], "lowest_far": r["lowest_far"],
                "tar_at_lowest_far": r["tar_at_lowest_far"], "different_pairs": r["different_pairs"],
                "pairs": r["pairs"], "samples": int(len(emb))}
