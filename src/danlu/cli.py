"""danlu's command line: a thin client of `danlu.api`. Bad input: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Optional

from danlu import __version__
from danlu.errors import DanluError, Stopped

EPILOG = """examples:
  danlu train                                   the default recipe (LeNet on 5,000 MNIST digits)
  danlu train recipes/minigooglenet_cifar10.yaml --set optim.lr=0.01 --set run.epochs=5
  danlu train --resume runs/lenet_mnist5k-20261125-101500
  danlu eval runs/lenet_mnist5k-20261125-101500
  danlu train --solver recipes/lenet_solver.prototxt --device cpu     a Caffe solver file
  danlu predict runs/lenet_mnist5k-20261125-101500 digit.png --top 3
  danlu export runs/lenet_mnist5k-20261125-101500 --format onnx -o lenet.onnx
  danlu compare runs/a runs/b -o compare.png
  danlu serve runs/lenet_mnist5k-20261125-101500 --port 8000     a web page and an HTTP API
  danlu recipes"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danlu", description="Train image classifiers as fast as your hardware allows.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"danlu {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train from a recipe (a shipped name or a YAML file)")
    t.add_argument("recipe", nargs="?", help="recipe name (see `danlu recipes`), YAML file or Caffe solver.prototxt; "
                   "default lenet_mnist5k")
    t.add_argument("--solver", metavar="FILE", help="a Caffe solver.prototxt (instead of a recipe)")
    t.add_argument("-gpu", "--gpu", dest="gpu", metavar="IDS", help="as Caffe's CLI: a GPU index (this process), "
                   "or 0,1 / all (one process per GPU, as --gpus)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set optim.lr=0.05 (repeatable)")
    t.add_argument("--until", metavar="METRIC=VALUE", help="stop at the first evaluation where the test metric reaches "
                   "VALUE, e.g. acc=0.99 (run.target; summary.json records seconds_to_target)")
    t.add_argument("--out", help="run folder (default runs/<recipe>-<date>-<time>)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest snapshot")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.add_argument("--procs", type=int, metavar="N", help="train with N processes on the CPU (gloo), launched by "
                   "torch's elastic launcher; data.batch_size is per process")
    t.add_argument("--gpus", metavar="all|N|0,2", help="train with one process per GPU (NCCL): all of them, the "
                   "first N, or these indices")
    t.add_argument("--max-restarts", type=int, default=0, metavar="N", help="with --procs/--gpus: restart all "
                   "processes up to N times after a failure, each time from the newest snapshot")
    t.add_argument("--force", action="store_true",
                   help="--out holds another run: move it aside to <out>.old-<time> instead of refusing")

    e = sub.add_parser("eval", help="evaluate a run's weights on its test set (or on --data)")
    e.add_argument("run", help="run folder")
    e.add_argument("--data", help="dataset name to evaluate on instead of the run's own")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    pr = sub.add_parser("predict", help="classify image files (or folders of them) with a run's final weights")
    pr.add_argument("run", help="run folder")
    pr.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files and/or folders (searched recursively)")
    pr.add_argument("--top", type=int, default=5, help="how many classes to show per image (default 5)")
    fmt = pr.add_mutually_exclusive_group()
    fmt.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT ('-': standard output)")
    fmt.add_argument("--csv", metavar="OUT", help="also write the results as CSV to OUT ('-': standard output)")
    pr.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    pr.add_argument("--batch", type=int, help="images per batch (default: the run's test batch)")

    x = sub.add_parser("export", help="export a run as ONNX, TorchScript or safetensors (checked after writing)")
    x.add_argument("run", help="run folder")
    x.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    x.add_argument("-o", "--out", required=True, metavar="FILE", help="the file to write")
    x.add_argument("--force", action="store_true", help="replace FILE if it exists")

    c = sub.add_parser("compare", help="compare runs: one table and their curves overlaid in one picture")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    c.add_argument("-o", "--out", metavar="PNG", help="the picture (default compare.png; '-' for none)",
                   default="compare.png")

    d = sub.add_parser("data", help="the dataset catalog: `data list` (known and cached), `data get NAME` (download),"
                       " `data inspect PATH` (tar shards), `data sample NAME -o FILE.png` (one image)")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dsub.add_parser("list", help="known datasets, what is cached and where ($DANLU_DATA)")
    dsub.add_parser("get", help="download and verify a dataset ahead of time").add_argument("name")
    di = dsub.add_parser("inspect", help="WebDataset shards: counts, classes, shard sizes and a contact sheet (PNG)")
    di.add_argument("path", metavar="PATH", help="a folder of .tar shards, a brace pattern or a URL (as data.root)")
    di.add_argument("-o", "--out", metavar="PNG", help="the contact sheet (default: inspect.png beside the data: in "
                    "the shard folder, beside a .tar; for a URL, in the current folder; '-' for none)")
    di.add_argument("--samples", type=int, default=16, metavar="N", help="images on the contact sheet (default 16)")
    di.add_argument("--label-key", default="cls", metavar="KEY", help="the label's file: cls (default), txt, or "
                    "json:FIELD (as data.label_key)")
    di.add_argument("--write-index", action="store_true", help="save the counts as PATH/index.json (a local folder "
                    "without one), so training need not scan the shards")
    di.add_argument("--json", action="store_true", help="print the result as JSON")
    ds = dsub.add_parser("sample", help="one image of a named set as a PNG, with its label (e.g. for danlu predict)")
    ds.add_argument("name", metavar="NAME", help="a named set: mnist5k, synthetic, mnist, ... (danlu data list)")
    ds.add_argument("-o", "--out", required=True, metavar="FILE.png", help="the PNG to write")
    ds.add_argument("--index", type=int, default=0, metavar="I", help="which image of the split (default 0)")
    ds.add_argument("--split", choices=["test", "train"], default="test",
                    help="test (default: images a run of this set never trained on) or train")

    pp = sub.add_parser("prepare", help="a folder (or a named set) once into a memory-mapped store, or into "
                        "WebDataset tar shards (--format wds)")
    pp.add_argument("src", metavar="SRC", help="a folder of class subfolders (or train/ and val/), or a named set")
    pp.add_argument("-o", "--out", required=True, metavar="OUT", help="the store (or shards) folder to write")
    pp.add_argument("--format", choices=["store", "wds"], default="store", help="store: decoded uint8 shards, "
                    "memory-mapped (default); wds: WebDataset .tar shards of JPEGs with .cls labels and index.json")
    pp.add_argument("--size", type=int, nargs="+", metavar="N", help="image size: N, or H W (default 224 for folders,"
                    " the native size for named sets); --format wds: the largest shorter side (default: as is)")
    pp.add_argument("--channels", type=int, choices=[1, 3], help="3 (RGB, default) or 1 (grayscale)")
    pp.add_argument("--resize", choices=["crop", "exact"], default="crop",
                    help="crop: shorter side + centre crop (default); exact: stretch")
    pp.add_argument("--quality", type=int, default=90, metavar="Q", help="--format wds: JPEG quality (default 90)")
    pp.add_argument("--keep-original", action="store_true", help="--format wds: the files' own bytes (JPEG, PNG, "
                    "WebP; other formats as PNG), not re-encoded")
    pp.add_argument("--shard-mb", type=float, metavar="MB", help="shard size in MiB (default 256; 64 for --format "
                    "wds)")
    pp.add_argument("--train-list", metavar="FILE", help="SRC is the root of the paths in this list file")
    pp.add_argument("--val-list", metavar="FILE", help="with --train-list: the test split's list")
    pp.add_argument("--quiet", action="store_true", help="no progress output")

    b = sub.add_parser("bench", help="measure training speed: precision x compile x processes, against a plain loop")
    b.add_argument("--model", default="tv:resnet50", help="model name (default tv:resnet50, ImageNet stem)")
    b.add_argument("--size", type=int, default=224, help="image size in pixels (default 224)")
    b.add_argument("--batch", type=int, default=256, help="batch per process (default 256)")
    b.add_argument("--precision", default="fp32,bf16,fp16", help="comma list of fp32, tf32, fp16, bf16, fp64 "
                   "(default fp32,bf16,fp16)")
    b.add_argument("--compile", default="off,on", help="comma list of off, on, max-autotune (default off,on)")
    b.add_argument("--cuda-graphs", default="off", help="comma list of off, on (CUDA only; default off)")
    b.add_argument("--procs", default="1", help="comma list of process counts (default 1)")
    b.add_argument("--steps", type=int, default=50, help="timed steps per combination (default 50)")
    b.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    b.add_argument("--channels", type=int, choices=[1, 3], help="image channels (default 1 for lenet, else 3)")
    b.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    b.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    b.add_argument("--loader", default="device", choices=["device", "stream"],
                   help="device: the set on the device (default); stream: host memory, copied in the background")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    b.add_argument("--json", metavar="OUT", help="write {env, rows} as JSON to OUT")
    b.add_argument("--plot", metavar="OUT.png", help="write a bar chart of images/s to OUT.png")

    sv = sub.add_parser("serve", help="serve a run over HTTP: a web page and a JSON API (classify; faces for a face "
                        "run), micro-batched on the device")
    sv.add_argument("run", help="run folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                    "0.0.0.0: every interface, with no authentication)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    sv.add_argument("--gallery", metavar="G.sqlite", help="face runs: the gallery that /v1/faces/identify searches")
    sv.add_argument("--max-batch", type=int, default=64, metavar="N",
                    help="images per forward pass across concurrent requests (default 64; 1: no batching)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                    help="how long a request waits for others to share its batch (default 5)")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                    help="largest request body in MiB (default 10)")
    sv.add_argument("--max-pixels", type=int, default=40_000_000, metavar="N",
                    help="largest image in pixels, width x height, checked before decoding (default 40000000)")
    sv.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    sv.add_argument("--access-log", action="store_true", help="log every request")

    _face_parser(sub)
    sub.add_parser("recipes", help="list the shipped recipes")
    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("--all", action="store_true", help="include torchvision's models (tv:<name>)")
    return p


def _cmd_train(a: argparse.Namespace) -> int:
    if a.until is not None:
        from danlu.config import TARGET_METRICS
        from danlu.errors import nearest

        metric, sep, value = (t.strip() for t in a.until.partition("="))
        if not sep or not metric or not value:
            raise DanluError(f"--until {a.until}: expected METRIC=VALUE, e.g. --until acc=0.99")
        if metric not in TARGET_METRICS:
            raise DanluError(f"--until {a.until}: unknown metric '{metric}'; expected one of "
                             f"{', '.join(TARGET_METRICS)}{nearest(metric, TARGET_METRICS)}")
        try:
            float(value)
        except ValueError:
            raise DanluError(f"--until {a.until}: '{value}' is not a number; expected e.g. --until acc=0.99") from None
        a.overrides += [f"run.target.metric={metric}", f"run.target.value={value}"]
    if a.resume and (a.recipe or a.solver or a.out):
        raise DanluError("--resume DIR continues the run in DIR with its own recipe; drop the recipe and --out")
    if a.solver:
        from danlu.config import SOLVER_SUFFIXES

        if a.recipe:
            raise DanluError(f"--solver {a.solver} and recipe {a.recipe}: expected one of them")
        if not a.solver.endswith(SOLVER_SUFFIXES):
            raise DanluError(f"--solver {a.solver}: expected a Caffe solver file ending in "
                             f"{' or '.join(SOLVER_SUFFIXES)}")
        a.recipe = a.solver
    if a.gpu is not None:  # Caffe's -gpu: an index (this process), or all / a list (--gpus)
        from danlu.caffe import gpu_flag

        if a.device or a.gpus or a.procs:
            taken = "--device" if a.device else "--gpus" if a.gpus else "--procs"
            raise DanluError(f"-gpu {a.gpu} and {taken}: expected one of them")
        a.device, a.gpus = gpu_flag(a.gpu)
    from danlu.launch import train_command  # alone, as one rank of torchrun / SLURM, or launching --procs/--gpus

    return train_command(a.recipe, overrides=a.overrides, out=a.out, resume=a.resume, device=a.device,
                         quiet=a.quiet, force=a.force, procs=a.procs, gpus=a.gpus, max_restarts=a.max_restarts)


def _cmd_eval(a: argparse.Namespace) -> int:
    from danlu.api import evaluate

    r = evaluate(a.run, data=a.data, overrides=a.overrides, device=a.device, write_report=True)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(_eval_line(r))
    if r.get("worst"):
        from danlu.report import worst_lines

        print(f"worst classes (of {len(r['per_class'])}):")
        print("\n".join(worst_lines(r)))
    if r.get("report_files"):
        print(f"per-class accuracy and confusion matrix: {', '.join(r['report_files'])}")
    return 0


def _eval_line(r: dict) -> str:
    """One line of `danlu eval`: classification figures, or a face run's verification on held-out identities."""
    where = f"{r['run_dir']} on {r['data']} ({r['samples']} images)"
    if "verification_acc" in r:
        from danlu.tasks.verification import describe_tar

        return (f"{where}: verification accuracy {r['verification_acc']:.4f} +- {r['verification_std']:.4f} on "
                f"{r['pairs']} pairs of held-out identities, threshold {r['threshold']:.4f}; {describe_tar(r)}")
    top5 = f", top-5 {r['top5']:.4f}" if r.get("top5") is not None else ""
    return f"{where}: accuracy {r['acc']:.4f}{top5}, loss {r['loss']:.4f}"


def _cmd_predict(a: argparse.Namespace) -> int:
    from danlu.predict import format_lines, predict, write_csv, write_json

    if a.batch is not None and a.batch < 1:
        raise DanluError(f"--batch {a.batch}: expected at least 1")
    r = predict(a.run, a.images, top=a.top, device=a.device, batch_size=a.batch)
    to_stdout = "-" in (a.json, a.csv)
    if not to_stdout:
        print("\n".join(format_lines(r)))
    for f, e in r.errors:
        print(f"danlu: warning: {f}: {e}", file=sys.stderr)
    for note in r.notes:  # on stderr, as the warnings: standard output stays one line per image
        print(f"danlu: note: {note}", file=sys.stderr)
    if a.json:
        write_json(r, a.json)
    if a.csv:
        write_csv(r, a.csv, top=a.top)
    return 1 if r.errors else 0


def _cmd_export(a: argparse.Namespace) -> int:
    from danlu.export import export

    print(export(a.run, a.format, a.out, force=a.force).message)
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from danlu.compare import compare

    r = compare(a.runs, None if a.out == "-" else a.out)
    print(r.table)
    if r.picture:
        print(f"curves: {r.picture}")
    return 0


def _cmd_data(a: argparse.Namespace) -> int:
    from danlu.data.catalog import catalog_status, data_home, fetch

    if a.data_command == "inspect":
        return _cmd_inspect(a)
    if a.data_command == "sample":
        from danlu.api import sample

        r = sample(a.name, a.out, index=a.index, split=a.split)
        print(f"{r['file']}: {r['name']} {r['split']} image {r['index']} of {r['images']} "
              f"({'x'.join(map(str, r['shape']))}), label {r['label']}, class {r['class']}")
        return 0
    if a.data_command == "get":
        print(f"{a.name}: ready in {fetch(a.name)}")
        return 0
    print(f"datasets (cache folder {data_home()}; set DANLU_DATA to move it):")
    for r in catalog_status():
        what = (f"{r['train']:>6} / {r['test']:<6} {r['shape']:<8} {r['classes']:>3} classes, {r['download_mb']:>6} MiB"
                if "train" in r else f"{'':<44}")
        print(f"  {r['name']:<14} {what}  {r['state']:<34} {r['about']}")
    print("  folder, list, store  your own images: data.root (docs/guide/data.md)")
    print("  wds                  WebDataset tar shards, from a folder or a URL: data.root (docs/guide/data.md)")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from danlu.data.wds.prepare import inspect_shards

    if a.samples < 0:
        raise DanluError(f"--samples {a.samples}: expected 0 or more")
    r = inspect_shards(a.path, out_png={None: "auto", "-": None}.get(a.out, a.out), samples=a.samples,
                       label_key=a.label_key, write_index=a.write_index)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['root']}: counts from {r['counts_from']}; {len(r['classes'])} classes: "
          f"{', '.join(r['classes'][:10])}{' ...' if len(r['classes']) > 10 else ''}")
    for split, sp in r["splits"].items():
        size = (f", {sp['shard_mb'][0]} / {sp['shard_mb'][1]} / {sp['shard_mb'][2]} MiB a shard (min / median / max)"
                if sp["shard_mb"] else "")
        per = sp["samples_per_shard"]
        print(f"  {split}: {sp['samples']} samples in {sp['shards']} shard(s), {per[0]} / {per[1]} / {per[2]} "
              f"samples a shard{size}")
        if sp.get("per_class"):
            print("    per class: " + ", ".join(f"{c} {n}" for c, n in list(sp["per_class"].items())[:10])
                  + (" ..." if len(sp["per_class"]) > 10 else ""))
    if r["skipped_count"]:
        first = r["skipped"][0]
        print(f"  skipped {r['skipped_count']} sample(s) (first: {first['shard']} {first.get('key', '')}: "
              f"{first['reason']})")
    if r.get("index"):
        print(f"  index: {r['index']}")
    if r.get("contact_sheet"):
        print(f"  contact sheet: {r['contact_sheet']}")
    return 0


