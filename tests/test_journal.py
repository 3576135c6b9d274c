"""The agent's journal directly: durable entries, torn lines, compaction."""

from __future__ import annotations

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
