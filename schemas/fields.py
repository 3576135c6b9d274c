"""Annotated field types shared by every model.

Each alias carries its validation, so a model that says ``agent: AgentId`` cannot be
built with an id that would be unsafe in a subject.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from schemas import ids


def _check_token(value: str) -> str:
    if ids.is_plain_token(value):  # every valid one, without building a reason
        return value
    problem = ids.token_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_agent_id(value: str) -> str:
    if ids.is_plain_token(value) and value not in ids.RESERVED_AGENT_IDS:
        return value
    problem = ids.agent_id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_printable(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("control characters are not allowed")
    return value


Token = Annotated[str, AfterValidator(_check_token)]
"""One safe subject token: ASCII letters, digits, ``_``, ``-``; 1–64 characters."""

AgentId = Annotated[str, AfterValidator(_check_agent_id)]
"""An agent id: a :data:`Token` that is not reserved."""

EventId = Annotated[str, Field(pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")]
"""A time-ordered id made by :func:`schemas.ids.new_id` (also used for job ids)."""

PrincipalId = Token
"""Who did something: an agent id, ``master``, an operator or headless user name."""

PublicKey = Annotated[str, Field(pattern=r"^[A-Z2-7]{56}$")]
"""An nkey public key in its base32 text form (56 characters, e.g. ``U...``)."""

UserName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$")]
"""A POSIX login name, as `useradd` accepts it."""

Label = Annotated[str, Field(max_length=128), AfterValidator(_check_printable)]
"""A label value: short, printable."""

MAX_LABELS = 64

Labels = Annotated[dict[Token, Label], Field(max_length=MAX_LABELS)]
"""Labels: at most 64, each value at most 128 printable characters."""

TimestampNs = Annotated[int, Field(ge=0)]
"""Nanoseconds since the Unix epoch (UTC)."""

Text = Annotated[str, Field(max_length=4096), AfterValidator(_check_printable)]
"""A short human-readable message, such as a reason."""
