"""Identifiers: the safe token charset and time-ordered unique ids.

This module must not depend on anything outside the standard library: `bus.subjects`
and every model validate against the same rules, so they live here once.

A *token* is anything that becomes one element of a NATS subject (an agent id, a job
id, an event name, the subject prefix). NATS splits subjects on ``.`` and treats ``*``
and ``>`` as wildcards, so a token that contained them would let one principal address
another's subjects. The charset is deliberately narrow: ASCII letters, digits, ``_``
and ``-``, starting with a letter or digit, at most 64 characters.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time

TOKEN_MAX_LEN = 64
_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# Agent ids that would collide with fixed subjects (`fleet.ctl.master.<op>`).
RESERVED_AGENT_IDS = frozenset({"master"})

# Crockford's base32: no I, L, O, U, so ids survive being read aloud or retyped.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def token_problem(value: object, what: str = "token") -> str | None:
    """Say why ``value`` is not a safe subject token, or return None if it is.

    Args:
        value: the candidate token.
        what: how to name it in the message ("agent id", "job id", ...).

    Returns:
        A one-line reason, or None when the token is valid.
    """
    if not isinstance(value, str):
        return f"{what} must be a string, not {type(value).__name__}"
    if value == "":
        return f"{what} must not be empty"
    if len(value) > TOKEN_MAX_LEN:
        return f"{what} {value[:20]!r}… is {len(value)} characters; at most {TOKEN_MAX_LEN}"
    if _TOKEN_RE.fullmatch(value) is None:
        bad = sorted({c for c in value if not (c.isascii() and (c.isalnum() or c in "_-"))})
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            return (
                f"{what} {value!r} contains {shown}; allowed are ASCII letters, digits, '_' and '-'"
            )
        return f"{what} {value!r} must start with a letter or a digit"
    return None


def is_plain_token(value: str) -> bool:
    """True when the string ``value`` is a safe subject token (the fast check models run
    on every field; :func:`token_problem` says why not)."""
    return _TOKEN_RE.fullmatch(value) is not None


def is_token(value: object) -> bool:
    """True when ``value`` is a safe subject token."""
    return token_problem(value) is None


def agent_id_problem(value: object) -> str | None:
    """Like :func:`token_problem`, plus the reserved agent ids."""
    problem = token_problem(value, "agent id")
    if problem is None and value in RESERVED_AGENT_IDS:
        return f"agent id {value!r} is reserved"
    return problem


def version_token(version: str) -> str:
    """Turn a release version into a subject token.

    Versions contain dots (``1.2.0``), which NATS reads as token separators, and PEP 440
    local versions contain ``+``. Dots become ``_`` and ``+`` becomes ``-``; the event
    data always carries the exact version, the subject only has to be unique and safe.

    Raises:
        ValueError: the version still is not a safe token after the mapping.
    """
    token = version.replace(".", "_").replace("+", "-")
    problem = token_problem(token, "version")
    if problem is not None:
        raise ValueError(problem)
    return token


def _encode(value: int) -> str:
    """128 bits as 26 Crockford base-32 characters, most significant first."""
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class _IdGenerator:
    """ULID-shaped ids: 48 bits of milliseconds, 80 bits that only grow within one ms.

    Sorting the 26-character strings sorts by creation time, and ids made in the same
    millisecond by this process still sort in creation order, so an id is a usable
    position in a log even before the stream gives it a sequence number.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def new(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                # Same millisecond (or the clock stepped back): keep ordering by
                # incrementing; 80 random bits leave ample room before overflow.
                ms = self._last_ms
                rand = self._last_rand + 1
            else:
                rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for +1
            self._last_ms, self._last_rand = ms, rand
        return _encode((ms << 80) | rand)


_generator = _IdGenerator()


def new_id() -> str:
    """A new time-ordered unique id (26 characters, a valid subject token)."""
    return _generator.new()


def stable_id(anchor: str, *parts: str, secret: bytes) -> str:
    """The same id every time for the same ``anchor``, ``parts`` and ``secret``.

    An event that a retry can repeat (an agent's ``job.finished`` after a reconnect, the
    master's ``abandoned`` after a restart) must carry one id on every try, or the
    stream's duplicate window cannot recognise the repeat. The time part is the anchor's
    (a job id's creation time), so the id still sorts near its job; the rest is a keyed
    hash of the anchor and ``parts``. The key is the publisher's own secret (see
    ``bus.Signer.stable_id``): the stream drops any message whose id it has seen within
    its duplicate window, on any subject, so an id others could work out in advance
    (from a job's id, which its submitter chooses) would let them publish it first and
    have the real event dropped as a repeat.

    Raises:
        ValueError: ``anchor`` is not an id made by :func:`new_id`, or ``secret`` is empty.
    """
    if len(secret) < 16:
        raise ValueError("a stable id needs a secret of at least 16 bytes")
    ms = id_time_ns(anchor) // 1_000_000
    digest = hmac.new(secret, "\x1f".join((anchor, *parts)).encode(), hashlib.sha256).digest()
    return _encode((ms << 80) | int.from_bytes(digest[:10], "big"))


def id_time_ns(identifier: str) -> int:
    """The creation time encoded in an id made by :func:`new_id`, in nanoseconds.

    Raises:
        ValueError: ``identifier`` is not such an id.
    """
    if len(identifier) != 26:
        raise ValueError(f"{identifier!r} is not a fleetbus id (26 characters)")
    value = 0
    for c in identifier:
        digit = _CROCKFORD.find(c)
        if digit < 0:
            raise ValueError(f"{identifier!r} is not a fleetbus id ({c!r})")
        value = (value << 5) | digit
    return (value >> 80) * 1_000_000
