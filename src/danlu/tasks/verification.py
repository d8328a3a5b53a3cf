"""Face verification as a task: an embedding network trained with an identity head (softmax, ArcFace, CosFace) on
some people, tested on whether pairs of photos of people never seen in training are one person. LFW's protocol, the
ROC and TAR at a fixed FAR are computed here, for training's test events and for `danlu face verify` alike.

    task = VerificationTask(head="arcface", scale=32.0, margin=0.3, held_out=True, test_pairs=1000)
    result = ten_fold(similarity, same)        # (P,) cosine similarities, (P,) bools; 10 folds in file order
    result["accuracy_mean"], result["accuracy_std"], result["fold_accuracies"], result["threshold"]

The protocol (Huang et al. 2007, LFW View 2): the pairs are cut into 10 folds; for each fold the threshold that is
most accurate on the other 9 is applied to it; the figures are the mean and the (population) std of the 10 fold
accuracies. A pair is called "same" when its similarity is at least the threshold. During training,
`VerificationEval` scores seeded pairs of the held-out identities the same way.

A face run's folder gets face.json (how faces are cut, the verification threshold, the held-out people) and, with
model.whiten, whiten.safetensors (the embeddings' whitening, fitted after training on the training people).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from safetensors.torch import load_file, save

from danlu.data.loader import make_loader
from danlu.data.store import store_source
from danlu.errors import DanluError
from danlu.io import write_bytes, write_json
from danlu.models import unwrap
from danlu.models.face import FaceModel, within_class_whitening
from danlu.models.heads import COLLAPSED, CosineHead, build_criterion
from danlu.tasks.classification import ClassificationTask, classification_summary, evaluate, write_confusion

FACE_FILE = "face.json"  # how faces are cut, the verification threshold and where it came from
WHITEN_FILE = "whiten.safetensors"  # the embeddings' whitening (model.whiten), beside model.safetensors
WHITEN_IMAGES = 20000  # model.whiten is fitted on at most this many training images (a seeded choice)
# the whitening is kept where the held-out people's ROC area grows by more than this: less is within the noise of
# the CPU's float rounding on a few pairs, and a keep/drop decision must not flip with the machine
WHITEN_MIN_GAIN = 1e-3


class VerificationTask:
    """A face model (backbone -> unit embedding -> identity head) learning the training people's identities. With
    `held_out` (data.split=identities) each test event verifies seeded pairs of the held-out people; otherwise the
    test set holds the training people's other photos and is scored as classification."""
    name = "verification"

    def __init__(self, head: str = "softmax", scale: float = 64.0, margin: float = 0.5,
                 embedding_dim: Optional[int] = None, test_flip: bool = True, label_smoothing: float = 0.0,
                 held_out: bool = True, test_pairs: int = 1000, split_seed: int = 0, whiten: float = 0.0, seed: int = 0,
                 store: Optional[str] = None, model_name: str = ""):
        self.head, self.scale, self.margin, self.embedding_dim = head, scale, margin, embedding_dim
        self.test_flip, self.label_smoothing, self.held_out = test_flip, label_smoothing, held_out
        self.test_pairs, self.split_seed, self.whiten, self.seed = test_pairs, split_seed, whiten, seed
        self.store, self.model_name = store, model_name
        self.headline = "verification_acc" if held_out else "acc"
        self.whole_test_set = held_out  # pairs are drawn across the whole held-out set: every rank embeds it all

    def model_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"head": self.head, "scale": self.scale, "test_flip": self.test_flip}
        if self.embedding_dim is not None:
            kw["embedding_dim"] = self.embedding_dim
        return kw

    def criterion(self) -> nn.Module:
        return build_criterion(self.head, self.scale, self.margin, self.label_smoothing)

    def evaluator(self, test: Any) -> Any:
        if self.held_out:
            return VerificationEval(test.labels, self.test_pairs, self.split_seed)
        return evaluate  # the training people's other photos: scored by their identities

    def test_line(self, r: dict[str, Any], total: int) -> str:
        if "verification_acc" not in r:
            return ClassificationTask().test_line(r, total)
        collapse = (f"  collapsed: the identity weights point one way (mean cosine {r['head_cosine']:.2f}); "
                    f"a longer model.margin_warmup or a smaller model.margin lets them spread"
                    if r.get("head_cosine", 0.0) >= COLLAPSED else "")
        whitened = "  (whitened embeddings)" if r.get("whitened") else ""
        return (f"[test]  iter {r['iter']:>6}/{total}  verification {r['verification_acc']:.4f} +- "
                f"{r['verification_std']:.4f} ({r['pairs']} pairs)  {describe_tar(r)}{whitened}{collapse}")

    def done_line(self, test: dict[str, Any], stats: Any, classes: int, world: int, run_dir: Path) -> str:
        if "verification_acc" not in test:
            return ClassificationTask().done_line(test, stats, classes, world, run_dir)
        return (f"done: verification accuracy {test['verification_acc']:.4f} +- {test['verification_std']:.4f} on "
                f"{test['pairs']} pairs of {classes} held-out identities after {stats.iterations} iterations "
                f"({stats.train_seconds:.1f} s training); run folder {run_dir}")

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        out = classification_summary(test)
        if "verification_acc" in test:
            out.update({"test_verification_accuracy": test["verification_acc"],
                        "test_verification_std": test.get("verification_std"),
                        "verification_threshold": test.get("threshold"),
                        "test_tar_at_far_1e-3": test.get("tar_at_far_1e-3"), "test_pairs": test.get("pairs")})
        if "ema_verification_acc" in test:
            out["test_ema_verification_acc"] = test["ema_verification_acc"]
        return out

    @torch.no_grad()
    def after_training(self, model: nn.Module, train: Any, parts: Any, stats: Any, quiet: bool) -> dict[str, Any]:
        """model.whiten: fit the embedding whitening on the training people's unaugmented images (every rank alike:
        the same weights, the same images), then test the held-out people again with it. Kept where the area under
        their ROC grows by more than WHITEN_MIN_GAIN (the run's figures and threshold, face.json, are then the
        whitened ones, and the whitened test is logged as the run's last test event), else dropped: it helps most
        runs on tens of training people, not all, and not LFW's 1,505 (docs/evidence/faces.md). The area, not the
        accuracy, decides: it weighs every pair's similarity rather than the pairs on one side of one threshold, and
        on 2 or 3 held-out people the accuracy dropped whitenings that would have helped."""
        net = unwrap(model)
        if self.whiten <= 0:
            return {}
        n = len(train)
        rows = np.sort(np.random.default_rng([self.seed, 23]).permutation(n)[:WHITEN_IMAGES]) if n > WHITEN_IMAGES \
            else np.arange(n)
        fit = train.subset(torch.as_tensor(rows)) if len(rows) < n else train
        loader = make_loader(fit.images, fit.labels, 256, device=next(net.parameters()).device, shuffle=False,
                             drop_last=False)
        emb = embed_loader(model, loader, parts.augment, parts.precision)  # unit embeddings: no whitening is set yet
        labels = torch.as_tensor(fit.labels).cpu()
        net.set_whitening(*within_class_whitening(emb, labels, self.whiten))
        out: dict[str, Any] = {"images": len(rows), "people": int(labels.unique().numel()), "shrink": self.whiten,
                               "kept": True}
        before = {k: stats.last_test.get(k) for k in ("verification_acc", "verification_auc")}
        if before["verification_auc"] is not None:  # the held-out people again, whitened
            test = parts.evaluate(model, parts.test_loader, parts.augment, parts.precision, parts.dist)
            out.update({f"{k}_before": v for k, v in before.items()})
            out.update(verification_acc=test["verification_acc"], verification_auc=test["verification_auc"],
                       kept=test["verification_auc"] > before["verification_auc"] + WHITEN_MIN_GAIN,
                       min_gain=WHITEN_MIN_GAIN)
            if out["kept"]:  # the figures and the threshold the run keeps
                stats.last_test = {**stats.last_test, **test, "whitened": True}
            else:
                net.set_whitening(None, None)
        if not quiet:
            held = (f"; held-out people's ROC area {before['verification_auc']:.4f} -> {out['verification_auc']:.4f} "
                    f"(accuracy {before['verification_acc']:.4f} -> {out['verification_acc']:.4f})"
                    if before["verification_auc"] is not None else "")
            drop = "" if out["kept"] else f": not kept (expected a gain above {WHITEN_MIN_GAIN})"
            print(f"danlu: embeddings whitened against {out['people']} training people's variation ({len(rows)} "
                  f"images, model.whiten={self.whiten}){held}{drop}", flush=True)
        return {"whitening": out}

    def write_outputs(self, run_dir: Path, model: nn.Module, test: dict[str, Any], test_data: Any) -> None:
        """face.json (what embedding new images needs: danlu.face) and, where model.whiten kept one, the whitening;
        a run scored by classification (no held-out people) also gets confusion.json like a classifier."""
        whitening = unwrap(model).whitening()
        if whitening:  # what embed() applies, beside the weights
            write_bytes(run_dir / WHITEN_FILE, save(whitening))
        if not self.held_out:
            write_confusion(run_dir, test, test_data.classes)
        write_face_info(run_dir, face_info(self.model_name, self.head, self.test_flip, self.store, test,
                                           held_out=test_data.classes if self.held_out else None))

    def restore(self, run_dir: Path, model: nn.Module) -> None:
        """A run's whitening (model.whiten), fitted after training, onto its model."""
        path = Path(run_dir) / WHITEN_FILE
        if path.is_file():
            w = load_file(str(path))
            unwrap(model).set_whitening(w["mean"], w["matrix"])  # FaceModel.whitening()'s keys


