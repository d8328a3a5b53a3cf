"""Compare finished runs side by side: one table and their curves overlaid, labelled by what differs.

    from danlu.compare import compare
    r = compare(["runs/fp32", "runs/fp16"], "compare.png")
    print(r.table)           # a Markdown table: paste it into docs as it is
    r.labels                 # ['precision=fp32', 'precision=fp16']

A run's label is the recipe keys whose values differ between the runs (from each run's resolved recipe), plus the
device and world size where those differ; keys that do not change what is learned (display, snapshots,
TensorBoard) are left out. Runs whose recipes are the same are labelled by their folder names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from danlu.errors import DanluError

# recipe keys that change only bookkeeping, never what a run learns
_IGNORED = {"run.display", "run.test_interval", "run.snapshot_every", "run.keep_snapshots", "run.tensorboard",
            "devices.device"}
COLUMNS = ("run", "test accuracy", "test loss", "iterations", "train time (s)", "images/s", "device", "precision",
           "world size")


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]  # one per run, keyed by COLUMNS (+ 'label')
    labels: list[str]
    table: str  # Markdown
    picture: Optional[Path]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def differing(recipes: list[dict[str, Any]], extra: Optional[list[dict[str, Any]]] = None) -> list[str]:
    """Dotted keys whose values are not the same in every recipe, those that tell more runs apart first (then in
    recipe order), then differing `extra` keys."""
    flat = [{**_flatten(r), **(e or {})} for r, e in zip(recipes, extra or [None] * len(recipes))]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    distinct = {k: len({json.dumps(f.get(k)) for f in flat}) for k in keys if k not in _IGNORED}
    return sorted((k for k, n in distinct.items() if n > 1), key=lambda k: -distinct[k])


def _summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    if not run.is_dir():
        raise DanluError(f"{run}: no such run folder")
    if not path.is_file():
        raise DanluError(f"{run}: no summary.json; expected a finished danlu run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DanluError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _resolved(recipe: dict[str, Any]) -> dict[str, Any]:
    """A run's recipe with today's defaults filled in (a run made before a field existed ran with its default)."""
    from danlu.config import build_recipe

    try:
        return build_recipe(recipe).to_dict()
    except DanluError:
        return recipe


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


_DIGITS = {"test accuracy": 4, "test loss": 4, "train time (s)": 1, "images/s": 0, "to target (s)": 1}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [[_fmt(r.get(c), _DIGITS.get(c, 4)) for c in columns] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in cells])


def compare(runs: list[Union[str, Path]], out: Union[str, Path, None] = "compare.png") -> CompareResult:
    """Table (final test accuracy, loss, iterations, train time, images/s, device, precision, world size) and,
    unless `out` is None, a picture of the runs' loss and accuracy curves against epochs."""
    if not runs:
        raise DanluError("compare: expected at least one run folder")
    folders = [Path(r) for r in runs]
    summaries = [_summary(f) for f in folders]
    recipes = [_resolved(s.get("recipe") or {}) for s in summaries]
    extra = [{"device": s.get("device"), "world size": s.get("world_size", 1)} for s in summaries]
    keys = differing(recipes, extra)
    labels = []
    for f, r, e in zip(folders, recipes, extra):
        flat = {**_flatten(r), **e}
        parts = [f"{k}={_value(flat.get(k))}" for k in keys[:4]] + (["..."] if len(keys) > 4 else [])
        labels.append(", ".join(parts) or f.name)
    if len(set(labels)) < len(labels):  # same recipe and device: only the folder tells them apart
        labels = [f"{f.name}: {lab}" if keys else f.name for f, lab in zip(folders, labels)]
    rows = []
    for f, s, lab in zip(folders, summaries, labels):
        rows.append({"run": f.name, "label": lab, "test accuracy": s.get("test_accuracy"), "test loss": s.get("test_loss"),
                     "iterations": s.get("iterations"), "train time (s)": s.get("train_seconds"),
                     "images/s": s.get("images_per_second"), "device": s.get("device"),
                     "precision": (s.get("recipe") or {}).get("precision"), "world size": s.get("world_size", 1),
                     "to target (s)": s.get("seconds_to_target"), "images to target": s.get("images_to_target")})
    columns = COLUMNS if all(r["run"] == r["label"] for r in rows) else COLUMNS[:1] + ("differs",) + COLUMNS[1:]
    if any("target" in s for s in summaries):  # runs with run.target: where each reached it
        columns = columns + ("to target (s)", "images to target")
    table = markdown_table([{**r, "differs": r["label"]} for r in rows], columns)
    picture = None
    if out is not None:
        from danlu.report import draw_compare

        picture = Path(out)
        draw_compare([f / "metrics.jsonl" for f in folders], labels, picture)
    return CompareResult(rows, labels, table, picture)
