"""What a person looks at: a run's curves.png (train and test loss and accuracy against epochs, from
metrics.jsonl), its confusion.json / confusion.png (per-class accuracy, the confusion matrix), and `danlu bench`'s
results as a terminal table, a Markdown table and a bar chart.

    draw_curves(run / "metrics.jsonl", run / "curves.png")
    print(bench_markdown(result, command="danlu bench ..."))      # result: danlu.bench.run(...)
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Optional

from danlu.io import atomic_write, write_bytes


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


FEW_POINTS = 20  # a series with at most this many points is drawn with a marker at each (a lone point is visible)
DECADES = 100  # a panel whose positive values span this factor or more gets a log axis


def draw_curves(metrics_path: Path, out_png: Path, title: str = "") -> None:
    """Train/test loss and train/test accuracy against epochs, one panel each (like the Keras article's figure),
    each panel only where it has something to show; written atomically so a viewer never sees half a PNG. Series of
    few points have markers (a run with one display event still shows it), and a panel whose values span two
    decades (a test loss of 1,000 beside a train loss of 0.5) has a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    test = [r for r in records if r["kind"] == "test"]
    verification = any("verification_acc" in r for r in test)  # face runs: test = held-out identities' pairs
    panels = []  # (name, y label, [(series label, epochs, values, style)]): only series with a value to draw
    for key, label in (("loss", "loss"), ("acc", "accuracy")):
        # a face run's test is verification on held-out people: an accuracy (right panel), never a loss
        tkey, tlabel = ("verification_acc", "verification accuracy") if verification and key == "acc" else (key, label)
        series = [(f"train {label}", *_points(train, key), "tab:blue"),
                  (f"test {tlabel}", *_points(test, tkey), "tab:orange")]
        series = [s for s in series if s[1]]
        if series:
            panels.append((key, label, series))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (key, label, series) in zip(axes[0], panels):
        for name, xs, ys, color in series:
            few = len(xs) <= FEW_POINTS or name.startswith("test")
            ax.plot(xs, ys, "o-" if few else "-", label=name, color=color, markersize=3 if len(xs) > 1 else 5)
        values = [y for _, _, ys, _ in series for y in ys]
        if min(values) > 0 and max(values) / min(values) >= DECADES:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        if key == "loss":
            ax.set_title(title or "loss")
        elif test and verification and test[-1].get("verification_acc") is not None:
            ax.set_title(f"verification accuracy {test[-1]['verification_acc']:.4f} at iteration {test[-1]['iter']}")
        elif test and test[-1].get("acc") is not None:
            ax.set_title(f"test accuracy {test[-1]['acc']:.4f} at iteration {test[-1]['iter']}")
    if not panels:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no train or test events yet", ha="center", va="center")
    fig.tight_layout()
    atomic_write(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _points(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records that hold a finite `key` (a NaN loss or a missing figure is not drawn)."""
    kept = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [e for e, _ in kept], [v for _, v in kept]


def draw_confusion(report: dict[str, Any], out_png: Path, title: str = "") -> None:
    """The confusion matrix of a class_report (danlu.engine.metrics) as a picture: each row (a true class) as
    shares of its images, the diagonal the per-class accuracy; class names on the axes up to 60 classes. Written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conf = np.asarray(report["confusion"], dtype=np.float64)  # (C, C) counts
    C = conf.shape[0]
    shares = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    side = min(4 + 0.25 * C, 20)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's images")
    if C <= 60:
        names = report["classes"]
        ax.set_xticks(range(C), names, rotation=90, fontsize=8 if C > 20 else 10)
        ax.set_yticks(range(C), names, fontsize=8 if C > 20 else 10)
    if C <= 12:  # counts in the cells
        for i in range(C):
            for j in range(C):
                ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = report.get("accuracy")
    ax.set_title(title or (f"accuracy {acc:.4f} on {report.get('samples')} images" if acc is not None else ""))
    fig.tight_layout()
    atomic_write(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def worst_lines(report: dict[str, Any]) -> list[str]:
    """The worst classes, one line each: '  cat  0.6100 of 100 images, most often taken for dog (23 of them)'
    (class names may be digits: the count says what it counts)."""
    by_name = {r["class"]: r for r in report["per_class"]}
    width = max((len(n) for n in report["worst"]), default=0)
    lines = []
    for name in report["worst"]:
        r = by_name[name]
        taken = f", most often taken for {r['confused_with']} ({r['confused']} of them)" if r["confused_with"] else ""
        lines.append(f"  {name:<{width}}  {r['accuracy']:.4f} of {r['images']} images{taken}")
    return lines


def write_class_report(report: dict[str, Any], folder: Path, stem: str = "confusion") -> list[Path]:
    """STEM.json (per-class accuracy, worst classes, the confusion matrix) and STEM.png (the matrix, where there is
    one) in `folder`; returns the files written."""
    from danlu.io import write_json

    folder = Path(folder)
    write_json(folder / f"{stem}.json", report, indent=2 if len(report["classes"]) <= 50 else None)
    written = [folder / f"{stem}.json"]
    if report.get("confusion") is not None:
        draw_confusion(report, folder / f"{stem}.png")
        written.append(folder / f"{stem}.png")
    return written


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


# ---------------------------------------------------------------- danlu bench's results


def combo_label(precision: str, compile: str, cuda_graphs: bool, procs: int) -> str:
    """'bf16 compile+graphs x2': what a bench row ran, in a few words."""
    how = {"off": "eager", "on": "compile"}.get(compile, compile)
    return f"{precision} {how}{'+graphs' if cuda_graphs else ''}{f' x{procs}' if procs > 1 else ''}"


def _fmt(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _short(commit: str) -> str:
    """'75f9442a30f4...-dirty' -> '75f9442a30f4-dirty' (a figure from uncommitted code says so)."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def bench_markdown(result: dict[str, Any], command: Optional[str] = None) -> str:
    """One Markdown table of the rows, headed by the date, device, versions and commit (for docs/evidence/benchmarks.md)."""
    env = result["env"]
    load = env.get("load_average_start"), env.get("load_average_end")
    head = [f"{env['date'][:10]}, {env['device']}" + (f", driver {env['driver']}" if env.get("driver") else "")
            + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + f", torch {env['torch']}, danlu {env['danlu']}"
            + (f" ({_short(env['danlu_commit'])})" if env.get("danlu_commit") else "")
            + (f"; load average {load[0][0]} before, {load[1][0]} after" if load[0] and load[1] else "")]
    if command:
        head.append(f"`{command}`")
    cols = ["model", "px", "batch", "precision", "compile", "graphs", "procs", "img/s", "ms/step", "p90 ms",
            "peak MB", "TFLOP/s", "MFU", "x fp32 eager", "vs plain loop"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]

    for r in result["rows"]:
        lines.append("| " + " | ".join([
            r["model"], str(r["size"]), str(r["batch"]), r["precision"], r["compile"], "on" if r["cuda_graphs"] else
            "off", str(r["procs"]), _fmt(r["images_per_second"], ",.0f"), _fmt(r["ms_per_step_median"], ".2f"),
            _fmt(r["ms_per_step_p90"], ".2f"), _fmt(r["peak_memory_mb"], ",.0f"), _fmt(r["tflops"], ".3g"), _fmt(r["mfu"], ".1%"),
            _fmt(r["speedup_vs_fp32_eager"], ".2f"), _fmt(r["vs_plain_loop"], ".3f")]) + " |")
    notes = [f"skipped: {s['precision']} compile {s['compile']} (procs {s['procs']}): {s['reason']}"
             for s in result.get("skipped", [])]
    peaks = sorted({f"{r['precision']}: {r['peak_source']}" for r in result["rows"] if r.get("peak_source")})
    if peaks:
        notes.append("MFU against " + "; ".join(peaks))
    if not result.get("complete", True):
        notes.append("incomplete: the run stopped before the whole matrix was measured")
    return "\n".join(head + [""] + lines + [""] + [f"- {n}" for n in notes]) + "\n"


def bench_chart(result: dict[str, Any], path: Path) -> None:
    """Bar chart: images/s of danlu and of the plain loop for each combination."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [combo_label(r["precision"], r["compile"], r["cuda_graphs"], r["procs"]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["images_per_second"] for r in rows], 0.4, label="danlu", color="#c0392b")
    ax.bar([x + 0.2 for x in xs], [r["plain_images_per_second"] for r in rows], 0.4, label="plain PyTorch loop",
           color="#7f8c8d")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['images_per_second']:.0f}", (x - 0.2, r["images_per_second"]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel("images / s")
    first = rows[0] if rows else {}
    env = result["env"]
    ax.set_title(f"{first.get('model', '')} {first.get('size', '')}px, batch {first.get('batch', '')} on "
                 f"{env['device']}\ntorch {env['torch']}, {env['date'][:10]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())


def print_bench_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    env = result["env"]
    t = Table(title=f"danlu bench: {env['device']}, torch {env['torch']}, danlu {env['danlu']} "
                    f"({_short(env['danlu_commit'] or 'no git')}), {env['date']}")
    for name, justify in (("model", "left"), ("precision", "left"), ("compile", "left"), ("graphs", "left"),
                          ("procs", "right"), ("batch", "right"), ("img/s", "right"), ("ms/step", "right"),
                          ("p90 ms", "right"), ("peak MB", "right"), ("TFLOP/s", "right"), ("MFU", "right"),
                          ("x fp32 eager", "right"), ("vs plain", "right")):
        t.add_column(name, justify=justify)

    for r in result["rows"]:
        t.add_row(r["model"], r["precision"], r["compile"], "on" if r["cuda_graphs"] else "off", str(r["procs"]),
                  str(r["batch"]), _fmt(r["images_per_second"], ".1f"), _fmt(r["ms_per_step_median"], ".2f"),
                  _fmt(r["ms_per_step_p90"], ".2f"), _fmt(r["peak_memory_mb"], ".0f"), _fmt(r["tflops"], ".3g"),
                  _fmt(r["mfu"], ".1%"), _fmt(r["speedup_vs_fp32_eager"], ".2f"), _fmt(r["vs_plain_loop"], ".3f"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a file or a pipe: the whole table, not an 80-column squeeze
    console.print(t)
    for s in result.get("skipped", []):
        console.print(f"skipped: {s['precision']} compile {s['compile']}{' graphs' if s['cuda_graphs'] else ''} "
                      f"x{s['procs']}: {s['reason']}")
    peaks = {(r["precision"], r["peak_source"]) for r in result["rows"] if r["peak_tflops"]}
    for precision, source in sorted(peaks):
        console.print(f"peak for MFU, {precision}: {source}")
