"""Pictures of a run: curves.png (train and test loss and accuracy against epochs), drawn from metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from danlu.engine.checkpoint import atomic_write


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def draw_curves(metrics_path: Path, out_png: Path, title: str = "") -> None:
    """Two panels, four curves: train/test loss and train/test accuracy against epochs (like the Keras article's
    figure); written atomically so a viewer never sees half a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    test = [r for r in records if r["kind"] == "test"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot([r["epoch"] for r in train], [r[key] for r in train], label=f"train {label}", color="tab:blue")
        ax.plot([r["epoch"] for r in test], [r[key] for r in test], "o-", label=f"test {label}", color="tab:orange",
                markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if test:
        ax_acc.set_title(f"test accuracy {test[-1]['acc']:.4f} at iteration {test[-1]['iter']}")
    ax_loss.set_title(title or "loss")
    fig.tight_layout()
    atomic_write(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
