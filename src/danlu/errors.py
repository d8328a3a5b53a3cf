"""The one error type for bad user input: the CLI prints its message on one line and exits with code 2."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class DanluError(ValueError):
    """Bad input from the user (a recipe key, a file, a value). The message names the place, the bad value and
    what was expected; the CLI shows it without a traceback and exits with code 2."""

    def __init__(self, message: object = ""):
        text = str(message)
        if "\n" in text or "\r" in text:  # one line, always: a value the user typed may hold a line break
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(text)


class Stopped(Exception):
    """A signal (SIGTERM, SIGINT) asked a run to stop and its snapshot is written. The CLI prints the message (which
    says how to resume) and exits with `exit_code`, 128 + the signal number (143, 130)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def nearest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'lr'?)' for a typo, '' when nothing is close. Example: nearest('lrr', ['lr', 'momentum'])."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def few(items: Iterable[str], n: int = 4) -> str:
    """The first `n` items and how many more: few(['a', 'b', 'c'], 2) -> 'a, b (+1 more)'. Keeps messages one line."""
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def require(module: str, extra: str, what: str):
    """`module` imported, or a DanluError naming the pip command of danlu's extra that brings it: what using a feature
    whose extra is not installed says (one line, exit 2). Example: require("fastapi", "serve", "danlu serve")."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DanluError(f"{what} needs the {module.split('.')[0]} package, which is not installed: "
                         f"pip install 'danlu[{extra}]'") from None
