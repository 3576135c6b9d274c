"""Tables for people: columns as wide as their contents, lines cut to the terminal.

Fixed widths broke on a long agent id or label list; here each column is as wide as its
widest cell. On a terminal each line is cut with ``…`` to its width, so a table never
wraps into unreadable zigzags; into a pipe nothing is cut (``grep`` and ``awk`` see
every byte; scripts should use ``--json`` anyway).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from typing import TextIO

_GAP = "  "


def terminal_width(out: TextIO) -> int | None:
    """The width to cut lines to: the terminal's, or None when ``out`` is not one."""
    try:
        if not out.isatty():
            return None
    except (AttributeError, ValueError):  # a closed or fake stream
        return None
    return shutil.get_terminal_size().columns


def cut(line: str, width: int | None) -> str:
    """``line``, cut with ``…`` to ``width`` characters (None: whole)."""
    if width is None or len(line) <= width:
        return line
    return line[: max(width - 1, 0)] + "…"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None
) -> list[str]:
    """The header line and one line per row, left-aligned, cut to ``width``."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [headers, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append(cut(_GAP.join([*cells, row[-1]]).rstrip(), width))
    return lines


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None
) -> None:
    """Print :func:`format_table` to ``out`` (stdout), cut to its terminal if it is one."""
    stream = out or sys.stdout
    for line in format_table(headers, rows, terminal_width(stream)):
        print(line, file=stream)
