"""The master in-process against a real server: its hooks, and that stopping leaves no task.

The end-to-end tests run ``fleet-master`` as a process; these drive :class:`Master`
directly, to see what a process hides: every task it started has ended once ``run``
returns, listeners see each folded record, periodic work runs, and the last snapshot
holds everything folded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agents import job_request, submit

from bus import Bus, Signer, generate_seed
from ledger.driver import Entry
from ledger.snapshot import load_snapshot
from master.config import MasterConfig
from master.controller import Master
from schemas import new_id


def _master(bus: Bus, tmp_path: Path) -> Master:
    config = MasterConfig(data_dir=tmp_path / "master", snapshot_every=2, checkpoint_every=2)
    return Master(bus, config, Signer(generate_seed()))


async def test_hooks_run_and_stopping_ends_every_task(
    bus: Bus, tmp_path: Path, operator: tuple[Path, Signer]
) -> None:
    before = await submit(bus, operator[1], "web-1", job_request(["true"]))
    master = _master(bus, tmp_path)
    folded: list[Entry] = []
    after = new_id()
    after_subject = bus.subjects.job_event("web-1", after, "submitted")
    after_folded = asyncio.Event()

    def listen(entry: Entry) -> None:
        folded.append(entry)
        if entry.record.subject == after_subject:
            after_folded.set()

    master.on_folded(listen)
    ticks = 0
    ticked_twice = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks >= 2:
            ticked_twice.set()

    master.every(0.05, tick, "test tick")
    running = asyncio.create_task(master.run())
    try:
        await asyncio.wait_for(master.ready.wait(), 30)
        assert before in master.projection.jobs  # caught up with what was stored
        await submit(bus, operator[1], "web-1", job_request(["true"]), job_id=after)
        await asyncio.wait_for(after_folded.wait(), 30)
        assert after in master.projection.jobs
        await asyncio.wait_for(ticked_twice.wait(), 30)
    finally:
        master.stop()
        await asyncio.wait_for(running, 30)
    assert master.tasks.running == 0
    subjects = [e.record.subject for e in folded]
    assert bus.subjects.job_event("web-1", before, "submitted") in subjects
    assert after_subject in subjects
    assert [e.seq for e in folded] == sorted(e.seq for e in folded)
    snapshot = await load_snapshot(bus)
    assert snapshot is not None
    assert snapshot.seq == master.projection.seq
    assert snapshot.chain.hex == master.chain.hex


async def test_stop_before_ready_still_ends_cleanly(bus: Bus, tmp_path: Path) -> None:
    master = _master(bus, tmp_path)
    master.stop()
    await asyncio.wait_for(master.run(), 30)
    assert master.tasks.running == 0


async def test_an_idle_log_is_checkpointed_once(
    bus: Bus, tmp_path: Path, operator: tuple[Path, Signer]
) -> None:
    await submit(bus, operator[1], "web-1", job_request(["true"]))
    config = MasterConfig(
        data_dir=tmp_path / "master", checkpoint_interval_s=0.1, snapshot_interval_s=0.1
    )
    master = Master(bus, config, Signer(generate_seed()))
    checkpoints: list[int] = []
    master.on_folded(
        lambda e: (
            checkpoints.append(e.seq)
            if e.record.subject == bus.subjects.audit_event("checkpoint")
            else None
        )
    )
    ticks = 0
    many_periods = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks >= 10 and checkpoints:
            many_periods.set()

    master.every(0.1, tick, "count periods")
    running = asyncio.create_task(master.run())
    try:
        await asyncio.wait_for(many_periods.wait(), 60)
    finally:
        master.stop()
        await asyncio.wait_for(running, 30)
    # The checkpoint event itself is not news: ten periods later there is still one.
    assert len(checkpoints) == 1
