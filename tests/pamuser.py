"""A throwaway local user with a password and a PAM service of its own, removed after.

Run-as tests need a real account that PAM (``pam_unix``: auth then account) accepts, and
a service file naming only that, so that nothing else on the machine decides the outcome.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Throwaway:
    """Names for one throwaway user and its PAM service (nothing is created yet)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"fleett{tag}"
        self.password = f"pw-{secrets.token_hex(8)}"
        self.service = f"fleettest-{tag}"
        self.pam_file = Path("/etc/pam.d") / self.service


@contextmanager
def throwaway_user() -> Iterator[Throwaway]:
    """Create the user (home, /bin/sh, password) and its PAM service; remove both after."""
    u = Throwaway()
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", u.name], check=True)
    try:
        subprocess.run(["chpasswd"], input=f"{u.name}:{u.password}\n", text=True, check=True)
        u.pam_file.write_text("auth required pam_unix.so\naccount required pam_unix.so\n")
        yield u
    finally:
        u.pam_file.unlink(missing_ok=True)
        subprocess.run(["userdel", "-r", u.name], capture_output=True, check=False)
