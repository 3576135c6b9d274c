"""Log formats of the daemons: ``text`` (the default) or ``json``, one object per line.

A JSON line holds ``time`` (RFC 3339 UTC), ``level``, ``logger``, ``message`` and the
ids involved: ``agent``, ``job``, ``event`` (and ``version`` for updates). They come
from the call's ``extra=`` (``logger.info("…", extra={"job": job_id})``) or, for every
line logged inside a block, from :func:`log_ids` (a context variable, so each asyncio
task keeps its own).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

ID_FIELDS = ("agent", "job", "event", "version")

_ids: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "fleet_log_ids", default=MappingProxyType({})
)


@contextlib.contextmanager
def log_ids(**ids: str | None) -> Iterator[None]:
    """Add ``ids`` (agent, job, event, version) to every JSON line logged in this block."""
    merged = {**_ids.get(), **{k: v for k, v in ids.items() if v is not None}}
    token = _ids.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _ids.reset(token)


def set_log_ids(**ids: str | None) -> None:
    """Add ``ids`` to every line logged from here on, in this context and the tasks it
    starts (a daemon names itself once, before its event loop)."""
    _ids.set(MappingProxyType({**_ids.get(), **{k: v for k, v in ids.items() if v is not None}}))


def ids_context(**ids: str | None) -> contextvars.Context:
    """A copy of the current context with ``ids`` added: a task created in it
    (``create_task(…, context=…)``) logs them on every line."""
    merged = MappingProxyType({**_ids.get(), **{k: v for k, v in ids.items() if v is not None}})
    context = contextvars.copy_context()
    context.run(_ids.set, merged)
    return context


class JsonFormatter(logging.Formatter):
    """One JSON object per record; newlines in messages stay inside their string."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = _ids.get()
        for name in ID_FIELDS:
            value = getattr(record, name, None) or ids.get(name)
            if value is not None:
                doc[name] = str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter of ``text`` or ``json`` logs."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def use_format(log_format: LogFormat) -> None:
    """Give every handler of the root logger the ``log_format`` formatter."""
    chosen = formatter(log_format)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(chosen)
