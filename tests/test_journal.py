"""The agent's journal directly: durable entries, torn lines, compaction."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agentd import journal as journal_module
from agentd.journal import Journal, JournalEntry


def entries(path: Path) -> dict[str, JournalEntry]:
    """What a freshly opened journal at ``path`` holds."""
    j = Journal(path)
    try:
        return dict(j.jobs)
    finally:
        j.close()


def test_entries_survive_a_reopen_and_only_unfinished_jobs_are_left_over(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data" / "journal.jsonl"
    j = Journal(path)
    j.record("job-a", "starting")
    j.record("job-a", "running", pid=4242, start_ticks=99)
    j.record("job-b", "starting")
    j.record("job-b", "running", pid=4343, start_ticks=100)
    j.record("job-b", "finished", status="succeeded")
    j.close()

    again = Journal(path)
    assert again.knows("job-a")
    assert again.knows("job-b")
    assert not again.knows("job-c")
    [left] = again.unfinished()
    assert (left.job_id, left.state, left.pid, left.start_ticks) == ("job-a", "running", 4242, 99)
    assert again.jobs["job-b"].status == "succeeded"
    again.close()


def test_the_data_directory_is_private(tmp_path: Path) -> None:
    j = Journal(tmp_path / "fresh" / "journal.jsonl")
    j.close()
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700


def test_a_torn_last_line_is_skipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.record("job-a", "running", pid=10)
    j.close()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"job_id": "job-b", "sta')  # a crash in the middle of a write
    with caplog.at_level(logging.WARNING, logger="agentd.journal"):
        again = Journal(path)
    assert list(again.jobs) == ["job-a"]
    assert "unreadable journal line skipped" in caplog.text
    # Appending after the torn line still gives readable entries.
    again.record("job-c", "starting")
    again.close()
    assert set(entries(path)) == {"job-a", "job-c"}


def test_compaction_keeps_unfinished_jobs_and_the_newest_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "KEEP_FINISHED", 3)
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.record("running-1", "running", pid=1)
    for n in range(6):
        j.record(f"done-{n}", "starting")
        j.record(f"done-{n}", "finished", status="succeeded")
    j.record("running-2", "running", pid=2)
    j.compact()
    expected = {"running-1", "running-2", "done-3", "done-4", "done-5"}
    assert set(j.jobs) == expected
    j.close()
    # The file holds the same, one line per job, and nothing is left half-written.
    assert set(entries(path)) == expected
    assert len(path.read_text().splitlines()) == len(expected)
    assert not path.with_suffix(".tmp").exists()


def test_records_after_compacting_an_open_journal_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.record("job-a", "finished", status="succeeded")
    j.compact()
    j.record("job-b", "running", pid=3)
    j.close()
    assert set(entries(path)) == {"job-a", "job-b"}


def test_a_large_journal_is_compacted_when_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    for n in range(50):
        j.record(f"job-{n}", "starting")
        j.record(f"job-{n}", "finished", status="failed")
    j.record("still-running", "running", pid=7)
    j.close()
    lines_before = len(path.read_text().splitlines())
    monkeypatch.setattr(journal_module, "_COMPACT_BYTES", 1024)
    again = Journal(path)
    again.close()
    assert len(path.read_text().splitlines()) == 51 < lines_before
    assert [e.job_id for e in again.unfinished()] == ["still-running"]


def test_entries_from_a_newer_agent_with_more_fields_still_load(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text(
        '{"job_id": "job-a", "state": "running", "pid": 5, "cgroup": "/sys/fs/cgroup/x"}\n'
    )
    j = Journal(path)
    assert j.jobs["job-a"].pid == 5
    j.close()


def test_memory_and_file_stay_flat_over_thousands_of_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = 100
    monkeypatch.setattr(journal_module, "KEEP_FINISHED", keep)
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.record("long-runner", "running", pid=1)
    most_held = most_lines = 0
    for n in range(3000):
        job = f"job-{n}"
        j.record(job, "starting")
        j.record(job, "running", pid=n + 2, start_ticks=n)
        j.record(job, "ended", status="succeeded", exit_code=0)
        j.record(job, "finished", status="succeeded")
        unfinished, finished = j.held()
        most_held = max(most_held, unfinished + finished)
        most_lines = max(most_lines, len(path.read_bytes().splitlines()))
    # 12,001 entries went in; what is held never passed the window plus what is running.
    assert most_held <= keep + 2
    assert most_lines <= journal_module._COMPACT_FACTOR * (keep + 2) + 64 + 1
    # What exactly-once needs is still there: the unfinished job and the newest finished.
    assert j.knows("long-runner")
    assert j.knows("job-2999")
    assert j.knows(f"job-{2999 - keep + 1}")
    assert not j.knows(f"job-{2999 - keep}")
    j.close()
    again = Journal(path)
    assert [e.job_id for e in again.unfinished()] == ["long-runner"]
    assert again.held() == (1, keep)
    again.close()


async def test_durable_returns_once_a_shared_fsync_covered_every_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    synced: list[int] = []
    real_fsync = journal_module.os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(journal_module.os, "fsync", counting_fsync)
    for n in range(20):
        j.record(f"job-{n}", "starting")
    await asyncio.gather(*(j.durable() for _ in range(20)))
    # One fsync covered all twenty entries; nothing is left to sync.
    assert len(synced) == 1
    await j.durable()
    assert len(synced) == 1
    j.record("job-late", "starting")
    await j.durable()
    assert len(synced) == 2
    j.close()
    assert "job-late" in entries(path)


def test_an_entry_not_yet_synced_survives_the_agent_being_killed(tmp_path: Path) -> None:
    # Written straight to the kernel: a reader (the next agent) sees it without a close.
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.record("job-a", "running", pid=9)
    assert entries(path)["job-a"].pid == 9
    j.close()
