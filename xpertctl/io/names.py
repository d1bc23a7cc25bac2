"""Names taken from user text that become path components (recipe step ids, ...): they must name one
entry inside the output directory, never a path that escapes it."""
from __future__ import annotations

import re

from ..errors import XpertError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,-]*")


def check_name(value: str, what: str) -> str:
    """`value` if it is a safe single path component (letters, digits and _ . + = @ , -, not starting with
    '.' or '-', at most 200 characters); else a one-line error naming `what` (e.g. "step id")."""
    text = str(value)
    if not _NAME.fullmatch(text) or len(text) > 200:
        raise XpertError(f"{what} {text!r}: use letters, digits and _ . + = @ , - only (no '/', no leading '.' "
                         "or '-'): it becomes a file name")
    return text
