"""Names taken from user text (domains, recipe step ids) become file names inside an output
directory: they must be plain single path components that cannot escape it."""
from __future__ import annotations

import re

from ..errors import XpertError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,-]*")


def check_name(value: str, what: str) -> str:
    """`value` unchanged if it is a safe single path component (letters, digits and _ . + = @ , -, not
    starting with '.' or '-', at most 200 characters); else a one-line error naming `what` and the problem."""
    text = str(value)
    problem = ("is empty" if not text
               else "contains a path separator" if "/" in text or "\\" in text
               else "starts with '.'" if text.startswith(".")
               else "is longer than 200 characters" if len(text) > 200
               else None if _NAME.fullmatch(text)
               else "has a character other than letters, digits and _ . + = @ , - (or starts with '-')")
    if problem:
        raise XpertError(f"{what} {text!r}: {problem}; use a plain name: it becomes a file name")
    return text