def _cmd_prepare(a: argparse.Namespace) -> int:
    if a.size is not None and len(a.size) > 2:
        raise DanluError(f"--size {' '.join(map(str, a.size))}: expected N or H W")
    size = None if a.size is None else (a.size[0] if len(a.size) == 1 else tuple(a.size))
    if a.shard_mb is not None and a.shard_mb <= 0:  # `a.shard_mb or default` below would take 0 as the default
        raise DanluError(f"--shard-mb {a.shard_mb}: expected a positive size in MiB")
    if a.size is not None and min(a.size) < 1:
        raise DanluError(f"--size {' '.join(map(str, a.size))}: expected positive sizes in pixels")
    if a.format == "wds":
        from danlu.data.wds.prepare import prepare_shards

        if not 1 <= a.quality <= 100:
            raise DanluError(f"--quality {a.quality}: expected 1..100 (JPEG quality)")
        if size is not None and not isinstance(size, int):
            raise DanluError(f"--size {' '.join(map(str, a.size))}: --format wds takes one number, the largest "
                             f"shorter side (the reader crops to data.size)")
        if a.resize != "crop":
            raise DanluError(f"--resize {a.resize}: --format wds keeps the aspect ratio (data.resize applies when "
                             f"training); expected no --resize")
        prepare_shards(a.src, a.out, size=size, quality=a.quality, keep_original=a.keep_original,
                       shard_mb=a.shard_mb or 64, channels=a.channels or 3, train_list=a.train_list,
                       val_list=a.val_list, quiet=a.quiet)
        return 0
    from danlu.data.datasets import prepare

    if a.quality != 90 or a.keep_original:
        raise DanluError(f"{'--keep-original' if a.keep_original else f'--quality {a.quality}'}: only for --format "
                         f"wds; expected --format wds (a store holds decoded pixels)")
    prepare(a.src, a.out, size=size, channels=a.channels, resize=a.resize, shard_mb=a.shard_mb or 256,
            train_list=a.train_list, val_list=a.val_list, quiet=a.quiet)
    return 0


