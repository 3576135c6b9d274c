"""Request/reply on ``<prefix>.ctl.<agent>.<op>`` and ``<prefix>.ctl.master.<op>``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ControlRequest(BaseModel):
    """Arguments of a control operation (each op documents its own)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    args: dict[str, Any] = {}


class ControlReply(BaseModel):
    """The answer: ``ok`` with ``data``, or not ``ok`` with an ``error`` a person can read."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    ok: bool
    data: dict[str, Any] = {}
    error: str | None = None
