"""Helpers for the fault scenarios: counting what the log says, and job processes in /proc.

Every scenario ends with :func:`report`, which prints its counts (so CI's output shows
them) and asserts the invariants: every acknowledged job is in the log, nothing ran
twice, and every job that ended has exactly one terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from agents import job_request, pid_alive, submit

from bus import Bus, FleetError, Signer, decode_envelope
from bus.codec import decode_data
from bus.log import read_log
from schemas import Event, JobFinished, JobRequest, new_id

REPORT: list[str] = []
"""Every scenario's count line, printed again in the terminal summary (tests/conftest.py)."""


def report(line: str) -> None:
    """Print a scenario's counts now and keep them for the run's summary."""
    line = " ".join(line.split())
    REPORT.append(line)
    print(f"\n{line}", flush=True)


#: A job that detaches two processes from its group and waits until both run: one with
#: ``setsid``, and a classic double-forking daemon with its stdio on /dev/null. Each
#: writes its pid to a file in DIR (atomically). Then ``$1`` says what the job does:
#: ``exit`` ends it at once, ``hang`` leaves it running (for a cancel or a timeout).
ESCAPING_JOB = r"""
D="$1"; shift
setsid sh -c 'echo $$ > "$0/setsid.tmp"; mv "$0/setsid.tmp" "$0/setsid.pid"; exec sleep 1000' "$D" &
python3 - "$D" <<'EOF'
import os, sys, time
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
with open(sys.argv[1] + "/daemon.tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[1] + "/daemon.tmp", sys.argv[1] + "/daemon.pid")
time.sleep(1000)
EOF
while [ ! -s "$D/setsid.pid" ] || [ ! -s "$D/daemon.pid" ]; do sleep 0.02; done
echo detached
if [ "$1" = hang ]; then sleep 1000; fi
"""


def escapee_pids(directory: Path) -> dict[str, int]:
    """The pids the escaping job wrote: ``{"setsid": pid, "daemon": pid}``."""
    return {name: int((directory / f"{name}.pid").read_text()) for name in ("setsid", "daemon")}


def cgroup_of(pid: int) -> str:
    """The cgroup membership of a process, as /proc lists it."""
    return Path(f"/proc/{pid}/cgroup").read_text()


def rss_kib(pid: int) -> int:
    """A process's resident memory in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tagged_processes(job_id: str) -> list[int]:
    """Live processes whose environment carries this job's tag."""
    marker = f"\0FLEET_JOB_ID={job_id}\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        if marker in b"\0" + environ and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def marker_job(runs: Path, **kw: Any) -> JobRequest:
    """A job that appends one line to ``runs/<its job id>`` each time it runs."""
    return job_request(["sh", "-c", f'echo run >> "{runs}/$FLEET_JOB_ID"'], **kw)


@dataclass
class Submissions:
    """Jobs a scenario tried to submit, and those the server acknowledged."""

    attempted: list[str] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    progress: asyncio.Event = field(default_factory=asyncio.Event)


async def submit_many(
    bus: Bus,
    signer: Signer,
    agent: str,
    requests: list[JobRequest],
    into: Submissions,
    *,
    concurrency: int = 16,
) -> Submissions:
    """Submit jobs (``concurrency`` in flight), each once under its own id.

    A submission that raises is counted as not acknowledged, never retried anew.
    """
    queue: asyncio.Queue[JobRequest] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)

    async def worker() -> None:
        while not queue.empty():
            request = queue.get_nowait()
            job_id = new_id()
            into.attempted.append(job_id)
            try:
                await submit(bus, signer, agent, request, job_id=job_id)
            except FleetError as exc:
                into.failed[job_id] = str(exc)
            else:
                into.acknowledged.add(job_id)
            into.progress.set()

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return into


async def count(scenario: str, bus: Bus, runs: Path, subs: Submissions, **extra: object) -> Counts:
    """Everything the log and the side-effect files say, as :class:`Counts`."""
    stored = await events_named(bus, "submitted")
    counts = Counts(
        scenario,
        submitted=len(subs.attempted),
        acknowledged=subs.acknowledged,
        executed=side_effects(runs),
        terminal=await terminal_events(bus),
        stored=sum(stored.values()),
        extra=dict(extra),
    )
    counts.extra["stored_twice"] = sum(1 for n in stored.values() if n > 1)
    counts.extra["not_acknowledged"] = len(subs.failed)
    return counts


async def wait_all_ended(bus: Bus, jobs: set[str], timeout: float) -> None:
    """Until every job in ``jobs`` has a terminal event (or ``timeout``)."""

    missing = set(jobs)

    async def ended() -> bool:
        missing.difference_update(await terminal_events(bus))
        return not missing

    try:
        await wait_until(ended, timeout, f"{len(jobs)} jobs to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {len(missing)} never ended: {sorted(missing)[:10]}") from None