def _face_parser(sub) -> None:  # noqa: ANN001 (argparse's private subparsers type)
    f = sub.add_parser("face", help="faces: prepare a store of face crops, pairs, embed, verify, enroll, identify")
    fs = f.add_subparsers(dest="face_command", metavar="ACTION", required=True)
    fp = fs.add_parser("prepare", help="detect, align, equalize and crop the faces of RAW_DIR/IDENTITY/ into a store")
    fp.add_argument("raw", metavar="RAW_DIR", help="one subfolder of images per identity")
    fp.add_argument("-o", "--out", required=True, metavar="STORE", help="the store folder to write")
    fp.add_argument("--size", type=int, default=160, help="face crop side in pixels (default 160)")
    fp.add_argument("--channels", type=int, choices=[1, 3], default=3, help="3 (RGB, default) or 1 (gray)")
    fp.add_argument("--align", action="store_true", help="rotate so the eye line is level")
    fp.add_argument("--equalize", choices=["auto", "tantriggs", "hist", "clahe", "none"], default="auto",
                    help="lighting normalization: auto (default: tantriggs where a sample of the photos is lit "
                         "unevenly from the side, else none), tantriggs (Tan & Triggs), hist (histogram "
                         "equalization), clahe or none")
    fp.add_argument("--margin", type=float, default=0.2, help="crop = face box grown by this share (default 0.2)")
    fp.add_argument("--detector", default="haar", help="haar (OpenCV's bundled cascade, default), mmod (dlib's CNN "
                    "detector: danlu[face-pretrained]) or a YuNet .onnx")
    fp.add_argument("--crop", choices=["auto", "face", "full"], default="auto",
                    help="face: the detected face; full: every image's centre square (already-cropped faces); auto "
                    "(default): full where the detector finds a clear face in fewer than half of the images")
    fp.add_argument("--no-face", choices=["center", "skip"], default="center",
                    help="an image with no face (or several of one size): keep a centre square (default) or skip it;"
                    " either way it is listed in STORE/prepare_report.json")
    fp.add_argument("--shard-mb", type=float, default=256, metavar="MB", help="shard size in MiB (default 256)")
    fp.add_argument("--workers", type=int, help="threads (default: every core)")
    fp.add_argument("--quiet", action="store_true", help="no progress output")
    fp.add_argument("--chip", choices=["box", "dlib"], default="box",
                    help="box: the face box grown by --margin (default); dlib: dlib's aligned chip from its 5 landmarks "
                    "(--margin is then dlib's padding, 0.25 in dlib's pipeline; needs danlu[face-pretrained])")
    fp.add_argument("--for", dest="for_run", metavar="RUN",
                    help="cut the faces as face run RUN does (its face.json): the crops its model expects, e.g. an "
                    "imported network's; the cut options above are then the run's, but for --crop and --equalize, "
                    "which may still be given for these photos")
    fi = fs.add_parser("import", help="a face network trained elsewhere as a run folder: every face verb and serve "
                       "accept it, a recipe fine-tunes it (model.init=RUN)")
    fi.add_argument("network", choices=["dlib"], help="dlib: dlib's public-domain ResNet (danlu[face-pretrained])")
    fi.add_argument("-o", "--out", required=True, metavar="RUN", help="the run folder to write")
    fi.add_argument("--force", action="store_true", help="move a run already in RUN aside (never overwritten)")
    fpp = fs.add_parser("pairs", help="a balanced, seeded pairs file in LFW's format from an identity folder")
    fpp.add_argument("dir", metavar="DIR", help="one subfolder of images per identity")
    fpp.add_argument("-o", "--out", required=True, metavar="PAIRS.txt")
    fpp.add_argument("--n", type=int, default=300, help="same and different pairs per fold (default 300, LFW's)")
    fpp.add_argument("--folds", type=int, default=10, help="folds (default 10)")
    fpp.add_argument("--seed", type=int, default=0)
    fe = fs.add_parser("embed", help="embeddings of images (each face cut as prepare does)")
    fe.add_argument("run", metavar="RUN", help="a face run folder")
    fe.add_argument("images", nargs="+", metavar="IMAGE")
    fe.add_argument("--json", action="store_true", help="print JSON (default: one line per image)")
    fv = fs.add_parser("verify", help="LFW's 10-fold verification protocol on a pairs file, ROC, TAR at FAR")
    fv.add_argument("run", metavar="RUN", help="a face run folder")
    fv.add_argument("--pairs", required=True, metavar="PAIRS.txt", help="LFW's format (`danlu face pairs` makes one)")
    fv.add_argument("--root", metavar="DIR", help="the identity folders the pairs name (default: the pairs' folder)")
    fv.add_argument("--json", metavar="OUT", help="the report (default RUN/verify.json)")
    fv.add_argument("--roc", metavar="OUT.png", help="the ROC curve (default beside the report, *_roc.png)")
    fv.add_argument("--keep-threshold", action="store_true",
                    help="leave the run's threshold as it is (default: the threshold best on these pairs becomes it)")
    for name, what in (("enroll", "add DIR/IDENTITY/ images to a gallery (again: updated, not duplicated)"),
                       ("identify", "who is in an image: the gallery's closest identities, or unknown")):
        g = fs.add_parser(name, help=what)
        g.add_argument("run", metavar="RUN", help="a face run folder")
        g.add_argument("target", metavar="DIR" if name == "enroll" else "IMAGE", nargs=1 if name == "enroll" else "+")
        g.add_argument("--gallery", required=True, metavar="G.sqlite")
        if name == "identify":
            g.add_argument("--top", type=int, default=5, help="identities listed per image (default 5)")
            g.add_argument("--threshold", type=float, help="similarity below which the answer is unknown (default: "
                           "the run's verification threshold)")
            g.add_argument("--json", action="store_true", help="print JSON")
        g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    for q in (fe, fv):
        q.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")


