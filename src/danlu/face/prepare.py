"""`danlu face prepare RAW_DIR -o STORE`: a folder of identity folders -> a prepared store of face crops.

    meta = prepare_faces("raw/", "faces.store", size=160, align=True)  # crop and equalize: auto

Every image goes through `detect.preprocess` (detect, largest face, optional eye alignment, margin crop, equalize,
resize) and lands in a store of the data issue's format (danlu.data.store: memory-mapped uint8 shards, identity
names as the classes, resumable), whose meta.json records the preprocessing (`source.face`) so that embedding new
images later cuts faces the same way. Nothing is dropped silently: an image with no face or several faces of about
the same size is kept as a centre square (or dropped with `no_face="skip"`), an unreadable file is skipped, and both
are listed with their reason in STORE/prepare_report.json.

Images are processed in a thread pool over the cores: OpenCV's detector, warp and resize and Pillow's decoder
release the GIL, so threads keep every core busy without pickling pixels between processes.
"""
from __future__ import annotations

import json
import threading
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from danlu.data.decode import BadImage, default_workers
from danlu.io import write_bytes
from danlu.errors import DanluError
from danlu.face.detect import EQUALIZE, SIDE_LIGHT, FaceOptions, preprocess

NO_FACE = ("center", "skip")


def _decoder(opts: FaceOptions, no_face: str, workers: int):
    """StorePlan.decode for face crops: (items, progress) -> (images, {i: reason} dropped, notes of kept images)."""

    def decode(items, progress) -> tuple[np.ndarray, dict[int, str], list[dict[str, Any]]]:
        out = np.zeros((len(items), opts.channels, opts.size, opts.size), np.uint8)
        bad: dict[int, str] = {}
        notes: list[tuple[int, dict[str, Any]]] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            try:
                out[i], info = preprocess(items[i].path, opts)
            except BadImage as e:
                with lock:
                    bad[i] = str(e)
            else:
                if info["reason"] is not None:
                    with lock:
                        if no_face == "skip":
                            bad[i] = f"{info['reason']} (dropped: --no-face skip)"
                        else:
                            notes.append((i, {"file": items[i].where, "reason": info["reason"],
                                              "kept": "centre square"}))
            with lock:
                progress(1)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(items))))
        return out, bad, [n for _, n in sorted(notes, key=lambda t: t[0])]

    return decode


def prepare_faces(raw_dir: Union[str, Path], out: Union[str, Path], *, size: int = 160, channels: int = 3,
                  align: bool = False, equalize: str = "auto", margin: float = 0.2, detector: str = "haar",
                  crop: str = "auto", no_face: str = "center", shard_mb: float = 256, workers: Optional[int] = None,
                  quiet: bool = False, chip: str = "box", options: Optional[FaceOptions] = None) -> dict[str, Any]:
    """Detect, crop and equalize every image of RAW_DIR/IDENTITY/ into a store at `out`; writes
    `out/prepare_report.json`. Returns the store's meta with `report` (the report's path). `crop`: face (the
    detected face), full (every image's centre square: already-cropped faces) or auto (full where the detector finds
    one clear face in fewer than half of a sample of the set's images; the choice is recorded). `equalize`: one of
    detect.EQUALIZE, or auto (tantriggs where a sample's photos are lit unevenly from the side, else none:
    detect.equalize_policy; recorded). `chip`: box (the face box grown by `margin`) or dlib (dlib's aligned chip).
    `options`: cut as these say (a run's preprocessing, `--for RUN`): the cut arguments above are then not used,
    but for `crop` and `equalize` given as other than auto (they describe the photos: tight crops, their light)."""
    from danlu.data.folder import scan_folder
    from danlu.data.store import StorePlan, write_store
    from danlu.face.detect import crop_policy, equalize_policy

    if no_face not in NO_FACE:
        raise DanluError(f"--no-face {no_face}: expected one of {', '.join(NO_FACE)}")
    if crop not in ("auto", "face", "full"):
        raise DanluError(f"--crop {crop}: expected auto, face or full")
    if equalize != "auto" and equalize not in EQUALIZE:
        raise DanluError(f"--equalize {equalize}: expected auto or one of {', '.join(EQUALIZE)}")
    files = scan_folder(raw_dir, key="RAW_DIR")
    every = [it.path for split in (files.train, files.test or []) for it in split]
    found_share = side = None
    if options is not None:  # a run's own cut; the photos' crop and light where asked for
        crop = options.crop if crop == "auto" else crop
        equalize = options.equalize if equalize == "auto" else equalize
        options = replace(options, crop=crop, equalize=equalize)
        size, channels = options.size, options.channels
    if equalize == "auto":
        equalize, side = equalize_policy(every)
        if not quiet:
            print(f"face prepare: side light {side:.2f} in the median image of a sample (Tan-Triggs from "
                  f"{SIDE_LIGHT}): equalize {equalize}")
    if crop == "auto":
        crop, found_share = crop_policy(every, str(detector))
        if not quiet:
            print(f"face prepare: one clear face in {found_share:.0%} of a sample of the images: crop {crop}"
                  f"{' (already-cropped faces: every image cut as its centre square)' if crop == 'full' else ''}")
    opts = options or FaceOptions(size=size, channels=channels, align=align, equalize=equalize, margin=margin,
                                  detector=str(detector), crop=crop, chip=chip)
    splits = {"train": files.train, **({"test": files.test} if files.test is not None else {})}
    source = {"kind": "face", **files.source, "face": opts.to_dict(), "no_face": no_face}
    plan = StorePlan(files.classes, splits, source, (channels, size, size), list(files.skipped),
                     decode=_decoder(opts, no_face, workers or default_workers()))
    meta = write_store(plan, out, shard_mb=shard_mb, workers=workers, quiet=quiet)
    total = sum(len(s) for s in splits.values())
    notes, skipped = meta.get("notes", []), meta.get("skipped", [])
    report = {"raw_dir": files.source.get("root"), "store": str(Path(out).resolve()), "options": opts.to_dict(),
              "crop_auto_found_share": found_share, "equalize_auto_side_light": side,
              "no_face": no_face, "identities": len(files.classes), "images": total,
              "kept": sum(sp["count"] for sp in meta["splits"].values()),
              "face_found": total - len(notes) - len(skipped) if crop == "face" else None, "centre_squares": len(notes),
              "skipped_count": len(skipped), "centre_square_images": notes, "skipped": skipped}
    path = Path(out) / "prepare_report.json"
    write_bytes(path, (json.dumps(report, indent=1) + "\n").encode())
    if not quiet and crop == "full":
        print(f"face prepare: {report['kept']} of {total} images cut as centre squares (crop full); "
              f"{len(skipped)} skipped (each listed with its reason in {path})")
    elif not quiet:
        print(f"face prepare: {report['face_found']} of {total} images with one face; {len(notes)} kept as a centre "
              f"square, {len(skipped)} skipped (each listed with its reason in {path})")
    return {**meta, "report": str(path)}
