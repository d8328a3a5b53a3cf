"""List files: which image has which label, one per line, paths relative to `data.root`.

Two formats, told apart by the first line:

    # Caffe's ImageData layer (train.txt)        # CSV with a header (as pandas' to_csv writes it)
    cats/001.jpg 0                               ,images,label
    dogs/001.jpg 1                               0,cats/001.jpg,cat
                                                 1,dogs/001.jpg,dog

    files = scan_lists("train.txt", "val.txt", root="images/")
    train, test = load_files(files, size=224)        # danlu.data.folder.load_files

Labels are integers (0-based) or class names. Class names come from an optional `labels.txt` (one name per line,
line i names label i) beside the train list or in the root; without one, integer labels (most lines have one) are
named "0", "1", ... and name labels are sorted. A line whose file is missing or whose label is bad is skipped and reported with its line
number (in data_report.json); a list with no usable line raises DanluError.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Union

from danlu.data.folder import FileSet, Item
from danlu.errors import DanluError

PATH_COLUMNS = ("path", "images", "image", "file", "filename", "filepath", "img")
LABEL_COLUMNS = ("label", "labels", "class", "target", "category")

Row = tuple[int, str, str]  # (line number, path as written, label as written)


def _read_rows(path: Path, key: str) -> tuple[list[Row], list[dict[str, Any]]]:
    """(rows, problems) of one list file, in either format."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DanluError(f"{key}={path}: no such list file; expected a Caffe list ('path label' per line) or a "
                         f"CSV with a header (path,label)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DanluError(f"{key}={path}: cannot read it as text ({e})") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    head = {c.strip().lower() for c in next(csv.reader([first]), [])}
    if path.suffix.lower() == ".csv" or (head & set(PATH_COLUMNS) and head & set(LABEL_COLUMNS)):
        return _csv_rows(path, lines, key)
    rows, problems = [], []
    for no, ln in enumerate(lines, 1):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.rsplit(None, 1)  # Caffe splits at the last space: paths may hold spaces
        if len(parts) != 2:
            problems.append(_problem(path, no, s, "expected 'relative/path.jpg label'"))
            continue
        rows.append((no, parts[0], parts[1]))
    return rows, problems


def _csv_rows(path: Path, lines: list[str], key: str) -> tuple[list[Row], list[dict[str, Any]]]:
    reader = csv.reader(lines)
    header = next(reader, None) or []
    cols = [h.strip().lower() for h in header]
    pcol = next((cols.index(c) for c in PATH_COLUMNS if c in cols), None)
    lcol = next((cols.index(c) for c in LABEL_COLUMNS if c in cols), None)
    if pcol is None or lcol is None:
        raise DanluError(f"{key}={path}: CSV header {header} has no {'path' if pcol is None else 'label'} column; "
                         f"expected a header such as 'path,label' or 'images,label'")
    rows, problems = [], []
    for no, cells in enumerate(reader, 2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) <= max(pcol, lcol) or not cells[pcol].strip() or not cells[lcol].strip():
            problems.append(_problem(path, no, ",".join(cells), f"expected a value in columns "
                                                                f"'{header[pcol]}' and '{header[lcol]}'"))
            continue
        rows.append((no, cells[pcol].strip(), cells[lcol].strip()))
    return rows, problems


def _problem(path: Path, line: int, text: str, reason: str) -> dict[str, Any]:
    return {"list": str(path), "line": line, "text": text[:200], "reason": reason}


def _is_int(s: str) -> bool:
    return s.lstrip("+-").isdigit()


def _read_labels_txt(path: Path) -> list[str]:
    names = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise DanluError(f"{path}: expected one class name per line (line i names label i), no blank lines")
    return names


def scan_lists(train_list: Union[str, Path, None], val_list: Union[str, Path, None] = None,
               root: Union[str, Path, None] = None) -> FileSet:
    """Items of a train list (and a val list) with labels resolved to class indices; bad lines are recorded."""
    if train_list is None:
        raise DanluError("data.train_list: not set; expected a list file (--set data.train_list=train.txt)")
    train_path = Path(train_list).expanduser()
    base = Path(root).expanduser() if root else train_path.parent
    if root and not base.is_dir():
        raise DanluError(f"data.root={base}: no such folder; expected the folder the list's paths are relative to")
    parsed = {"train": _read_rows(train_path, "data.train_list")}
    if val_list is not None:
        parsed["test"] = _read_rows(Path(val_list).expanduser(), "data.val_list")
    labels_txt = next((p for p in (train_path.parent / "labels.txt", base / "labels.txt") if p.is_file()), None)
    tokens = [lab for _, _, lab in parsed["train"][0]]  # the training list defines the classes
    if labels_txt is not None:
        classes = _read_labels_txt(labels_txt)
    elif sum(map(_is_int, tokens)) * 2 >= len(tokens) > 0:  # integer labels (a stray name is a bad line)
        classes = [str(i) for i in range(max(0, max(int(t) for t in tokens if _is_int(t))) + 1)]
    else:  # class names (a stray integer is a bad line unless it indexes them)
        classes = sorted({t for t in tokens if not _is_int(t)})
    index = {c: i for i, c in enumerate(classes)}

    def label_of(tok: str) -> Optional[int]:
        if _is_int(tok):  # an index (into labels.txt where there is one)
            return int(tok) if 0 <= int(tok) < len(classes) else None
        return index.get(tok)

    out: dict[str, list[Item]] = {}
    problems: list[dict[str, Any]] = []
    for split, (rows, bad) in parsed.items():
        lst = train_path if split == "train" else Path(val_list).expanduser()
        problems += bad
        items = []
        for no, rel, tok in rows:
            label = label_of(tok)
            p = Path(rel) if Path(rel).is_absolute() else base / rel
            if label is None:
                numbered = classes == [str(i) for i in range(len(classes))]
                want = (f"0..{len(classes) - 1}" if numbered and not labels_txt else
                        f"0..{len(classes) - 1} or a name in {labels_txt}" if labels_txt else
                        f"one of {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}")
                problems.append(_problem(lst, no, f"{rel} {tok}", f"bad label '{tok}'; expected {want}"))
            elif not p.is_file():
                problems.append(_problem(lst, no, f"{rel} {tok}", f"file not found: {p}"))
            else:
                items.append(Item(p, label, str(lst), no))
        if not items:
            raise DanluError(f"{lst}: no usable line ({len(rows) + len(bad)} read"
                             + (f"; first problem at line {problems[0]['line']}: {problems[0]['reason']}"
                                if problems else "") + "); expected 'relative/path.jpg label' lines with files "
                             f"under {base}")
        out[split] = items
    if len(classes) < 2:
        raise DanluError(f"data.train_list={train_path}: labels name {len(classes)} class(es); expected at least 2")
    source = {"train_list": str(train_path.resolve()), "root": str(base.resolve()),
              "val_list": str(Path(val_list).expanduser().resolve()) if val_list else None,
              "labels_txt": str(labels_txt.resolve()) if labels_txt else None}
    problems.sort(key=lambda pr: (pr["list"] != str(train_path), pr["line"]))
    return FileSet("list", base, classes, out["train"], out.get("test"), skipped=problems, source=source)
