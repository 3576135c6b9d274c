"""Files fleet-agentd writes for the system: its systemd unit and its PAM service."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bus import FleetError, UsageError

UNIT_NAME = "fleet-agentd.service"
UNIT_PATH = Path("/etc/systemd/system") / UNIT_NAME


def systemd_unit(config_path: Path) -> str:
    """A systemd unit running this installation's agent with ``config_path``."""
    return f"""\
# systemd unit for the fleetbus agent, written by `fleet-agentd -S`.
[Unit]
Description=fleetbus agent (runs jobs sent over NATS)
Documentation=file:///etc/fleetbus/agentd.toml
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
# The launcher runs the agent of the version /opt/fleetbus/current names, restarts it
# into a new version when it updates itself, and rolls back one that is not healthy.
ExecStart={sys.executable} -m updater.launcher --root /opt/fleetbus -- -c {config_path}
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM (and SIGHUP) to the launcher only, which passes it to the agent: it stops taking
# jobs, lets running ones finish within its shutdown_grace_s, and records the rest as
# abandoned. Then systemd kills what is left.
KillMode=mixed
# The agent gives each job a cgroup of its own under this unit's (so nothing a job starts
# outlives it): systemd must leave that subtree to the agent.
Delegate=yes
TimeoutStopSec=90
Restart=on-failure
RestartSec=2s
# Root: run_as_mode = "root" runs each job as the user it names (after PAM). For
# run_as_mode = "self", make this an unprivileged account that owns the data_dir.
User=root
# A job cannot gain privileges its user does not have (no setuid sudo inside a job):
# who a job runs as is decided by the trust file and PAM, not by the job. (In "self"
# mode with sealed passwords, pam_unix needs its setuid helper: remove this line.)
NoNewPrivileges=yes
# Not ProtectSystem= nor PrivateTmp=: the agent exists to run administrative jobs
# (package installs, configuration under /etc, files left in /tmp for others), which
# a read-only /usr or a private /tmp would break.

[Install]
WantedBy=multi-user.target
"""


def pam_service() -> str:
    """The PAM service file: authentication and account checks only (after JAMS agentd)."""
    return """\
# PAM service "fleet-agentd", written by `fleet-agentd -P`; install as /etc/pam.d/fleet-agentd.
# The agent authenticates a user before running a job as them. It uses only the auth
# phase (is the password right?) and the account phase (is the account usable: not
# locked, not expired?). No nullok: an empty password never authenticates.
auth     required   pam_unix.so
account  required   pam_unix.so
"""


def write_text(target: str, text: str, *, mode: int = 0o644) -> None:
    """Write ``text`` to a file, or to stdout for ``-``. Never overwrites a file.

    Raises:
        UsageError: the file exists or cannot be written.
    """
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
        path.chmod(mode)
    except FileExistsError:
        raise UsageError(f"{path} exists already; not overwriting it") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


def _require_systemd() -> str:
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        raise UsageError(
            "systemd is not running on this machine; write the unit with -S FILE and "
            "install it with your init system"
        )
    return systemctl


def _systemctl(systemctl: str, *args: str) -> None:
    result = subprocess.run([systemctl, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FleetError(f"systemctl {' '.join(args)} failed: {result.stderr.strip()}")


def install_service(config_path: Path) -> None:
    """Install, enable and start the unit.

    Raises:
        UsageError: systemd is absent, or the unit exists.
    """
    systemctl = _require_systemd()
    write_text(str(UNIT_PATH), systemd_unit(config_path))
    _systemctl(systemctl, "daemon-reload")
    _systemctl(systemctl, "enable", "--now", UNIT_NAME)


def remove_service() -> None:
    """Stop, disable and remove the unit.

    Raises:
        UsageError: systemd is absent, or the unit is not installed.
    """
    systemctl = _require_systemd()
    if not UNIT_PATH.exists():
        raise UsageError(f"{UNIT_PATH} is not installed")
    _systemctl(systemctl, "disable", "--now", UNIT_NAME)
    UNIT_PATH.unlink()
    _systemctl(systemctl, "daemon-reload")
