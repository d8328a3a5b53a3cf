"""The one error type for bad user input: the CLI prints its message on one line and exits with code 2."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class DanluError(ValueError):
    """Bad input from the user (a recipe key, a file, a value). The message names the place, the bad value and
    what was expected; the CLI shows it without a traceback and exits with code 2."""


def nearest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'lr'?)' for a typo, '' when nothing is close. Example: nearest('lrr', ['lr', 'momentum'])."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