def _cmd_face(a: argparse.Namespace) -> int:
    from pathlib import Path

    from danlu.face import api as face
    from danlu.face.prepare import prepare_faces

    c = a.face_command
    if c == "prepare":
        options = face.run_options(a.for_run, _cut_flags(a)) if a.for_run else None
        prepare_faces(a.raw, a.out, size=a.size, channels=a.channels, align=a.align, equalize=a.equalize,
                      margin=a.margin, detector=a.detector, crop=a.crop, no_face=a.no_face, shard_mb=a.shard_mb,
                      workers=a.workers, quiet=a.quiet, chip=a.chip, options=options)
    elif c == "import":
        from danlu.face.imports import import_face_network

        r = import_face_network(a.network, a.out, force=a.force)
        p = r["preprocess"]
        print(f"face import: {a.network}'s network in {r['run_dir']} (from {r['source']}); faces cut as {p['chip']} "
              f"chips of {p['size']} px, threshold {r['threshold']:.4f}; try `danlu face verify {r['run_dir']} "
              f"--pairs PAIRS.txt --root DIR`")
    elif c == "pairs":
        r = face.pairs(a.dir, a.out, n=a.n, folds=a.folds, seed=a.seed)
        short = f" (fewer than --n {a.n}: the folder holds {r['possible_same_pairs']} same pairs)" \
            if r["per_fold"] < a.n else ""
        print(f"pairs: {r['pairs_file']}: {r['folds']} folds x ({r['per_fold']} same + {r['per_fold']} different) "
              f"pairs of {r['identities']} identities{short}")
    elif c == "embed":
        rows = face.embed(a.run, a.images, device=a.device)
        if a.json:
            print(json.dumps(rows))
        for r in [] if a.json else rows:
            note = f" [{r['face']['reason']}: centre square]" if r["face"]["reason"] else ""
            print(f"{r['image']}: {len(r['embedding'])}-d [{', '.join(f'{v:.4f}' for v in r['embedding'][:4])}, ...]"
                  f"{note}")
    elif c == "verify":
        r = face.verify(a.run, a.pairs, a.root or Path(a.pairs).parent, json_out=a.json, roc_png=a.roc,
                        device=a.device, save_threshold=not a.keep_threshold)
        from danlu.tasks.verification import describe_tar

        print(f"verification: accuracy {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} over "
              f"{len(r['fold_accuracies'])} folds ({r['pairs']} pairs); {describe_tar(r)}; {_threshold_words(r)}; "
              f"report {r['json']}, ROC {r['roc_png']}")
    elif c == "enroll":
        r = face.enroll(a.run, a.target[0], a.gallery, device=a.device)
        print(f"enroll: {r['images']} images of {r['identities']} identities: {r['added']} added, {r['updated']} "
              f"updated, {len(r['skipped'])} unreadable skipped" + "".join(f"\n  skipped {s['file']}: {s['reason']}"
                                                                           for s in r["skipped"])
              + f"; {a.gallery} holds {r['gallery_identities']} identities")
    else:
        rows = face.identify(a.run, a.target, a.gallery, top=a.top, threshold=a.threshold, device=a.device)
        if a.json:
            print(json.dumps(rows))
        for r in [] if a.json else rows:
            top = ", ".join(f"{m['name']} {m['similarity']:.3f}" for m in r["matches"])
            print(f"{r['image']}: {r['identity']} (similarity {r['similarity']:.3f}, threshold {r['threshold']:.3f}); "
                  f"top: {top}")
    return 0


