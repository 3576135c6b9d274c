"""Request/reply on ``<prefix>.ctl.<agent>.<op>`` and ``<prefix>.ctl.master.<op>``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ControlRequest(BaseModel):
    """Arguments of a control operation (each op documents its own).

    An agent answers only requests signed by a key its trust file grants the operation
    (see :func:`bus.signing.sign_control`): ``id`` and ``ts`` make each request unique
    and fresh, ``subject`` ties it to one agent and one operation. The master's control
    requests need no signature (its subjects are guarded by server permissions).
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    args: dict[str, Any] = {}
    id: str | None = None
    """A fresh event-format id per request: an agent answers each id once."""
    ts: int | None = None
    """When it was signed (ns since the epoch)."""
    subject: str | None = None
    """The subject it was signed for: ``<prefix>.ctl.<agent>.<op>``."""
    signer: str | None = None
    """The signer's public nkey."""
    sig: bytes | None = None
    """ed25519 over :func:`bus.codec.canonical_control_bytes`."""


class ControlReply(BaseModel):
    """The answer: ``ok`` with ``data``, or not ``ok`` with an ``error`` a person can read."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    ok: bool
    data: dict[str, Any] = {}
    error: str | None = None
