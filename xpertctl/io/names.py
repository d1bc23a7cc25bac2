"""Names taken from user text (domains, recipe step ids) become file names inside an output
directory: they must be plain names that cannot escape it."""
from __future__ import annotations

from ..errors import XpertError


def check_name(value: str, what: str) -> str:
    """`value` unchanged if it is a plain file-name part; else a one-line error naming `what`."""
    problem = ("is empty" if not value
               else "contains a path separator" if "/" in value or "\\" in value
               else "starts with '.'" if value.startswith(".")
               else "contains a control character" if any(ord(c) < 32 for c in value)
               else None)
    if problem:
        raise XpertError(f"{what} {value!r}: {problem}; use a plain name (letters, digits, -, _)")
    return value
