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
    verification = any("verification_acc" in r for r in test)  # face runs: test = held-out identities' pairs
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot([r["epoch"] for r in train], [r[key] for r in train], label=f"train {label}", color="tab:blue")
        tkey, tlabel = ("verification_acc", "verification accuracy") if verification else (key, label)
        shown = [r for r in test if r.get(tkey) is not None]
        ax.plot([r["epoch"] for r in shown], [r[tkey] for r in shown], "o-", label=f"test {tlabel}",
                color="tab:orange", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if test and verification:
        ax_acc.set_title(f"verification accuracy {test[-1]['verification_acc']:.4f} at iteration {test[-1]['iter']}")
    elif test:
        ax_acc.set_title(f"test accuracy {test[-1]['acc']:.4f} at iteration {test[-1]['iter']}")
    ax_loss.set_title(title or "loss")
    fig.tight_layout()
    atomic_write(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def draw_compare(metrics_paths: list[Path], labels: list[str], out_png: Path) -> None:
    """Several runs in one picture (`danlu compare`): loss (train solid, test dashed) and test accuracy against
    epochs, one colour per run; the legend below names each run by what differs between the recipes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_h = 0.25 * len(labels) + 0.3  # inches: one legend line per run, under the panels
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2 + legend_h))
    for i, (path, label) in enumerate(zip(metrics_paths, labels)):
        records = read_metrics(path)
        train = [r for r in records if r["kind"] == "train"]
        test = [r for r in records if r["kind"] == "test"]
        color = f"C{i % 10}"
        final = f"  (test accuracy {test[-1]['acc']:.4f})" if test else ""
        ax_loss.plot([r["epoch"] for r in train], [r["loss"] for r in train], color=color, label=label + final)
        ax_loss.plot([r["epoch"] for r in test], [r["loss"] for r in test], "--", color=color)
        ax_acc.plot([r["epoch"] for r in test], [r["acc"] for r in test], "o-", color=color, markersize=3)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "test accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_loss.set_title("loss (train solid, test dashed)")
    ax_acc.set_title("test accuracy")
    fig.legend(*ax_loss.get_legend_handles_labels(), loc="lower center", fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, legend_h / (4.2 + legend_h), 1, 1))
    atomic_write(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
