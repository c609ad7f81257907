"""Printing text that came from outside the program (checkpoints, file names, manifests, audio headers).

A checkpoint's ``tag``, a file name or a manifest line can hold terminal control sequences (ANSI
escapes that clear the screen, move the cursor or recolour text) or other invisible characters. Printed
raw, a crafted file could make the terminal show something the program never said, such as a fake
``ACCEPT``. ``printable`` shows such characters as Python escapes instead, and ``excerpt`` also keeps a
bad value short, so an error message never floods the terminal.
"""
from __future__ import annotations

import unicodedata

EXCERPT_CHARS = 80


def printable(text: object) -> str:
    """``text`` with every control or format character (ANSI ``ESC``, ``\\r``, bidi overrides, ...)
    written as an escape such as ``\\x1b``; ordinary letters of any script, newlines and tabs stay."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in "\n\t" or ch.isprintable():
            out.append(ch)
        elif unicodedata.category(ch) == "Zs":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable ``repr``-like view of a value for an error message."""
    text = printable(value if isinstance(value, str) else repr(value))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