# ---------------------------------------------------------------- face.json


def face_info(model_name: str, head: str, test_flip: bool, store: Optional[str], test: dict[str, Any],
              held_out: Optional[list[str]] = None) -> dict[str, Any]:
    """face.json of a face run: the preprocessing (the face store's, from its meta.json), the verification
    threshold (from the last verification on held-out identities, if any), the head, and the held-out identities."""
    pre = (store_source(store) or {}).get("face") if store else None
    return {"model": model_name, "head": head, "preprocess": pre, "test_flip": test_flip,
            "threshold": test.get("threshold"),
            "threshold_from": (f"training: {test.get('pairs')} pairs of held-out identities"
                               if test.get("threshold") is not None else None),
            "held_out_identities": held_out}


def read_face_info(run_dir: Any) -> dict[str, Any]:
    """A run's face.json ({} where there is none)."""
    path = Path(run_dir) / FACE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_face_info(run_dir: Any, info: dict[str, Any]) -> None:
    write_json(Path(run_dir) / FACE_FILE, info)


# ---------------------------------------------------------------- the protocol: thresholds, folds, ROC


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


# ---------------------------------------------------------------- the evaluator


def _embedder(model: torch.nn.Module) -> torch.nn.Module:
    """The face model under DDP / torch.compile wrappers."""
    net = unwrap(model)
    if not isinstance(net, FaceModel):
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
        head = _embedder(model).head
        spread = {"head_cosine": head.mean_cosine()} if isinstance(head, CosineHead) else {}
        return {**spread, "verification_acc": r["accuracy_mean"], "verification_std": r["accuracy_std"],
                "verification_auc": r["roc_auc"], "threshold": r["threshold"], "tar_at_far_1e-2": r["tar_at_far_1e-2"],
                "tar_at_far_1e-3": r["tar_at_far_1e-3"], "lowest_far": r["lowest_far"],
                "tar_at_lowest_far": r["tar_at_lowest_far"], "different_pairs": r["different_pairs"],
                "pairs": r["pairs"], "samples": int(len(emb))}
