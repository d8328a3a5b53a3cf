"""Image classification: cross-entropy on the classes, top-1 / top-5 accuracy and loss over the test set, per-class
accuracy and the confusion matrix (confusion.json / .png) beside the run.

    task = ClassificationTask(label_smoothing=0.1, test_flip=False)
    figures = task.evaluator(test)(model, loader, augment, precision, dist)    # {'loss', 'acc', 'top5', 'samples'}
    report = class_report(figures, test.classes)                               # what confusion.json holds
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from danlu.engine.devices import wide_float

CONFUSION_MAX_CLASSES = 1000  # evaluation counts a confusion matrix up to this many classes (8 MB of counts)


class ClassificationTask:
    """The classes of the data are what the model learns; `test_flip` averages each test image's logits with its
    mirror image's (model.test_flip)."""
    name = "classification"
    headline = "acc"
    whole_test_set = False  # each rank evaluates its shard; the sums are all-reduced

    def __init__(self, label_smoothing: float = 0.0, test_flip: bool = False):
        self.label_smoothing, self.test_flip = label_smoothing, test_flip

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)

    def evaluator(self, test: Any) -> Any:
        return functools.partial(evaluate, flip=True) if self.test_flip else evaluate

    def test_line(self, r: dict[str, Any], total: int) -> str:
        top5 = f"  top5 {r['top5']:.4f}" if r.get("top5") is not None else ""
        ema = f"  (ema: loss {r['ema_loss']:.4f}  acc {r['ema_acc']:.4f})" if r.get("ema_acc") is not None else ""
        return f"[test]  iter {r['iter']:>6}/{total}  loss {r['loss']:.4f}  acc {r['acc']:.4f}{top5}{ema}"

    def done_line(self, test: dict[str, Any], stats: Any, classes: int, world: int, run_dir: Path) -> str:
        reached = "" if stats.to_target is None else (
            f"target reached in {stats.to_target['seconds']:.1f} s of training ({stats.to_target['images']} images); ")
        return (f"done: {reached}test accuracy {test.get('acc', float('nan')):.4f}, loss "
                f"{test.get('loss', float('nan')):.4f} after {stats.iterations} iterations ({stats.train_seconds:.1f} s "
                f"training, {stats.images_per_second * world:.0f} img/s); run folder {run_dir}")

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        return classification_summary(test)

    def after_training(self, model: nn.Module, train: Any, parts: Any, stats: Any, quiet: bool) -> dict[str, Any]:
        return {}

    def write_outputs(self, run_dir: Path, model: nn.Module, test: dict[str, Any], test_data: Any) -> None:
        write_confusion(run_dir, test, test_data.classes)

    def restore(self, run_dir: Path, model: nn.Module) -> None:
        pass


def classification_summary(test: dict[str, Any]) -> dict[str, Any]:
    """summary.json's figures of a classification test event (None where the event has none)."""
    return {"test_accuracy": test.get("acc"), "test_loss": test.get("loss"), "test_top5": test.get("top5")}


def write_confusion(run_dir: Path, test: dict[str, Any], classes: list[str]) -> None:
    """confusion.json / .png of the last test event, where it counted classes."""
    from danlu.report import write_class_report  # matplotlib: loaded at the end of a run, not at its start

    report = class_report(test, classes)
    if report is not None:
        write_class_report(report, run_dir)


