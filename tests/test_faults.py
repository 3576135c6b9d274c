"""Fault scenarios (issue 12): an operator's worst week, as tests with counts.

Each scenario prints ``FAULT <name>: submitted=… acknowledged=… executed=… terminal…``
and asserts: nothing acknowledged is lost, nothing runs twice, and every job that ended
has exactly one terminal event. Slow ones are marked ``slow``; CI runs them all.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import AgentProcess, fleet_env, job_request, pid_alive, submit, wait_event
from faults import (
    ESCAPING_JOB,
    Counts,
    cgroup_of,
    escapee_pids,
    tagged_processes,
    terminal_events,
    wait_until,
)
from natsserver import NatsServer

from agentd.contain import own_cgroup_dir
from bus import Bus, Signer

Agents = Callable[..., AgentProcess]
Operator = tuple[Path, Signer]

pytestmark = pytest.mark.timeout(180)


# --- processes that try to outlive their job -----------------------------------------------


@pytest.mark.parametrize("end", ["exit", "cancel", "timeout"])
async def test_setsid_and_daemon_children_end_with_the_job(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Agents,
    operator: Operator,
    tmp_path: Path,
    end: str,
) -> None:
    await agent_factory("web-1").started(bus)
    run_dir = tmp_path / "escape"
    run_dir.mkdir()
    request = job_request(
        ["sh", "-c", ESCAPING_JOB, "job", str(run_dir), "exit" if end == "exit" else "hang"],
        timeout_s=15.0 if end == "timeout" else None,
    )
    job = await submit(bus, operator[1], "web-1", request)
    await wait_event(bus, "web-1", job, "started")
    await wait_until(
        lambda: (run_dir / "daemon.pid").exists() and (run_dir / "setsid.pid").exists(),
        30,
        "the job's detached children",
    )
    pids = escapee_pids(run_dir)
    if end != "exit":
        assert all(pid_alive(p) for p in pids.values()), "the escapees should be running now"
    if end != "exit" and own_cgroup_dir() is not None:
        # Where the agent may create cgroups (CI runs as root), the job has its own.
        cgroup = cgroup_of(pids["setsid"])
        assert f"fleet-job-{job}" in cgroup, cgroup
    if end == "cancel":
        cancel = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "fleet"),
            "job",
            "cancel",
            job,
            env=fleet_env(nats_server.url, operator[0]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(cancel.communicate(), 30)
        assert cancel.returncode == 0, err
    finished = await wait_event(bus, "web-1", job, "finished", timeout=60)
    expected = {"exit": "succeeded", "cancel": "cancelled", "timeout": "timed_out"}[end]
    left = {name: pid for name, pid in pids.items() if pid_alive(pid)}
    tagged = tagged_processes(job)
    terminal = (await terminal_events(bus)).get(job, [])
    print(f"\nFAULT escape-{end}: escapees={pids} alive after the job={left} tagged={tagged}")
    assert finished.data.status == expected
    assert not left, f"processes outlived the job: {left}"
    assert not tagged
    assert terminal == [expected]


def test_without_a_cgroup_the_subreaper_and_tag_still_catch_escapees(tmp_path: Path) -> None:
    """Where the agent may not create a cgroup: subreaper plus job tag, nothing else."""
    script = f"""
import asyncio, json, sys
from agentd.contain import JobScope

async def main():
    env = {{"PATH": "/usr/bin:/bin", "FLEET_JOB_ID": "J-nocgroup"}}
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", {ESCAPING_JOB!r}, "job", {str(tmp_path)!r}, "exit",
        env=env, start_new_session=True, stdout=asyncio.subprocess.DEVNULL)
    scope = JobScope("J-nocgroup", None)
    scope.adopt(proc.pid)
    await proc.wait()
    assert scope.cgroup is None
    killed = await scope.end()
    print(json.dumps({{"killed": killed}}))

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    pids = escapee_pids(tmp_path)
    left = {name: pid for name, pid in pids.items() if pid_alive(pid)}
    print(f"\nFAULT escape-no-cgroup: {done.stdout.strip()} escapees={pids} alive={left}")
    assert json.loads(done.stdout)["killed"] == 2
    assert not left


__all__ = ["Counts"]
