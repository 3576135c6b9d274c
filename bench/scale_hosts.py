"""bench.scale's processes: the raw nats-py baseline fleet, and what every host needs
(its share of agents, its RSS, a bounded stop).

The baseline: N raw nats-py connections in as many processes, each subscribed to its own
subject and spawning ``true`` per request (children watched by pidfd, as the agent's
are), and N concurrent requests to them.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bus import ConnectSettings, connect

RESPONDERS = """
import asyncio, sys, nats
async def main():
    if hasattr(asyncio, "PidfdChildWatcher") and sys.version_info < (3, 12):
        watcher = asyncio.PidfdChildWatcher()  # as the agent watches its children
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.get_event_loop_policy().set_child_watcher(watcher)
    url, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tasks = set()
    async def run(msg):
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        await msg.respond(str(proc.returncode).encode())
    async def handle(msg):
        task = asyncio.create_task(run(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    async def one(n):
        nc = await nats.connect(url, max_reconnect_attempts=0)
        await nc.subscribe(f"bench.scale.{n}", cb=handle)
        await nc.flush()
        return nc
    conns = await asyncio.gather(*(one(n) for n in range(first, first + count)))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def raise_nofile() -> int:
    """The soft limit of open files raised to the hard one (inherited by the server and
    the agent processes started after); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_mib(pid: int) -> dict[str, float]:
    """RSS now and at its peak (``VmHWM``) of ``pid``, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields["rss_mib" if name == "VmRSS" else "peak_rss_mib"] = round(
                int(rest.split()[0]) / 1024, 1
            )
    return fields


def split(agents: int, procs: int) -> list[int]:
    """How many of ``agents`` each of ``procs`` processes hosts (as even as can be)."""
    return [agents // procs + (1 if n < agents % procs else 0) for n in range(procs)]


async def stop_all(procs: list[asyncio.subprocess.Process], grace: float) -> None:
    """SIGTERM (agents drain and withdraw), SIGKILL what is still there after ``grace``."""
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await asyncio.gather(*(p.wait() for p in procs))
    except TimeoutError:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        await asyncio.gather(*(p.wait() for p in procs))


async def baseline(url: str, agents: int, procs: int, timeout: float) -> dict[str, Any]:
    """N raw connections, each subscribed to its own subject; one request to each."""
    async with await connect(ConnectSettings(servers=[url])) as bus:
        t0 = time.perf_counter()
        responders = []
        first = 0
        for count in split(agents, procs):
            responders.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    RESPONDERS,
                    url,
                    str(first),
                    str(count),
                    stdout=subprocess.PIPE,
                )
            )
            first += count
        try:
            async with asyncio.timeout(timeout):
                for proc in responders:
                    assert proc.stdout is not None
                    if await proc.stdout.readline() != b"ready\n":
                        raise RuntimeError("a baseline responder process failed")
            online_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            replies = await asyncio.gather(
                *(bus.nc.request(f"bench.scale.{n}", b"", timeout=timeout) for n in range(agents))
            )
            fanout_s = time.perf_counter() - t0
            rss = sum(rss_mib(p.pid)["rss_mib"] for p in responders)
        finally:
            await stop_all(responders, 10)
    return {
        "online_s": round(online_s, 3),
        "fanout_s": round(fanout_s, 3),
        "replies_ok": sum(1 for r in replies if r.data == b"0"),
        "host_rss_mib": round(rss, 1),
    }