class TestFigures(dict):
    """A classification test event's figures (loss, acc, top5, samples: what metrics.jsonl logs) and, beside them
    as attributes, never logged: `per_class`, (classes, 2) int64 images and correct ones per class; `confusion`,
    (classes, classes) int64 counts, rows the true class and columns the predicted one (None above
    CONFUSION_MAX_CLASSES classes). class_report turns them into what a person reads."""
    per_class: Optional[torch.Tensor] = None
    confusion: Optional[torch.Tensor] = None


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, augment: Any, precision: Any, dist: Any,
             max_batches: Optional[int] = None, label_smoothing: float = 0.0, flip: bool = False) -> TestFigures:
    """Loss (the training objective, so train and test curves compare), top-1 and (with more than 5 classes) top-5
    over the test set, every sample counted once; with `flip`, of the logits averaged over each image and its
    mirror image (test-time augmentation, model.test_flip); per class (not logged, see TestFigures) the images, the
    correct ones and, up to CONFUSION_MAX_CLASSES classes, the confusion matrix."""
    model.eval()
    wide = wide_float(loader.device)  # float64; float32 on mps, which has none
    sums = torch.zeros(4, dtype=wide, device=loader.device)  # (loss sum, top1, top5, n)
    per_class = confusion = None
    C = 0
    for i, (x, y) in enumerate(loader.epoch(0)):
        if max_batches is not None and i >= max_batches:
            break
        x = augment(x, train=False)
        with precision.autocast():
            logits = model(x) if not flip else model(torch.cat([x, x.flip(-1)]))  # (B, classes) or (2B, classes)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32; fp64 stays
        if flip:
            logits = (logits[:len(y)] + logits[len(y):]) / 2
        C = logits.shape[1]
        k = min(5, C)
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hit = topk == y[:, None]
        loss = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
        n = torch.tensor(float(len(y)), device=sums.device, dtype=wide)
        sums += torch.stack([loss.to(wide), hit[:, 0].sum().to(wide), hit.any(1).sum().to(wide), n])
        if per_class is None:
            per_class = torch.zeros(C, 2, dtype=wide, device=sums.device)  # (images, correct) per class
            confusion = torch.zeros(C * C, dtype=torch.int64, device=sums.device) if C <= CONFUSION_MAX_CLASSES \
                else None
        per_class += torch.stack([torch.bincount(y, minlength=C).to(wide), torch.bincount(y, hit[:, 0].to(wide), C)],
                                 1)
        if confusion is not None:  # rows: the true class, columns: the predicted one
            confusion += torch.bincount(y * C + topk[:, 0], minlength=C * C)
    loss, top1, top5, n = dist.all_reduce_sum(sums).tolist()
    n = max(n, 1)
    figures = TestFigures(loss=loss / n, acc=top1 / n, top5=(top5 / n) if C > 5 else None, samples=int(n))
    figures.per_class = dist.all_reduce_sum(per_class).long().cpu()
    figures.confusion = None if confusion is None else dist.all_reduce_sum(confusion).view(C, C).cpu()
    return figures


def class_report(figures: Any, classes: list[str], worst: int = 5) -> Optional[dict[str, Any]]:
    """Per-class accuracy and the confusion matrix of a test event, as JSON (None for figures without them, e.g. face
    verification): classes, per_class [{class, images, correct, accuracy, confused_with, confused}] (confused_with:
    the class most often predicted instead, and how often), worst (the `worst` lowest accuracies, most images
    first among equals), confusion (rows: true class, columns: predicted; None above CONFUSION_MAX_CLASSES)."""
    counts = getattr(figures, "per_class", None)
    if counts is None:
        return None
    conf = getattr(figures, "confusion", None)
    rows = []
    for c, (images, correct) in enumerate(counts.tolist()):
        row = {"class": classes[c] if c < len(classes) else str(c), "images": images, "correct": correct,
               "accuracy": correct / images if images else None, "confused_with": None, "confused": 0}
        if conf is not None:
            off = conf[c].clone()
            off[c] = -1
            j = int(off.argmax())
            if off[j] > 0:
                row["confused_with"], row["confused"] = (classes[j] if j < len(classes) else str(j)), int(off[j])
        rows.append(row)
    seen = [r for r in rows if r["images"]]
    ranked = sorted(seen, key=lambda r: (r["accuracy"], -r["images"], r["class"]))[:worst]
    return {"classes": [r["class"] for r in rows], "accuracy": figures.get("acc"), "samples": figures.get("samples"),
            "per_class": rows, "worst": [r["class"] for r in ranked],
            "confusion": None if conf is None else conf.tolist()}
