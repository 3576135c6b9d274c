"""Helpers for tests of the HTTP listeners: find a daemon's port in its log, GET a URL."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from collections.abc import Callable

from bus.metrics import Labels, parse


async def listening_port(log: Callable[[], str], what: str, timeout: float = 30.0) -> int:
    """The port a daemon says (in its log) that ``what`` listens on: ``what on http://h:PORT``."""
    pattern = re.compile(re.escape(what) + r" on https?://[^\s:]+:(\d+)")
    async with asyncio.timeout(timeout):
        while True:
            found = pattern.search(log())
            if found:
                return int(found.group(1))
            await asyncio.sleep(0.1)  # the daemon is still starting: look at its log again


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET (an error status is returned, not raised)."""
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - http only
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - http only
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def aget(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """:func:`get` without blocking the event loop."""
    return await asyncio.to_thread(get, url, headers)


async def until_status(url: str, status: int, timeout: float = 30.0) -> bytes:
    """GET ``url`` until it answers ``status``; returns that answer's body."""
    async with asyncio.timeout(timeout):
        while True:
            got, _, body = await aget(url)
            if got == status:
                return body
            await asyncio.sleep(0.2)  # the daemon has not noticed yet: ask again


Samples = dict[str, dict[Labels, float]]


async def scrape_until(
    url: str, ready: Callable[[Samples], bool], timeout: float = 30.0
) -> Samples:
    """Scrape ``url`` until ``ready`` holds for its samples (the fold is asynchronous)."""
    async with asyncio.timeout(timeout):
        while True:
            status, _, body = await aget(url)
            assert status == 200, body
            samples = parse(body.decode())
            if ready(samples):
                return samples
            await asyncio.sleep(0.2)  # the master has not folded it yet: scrape again