def _cut_flags(a: argparse.Namespace) -> list[str]:
    """The `face prepare` options of the model's cut given with other values than their defaults (refused beside
    --for RUN). --crop and --equalize describe the photos (already cropped faces, their light): they may be given."""
    defaults = {"size": 160, "channels": 3, "align": False, "margin": 0.2, "detector": "haar", "chip": "box"}
    return [f"--{k} {getattr(a, k)}" for k, v in defaults.items() if getattr(a, k) != v]


def _threshold_words(r: dict) -> str:
    """What `face verify` did to the run's threshold: replaced it (from what, and how to keep it), or left it."""
    new, old, where = r["threshold"], r.get("run_threshold_before"), r.get("run_threshold_before_from")
    was = "it had none" if old is None else f"was {old:.4f}" + (f" from {where}" if where else "")
    if not r.get("threshold_saved"):
        return f"threshold {new:.4f} on these pairs; the run's stays {'none' if old is None else f'{old:.4f}'}"
    return (f"threshold {new:.4f} on these pairs, now the run's in {r['face_json']} ({was}; --keep-threshold leaves "
            f"the run's as it is)")


def _cmd_recipes(a: argparse.Namespace) -> int:
    import shutil
    import textwrap

    import yaml

    from danlu.config import list_recipes

    width = min(120, shutil.get_terminal_size((100, 24)).columns)
    for name, path in list_recipes().items():
        text = path.read_text()
        d = (yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else None) or {}
        what = f"{d.get('model', {}).get('name', 'lenet')} on {d.get('data', {}).get('name', 'mnist5k')}"
        print(f"{name:<24} {what}")
        about = _first_sentence(text)
        if about:
            print(textwrap.fill(about, width, initial_indent="    ", subsequent_indent="    "))
    return 0


