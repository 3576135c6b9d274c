"""Small helpers for tests that read what reached a real server."""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext

from bus import decode_envelope
from schemas import Envelope


async def stream_envelopes(js: JetStreamContext, stream: str) -> list[Envelope]:
    """Every message of a stream, decoded as envelopes, in stream order."""
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        assert msg.data is not None
        out.append(decode_envelope(msg.data))
    return out


class LogEvent(logging.Handler):
    """Sets an asyncio Event when a log record contains ``needle``: waiting on what the
    code under test reports, instead of sleeping."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.loop = asyncio.get_running_loop()
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.loop.call_soon_threadsafe(self.seen.set)
