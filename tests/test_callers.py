"""The master's answers to requests that name their caller, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bus import Subjects
from ledger.views import JobView
from master.callers import job_output, parse_control

JOB = "01JB3Z0000000000000000000A"


def test_the_caller_is_the_token_after_the_op() -> None:
    s = Subjects("fleet")
    assert parse_control(s, s.master_control_by("job-output", "batch")) == ("job-output", "batch")
    assert parse_control(s, s.master_control("jobs")) == ("jobs", None)
    with pytest.raises(ValueError, match="not a master control subject"):
        parse_control(s, "fleet.ctl.web-1.status")


def test_only_the_submitter_reads_a_job() -> None:
    jobs = {
        JOB: JobView(JOB, "web-1", status="succeeded", submitted_by="batch", output_tail="hi\n")
    }
    mine = job_output(jobs, "batch", {"job_id": JOB})
    assert mine["output_tail"] == "hi\n"
    assert mine["finished"] is True
    # Someone else's job and no job at all look the same.
    with pytest.raises(ValueError, match=f"no job {JOB} of mallory"):
        job_output(jobs, "mallory", {"job_id": JOB})
    with pytest.raises(ValueError, match="no job 01JB3Z0000000000000000000B of batch"):
        job_output(jobs, "batch", {"job_id": "01JB3Z0000000000000000000B"})
    with pytest.raises(ValueError, match="must name its caller"):
        job_output(jobs, None, {"job_id": JOB})
    with pytest.raises(ValidationError):
        job_output(jobs, "batch", {"job_id": "a.b"})