async def fill_store(bus: Bus) -> int:
    """Publish ever smaller messages until the server stops acknowledging any.

    512 KiB chunks to the output stream, then 4 KiB and 256 B filler to the event log
    (on ``<prefix>.evt.filler.*``, which no fold reads), so every stream's next write fails.

    Returns:
        How many were stored.
    """
    stored = 0
    for size, subject in (
        (512 << 10, bus.subjects.output("filler", "f")),
        (4 << 10, f"{bus.subjects.prefix}.evt.filler.f"),
        (256, f"{bus.subjects.prefix}.evt.filler.f"),
    ):
        while True:
            try:
                await bus.js.publish(subject, b"\xff" * size, timeout=2.0)
            except nats.errors.TimeoutError:
                break
            stored += 1
    return stored


async def terminal_events(bus: Bus) -> dict[str, list[str]]:
    """Every job's terminal statuses in log order: ``{job_id: ["succeeded", ...]}``."""
    records = await read_log(
        bus, bus.subjects.events_stream, f"{bus.subjects.prefix}.evt.job.*.*.finished"
    )
    out: dict[str, list[str]] = {}
    for record in records:
        event = decode_data(decode_envelope(record.data))
        assert isinstance(event, Event)
        assert isinstance(event.data, JobFinished)
        data = event.data
        out.setdefault(data.job_id, []).append(data.status)
    return out


async def events_named(bus: Bus, name: str) -> Counter[str]:
    """How many events named ``name`` (``submitted``, ``started``, …) each job has."""
    records = await read_log(
        bus, bus.subjects.events_stream, f"{bus.subjects.prefix}.evt.job.*.*.{name}"
    )
    return Counter(r.subject.split(".")[-2] for r in records)


def side_effects(directory: Path) -> Counter[str]:
    """How many times each job ran: one line per run in ``directory/<job marker>``."""
    counts: Counter[str] = Counter()
    for path in directory.iterdir():
        counts[path.name] = len(path.read_text().splitlines())
    return counts


@dataclass
class Counts:
    """What a scenario observed; :meth:`check` asserts the invariants and prints."""

    scenario: str
    submitted: int = 0
    acknowledged: set[str] = field(default_factory=set)
    executed: Counter[str] = field(default_factory=Counter)
    terminal: dict[str, list[str]] = field(default_factory=dict)
    stored: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def check(self, *, all_ended: bool = True, ran: set[str] | None = None) -> None:
        """Print the counts, then assert them.

        Args:
            all_ended: every acknowledged job must have its terminal event.
            ran: the side-effect names that must have run once each (default: none
                checked beyond "at most once").
        """
        twice = sorted(k for k, n in self.executed.items() if n > 1)
        multi = {j: s for j, s in self.terminal.items() if len(s) > 1}
        unended = sorted(j for j in self.acknowledged if j not in self.terminal)
        statuses = Counter(s[0] for s in self.terminal.values())
        report(
            f"FAULT {self.scenario}: submitted={self.submitted} "
            f"acknowledged={len(self.acknowledged)} stored={self.stored} "
            f"executed={sum(self.executed.values())} (jobs run >1: {len(twice)}) "
            f"jobs with a terminal event={len(self.terminal)} "
            f"(>1 terminal: {len(multi)}) statuses={dict(statuses)} "
            + " ".join(f"{k}={v}" for k, v in self.extra.items()),
        )
        assert not twice, f"ran more than once: {twice[:10]}"
        assert not multi, f"more than one terminal event: {dict(list(multi.items())[:10])}"
        assert self.stored >= len(self.acknowledged), "an acknowledged job is not in the log"
        if all_ended:
            assert not unended, f"{len(unended)} acknowledged jobs never ended: {unended[:10]}"
        if ran is not None:
            missing = sorted(ran - set(self.executed))
            assert not missing, f"{len(missing)} jobs never ran: {missing[:10]}"


class FreezingProxy:
    """A TCP proxy to a server that freezes a connection once it carries ``pattern``.

    From the first client chunk holding ``pattern`` on, nothing is forwarded either way:
    the client's bytes are held, as a network or a stopped server would hold them, and it
    gets no acknowledgement. :meth:`release` delivers the held bytes to the server.
    """

    def __init__(self, upstream_port: int, pattern: bytes) -> None:
        self.upstream_port = upstream_port
        self.pattern = pattern
        self.frozen = asyncio.Event()
        self._released = asyncio.Event()
        self._held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        down = asyncio.create_task(self._pipe(up_reader, writer, upstream=False))
        try:
            await self._pipe(reader, up_writer, upstream=True)
            if self.frozen.is_set():
                await self._released.wait()  # the held bytes go out before the close
        finally:
            down.cancel()
            up_writer.close()
            writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if upstream and self.pattern in data:
                    self.frozen.set()
                if self.frozen.is_set() and not self._released.is_set():
                    if upstream:
                        self._held.append((writer, data))
                    continue  # the client hears nothing more
                writer.write(data)
                await writer.drain()

    async def release(self) -> int:
        """Deliver what was held to the server; returns how many bytes."""
        sent = 0
        for writer, data in self._held:
            writer.write(data)
            await writer.drain()
            sent += len(data)
        self._held.clear()
        self._released.set()
        return sent

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Until ``predicate()`` (sync or async) is true; AssertionError after ``timeout``."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        result = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > give_up:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.1)  # polling a condition with no event to await (/proc, files)
