"""Answering requests on a subject (control operations): the serving side of request/reply."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.connection import Bus
from bus.errors import ConnectionFailedError

logger = logging.getLogger(__name__)

Handler = Callable[[str, bytes], Awaitable[bytes]]
"""Takes the subject a request came on and its payload; returns the reply's payload."""


class Service:
    """A subscription answering requests until :meth:`stop`."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    async def stop(self) -> None:
        """Stop answering; requests then go unanswered (callers retry)."""
        try:
            await self._sub.unsubscribe()
        except (nats.errors.Error, OSError) as exc:
            logger.debug("unsubscribe: %s", exc)


async def serve(bus: Bus, subject: str, handler: Handler) -> Service:
    """Answer every request on ``subject`` (wildcards allowed) with ``handler``.

    The handler must not raise: it answers errors as data. A reply the connection cannot
    send is logged (the caller retries).

    Raises:
        ConnectionFailedError: the subscription could not be made.
    """

    async def on_request(msg: Msg) -> None:
        reply = await handler(msg.subject, msg.data)
        if msg.reply:
            try:
                await msg.respond(reply)
            except (nats.errors.Error, OSError) as exc:
                logger.warning("%s: cannot reply: %s", msg.subject, exc)

    try:
        sub = await bus.nc.subscribe(subject, cb=on_request)
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"cannot subscribe to {subject}: {exc}") from exc
    return Service(sub)


async def listen(bus: Bus, subject: str, on_message: Callable[[], None]) -> Service:
    """Call ``on_message`` whenever anything is published on ``subject`` (a doorbell:
    the message itself is not read).

    A plain subscription needs no consumer, survives reconnects and ends cleanly, so
    it suits "something changed, look again" (e.g. on a KV key's subject).

    Raises:
        ConnectionFailedError: the subscription could not be made.
    """

    async def on_msg(_msg: Msg) -> None:
        on_message()

    try:
        sub = await bus.nc.subscribe(subject, cb=on_msg)
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"cannot subscribe to {subject}: {exc}") from exc
    return Service(sub)
