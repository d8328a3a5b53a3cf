"""danlu's command line: a thin client of `danlu.api`. Bad input: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Optional

from danlu.errors import DanluError

EPILOG = """examples:
  danlu train                                   the default recipe (LeNet on 5,000 MNIST digits)
  danlu train recipes/minigooglenet_cifar10.yaml --set optim.lr=0.01 --set run.epochs=5
  danlu train --resume runs/lenet_mnist5k-20261125-101500
  danlu eval runs/lenet_mnist5k-20261125-101500
  danlu recipes"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danlu", description="Train image classifiers as fast as your hardware allows.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"danlu {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train from a recipe (a shipped name or a YAML file)")
    t.add_argument("recipe", nargs="?", help="recipe name (see `danlu recipes`) or YAML file; default lenet_mnist5k")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set optim.lr=0.05 (repeatable)")
    t.add_argument("--out", help="run folder (default runs/<recipe>-<date>-<time>)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest snapshot")
    t.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    t.add_argument("--quiet", action="store_true", help="no progress output")

    e = sub.add_parser("eval", help="evaluate a run's weights on its test set (or on --data)")
    e.add_argument("run", help="run folder")
    e.add_argument("--data", help="dataset name to evaluate on instead of the run's own")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    sub.add_parser("recipes", help="list the shipped recipes")
    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("--all", action="store_true", help="include torchvision's models (tv:<name>)")
    return p


def _cmd_train(a: argparse.Namespace) -> int:
    from danlu.api import train

    if a.resume and (a.recipe or a.out):
        raise DanluError("--resume DIR continues the run in DIR with its own recipe; drop the recipe and --out")
    train(a.recipe, overrides=a.overrides, out=a.out, resume=a.resume, device=a.device, quiet=a.quiet)
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from danlu.api import evaluate

    r = evaluate(a.run, data=a.data, overrides=a.overrides, device=a.device)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        top5 = f", top-5 {r['top5']:.4f}" if r.get("top5") is not None else ""
        print(f"{r['run_dir']} on {r['data']} ({r['samples']} images): accuracy {r['acc']:.4f}{top5}, "
              f"loss {r['loss']:.4f}")
    return 0


def _cmd_recipes(a: argparse.Namespace) -> int:
    import yaml

    from danlu.config import list_recipes

    for name, path in list_recipes().items():
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        about = first.lstrip("# ").strip() if first.startswith("#") else ""
        d = yaml.safe_load(path.read_text()) or {}
        what = f"{d.get('model', {}).get('name', 'lenet')} on {d.get('data', {}).get('name', 'mnist5k')}"
        print(f"{name:<24} {what:<32} {about}")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from danlu.models import list_models

    print("\n".join(list_models(include_torchvision=a.all)))
    return 0


def _version() -> str:
    from danlu import __version__

    return __version__


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    return f"danlu: warning: {message}\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    warnings.formatwarning = _one_line_warning
    commands = {"train": _cmd_train, "eval": _cmd_eval, "recipes": _cmd_recipes, "models": _cmd_models}
    try:
        return commands[args.command](args)
    except DanluError as e:
        print(f"danlu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("danlu: interrupted", file=sys.stderr)
        return 130
