"""Changing keys of the agent's config file in place, keeping everything else.

``config-set`` persists what it changes here, so a restart keeps it. A small TOML line
editor: the line of each top-level key gets its new value (a key not in the file is
added before the first table), ``[labels]`` gets new entries, and every comment, blank
line and other key stays as written. The result is parsed back and compared with what
was meant; if the file's layout defeats the editor (a multi-line value, say) nothing is
written and the change is refused. The write is atomic: a temporary file in the same
directory, fsynced, renamed over the old one, and the directory fsynced.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from bus import UsageError


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_header(line: str) -> bool:
    return line.lstrip().startswith("[")


def _key_line(lines: list[str], key: str, start: int, end: int) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    return next((i for i in range(start, end) if pattern.match(lines[i])), None)


def _trailing_comment(line: str) -> str:
    """The ``  # …`` after a one-line ``key = value``, or ""."""
    for at in (i for i, c in enumerate(line) if c == "#"):
        try:
            tomllib.loads(line[:at])
        except tomllib.TOMLDecodeError:
            continue  # the # is inside the value (a string)
        return "  " + line[at:].strip() if line[:at].strip() else ""
    return ""


def edit_config_text(text: str, changes: dict[str, Any]) -> str:
    """``text`` with ``changes`` applied to its top-level keys.

    Raises:
        UsageError: ``text`` is not TOML, or the edit would not say what was meant.
    """
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"the config file is not valid TOML: {exc}") from None
    lines = text.splitlines()
    for key, value in changes.items():
        first_table = next((i for i, line in enumerate(lines) if _is_header(line)), len(lines))
        table = next((i for i, line in enumerate(lines) if line.strip() == f"[{key}]"), None)
        if isinstance(value, dict) and table is not None:
            end = next(
                (i for i in range(table + 1, len(lines)) if _is_header(lines[i])), len(lines)
            )
            old = lines[table + 1 : end]
            kept = [line for line in old if line.lstrip().startswith("#")]
            gap = len(old) - len(list(itertools.dropwhile(lambda x: not x.strip(), old[::-1])))
            entries = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()]
            lines[table + 1 : end] = kept + entries + [""] * gap
            continue
        at = _key_line(lines, key, 0, first_table)
        if at is None:
            # Above the comments that introduce the first table, not between them and it.
            while first_table > 0 and (
                not lines[first_table - 1].strip()
                or lines[first_table - 1].lstrip().startswith("#")
            ):
                first_table -= 1
            lines.insert(first_table, f"{key} = {toml_value(value)}")
        else:
            lines[at] = f"{key} = {toml_value(value)}{_trailing_comment(lines[at])}"
    new = "\n".join(lines) + "\n"
    try:
        after = tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        after = None
    if after != {**before, **changes}:
        raise UsageError(
            f"cannot change {', '.join(sorted(changes))} in the config file safely (a "
            "multi-line value?); edit it by hand and reload"
        )
    return new


def set_config_keys(path: Path, changes: dict[str, Any]) -> None:
    """Persist ``changes`` to the config file at ``path``, atomically.

    Raises:
        UsageError: the file cannot be read, edited safely, or written.
    """
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode & 0o7777
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    new = edit_config_text(text, changes)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
