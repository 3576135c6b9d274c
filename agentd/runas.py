"""Running a job as another OS user (root mode): who they are, and PAM's word on them.

PAM runs only the ``auth`` phase (is the password right?) then the ``account`` phase (may
this account log in now: not locked, not expired?), on the agent's own service; a missing
service file is an error, never a silent fall-back to ``other``. It blocks for seconds on
a failure, so callers run it off the event loop. The job's process then drops privileges
in the right order: supplementary groups, then gid, then uid.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

import pam

from agentd.jobenv import build_environment

PAM_DIR = Path("/etc/pam.d")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


class PamServiceMissing(Exception):
    """The PAM service file the agent uses is not installed."""


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str
    shell: str

    def environment(self, extra: dict[str, str], job_id: str) -> dict[str, str]:
        """A clean environment: the user's own basics, the request's, nothing of ours."""
        basics = {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": self.shell or "/bin/sh",
            "PATH": SAFE_PATH,
            "LANG": "C.UTF-8",
        }
        return build_environment(basics, extra, job_id)


def home_or_root(home: str) -> str:
    """Where a job starts by default: its home, or ``/`` for an account without one."""
    return home if os.path.isdir(home) else "/"


def lookup(user: str) -> Identity | None:
    """The account of ``user``, or None if there is none."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return Identity(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
        home=entry.pw_dir,
        shell=entry.pw_shell,
    )


def pam_allows(service: str, user: str, password: bytes) -> bool:
    """PAM ``auth`` then ``account`` for ``user`` on ``service``. Blocking.

    Raises:
        PamServiceMissing: ``/etc/pam.d/<service>`` does not exist.
    """
    if not (PAM_DIR / service).is_file():
        raise PamServiceMissing(
            f"PAM service {service} is not installed ({PAM_DIR / service}); "
            "write it with fleet-agentd -P"
        )
    handle = pam.pam()
    # resetcreds=False: authentication and account checks only, no credentials set.
    return bool(handle.authenticate(user, password, service=service, resetcreds=False))