def _first_sentence(text: str) -> str:
    """The first sentence of a recipe's leading comment (its lines joined; the comment's indented example commands
    end it): 'MiniGoogLeNet on CIFAR-10 from Rosebrock's Keras multi-GPU article (the article: 0.9065 on one GPU)'."""
    import re

    words = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith("  ") or not body.strip():  # '#   danlu train ...': an example, not prose
            break
        words.append(body.strip())
    prose = " ".join(words)
    end = re.search(r"[.!?](?=\s+[A-Z(]|$)", prose)  # a full stop before a capital or at the end, not in '1.5'
    return prose[:end.end()] if end else prose.removesuffix(":")  # ':' introduced the example commands


def _cmd_bench(a: argparse.Namespace) -> int:
    from danlu import bench

    result = bench.run(model=a.model, size=a.size, batch=a.batch,
                       precisions=bench.parse_list(a.precision, bench.PRECISIONS, "--precision"),
                       compiles=bench.parse_list(a.compile, bench.COMPILE_WORDS, "--compile"),
                       cuda_graphs=bench.parse_list(a.cuda_graphs, bench.SWITCH_WORDS, "--cuda-graphs"),
                       procs=bench.parse_procs(a.procs), steps=a.steps, warmup=a.warmup,
                       device=a.device, channels=a.channels, classes=a.classes,
                       channels_last={"auto": "auto", "true": True, "false": False}[a.channels_last],
                       loader=a.loader, json_out=a.json, plot_out=a.plot)
    bench.print_bench_table(result)
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from danlu.serve import serve

    serve(a.run, host=a.host, port=a.port, gallery=a.gallery, device=a.device, max_batch=a.max_batch,
          max_wait_ms=a.max_wait_ms, max_upload_mb=a.max_upload_mb, max_pixels=a.max_pixels,
          access_log=a.access_log, say=lambda m: print(m, flush=True))
    import gc

    # stopped: the process only exits now. Its last collections would walk every object torch made once more
    # (0.5 s of a 0.7 s exit on 2 cores, measured); frozen, they skip them. Nothing is left to free.
    gc.freeze()
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from danlu.models import list_models

    print("\n".join(list_models(include_torchvision=a.all)))
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    return f"danlu: warning: {message}\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    warnings.formatwarning = _one_line_warning
    from danlu.engine.speed import reuse_freed_memory

    reuse_freed_memory()  # before the first big tensor: batches reuse freed memory instead of page-faulting it in
    commands = {"train": _cmd_train, "eval": _cmd_eval, "recipes": _cmd_recipes, "models": _cmd_models,
                "predict": _cmd_predict, "data": _cmd_data, "prepare": _cmd_prepare, "export": _cmd_export,
                "compare": _cmd_compare, "bench": _cmd_bench, "serve": _cmd_serve, "face": _cmd_face}
    try:
        return commands[args.command](args)
    except DanluError as e:
        print(f"danlu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("danlu: interrupted", file=sys.stderr)
        return 130
    except Stopped as e:  # SIGTERM / SIGINT: the snapshot is written; 143 / 130 and how to resume
        print(f"danlu: {e}", file=sys.stderr)
        return e.exit_code
