"""``fleet-agentd-launcher``: run the agent of the ``current`` version; restart, check, roll back.

The agent never replaces itself. To update, it installs the new version beside the
running one, writes ``pending.json``, switches ``current`` and exits with
:data:`~updater.handoff.RESTART_EXIT`. This launcher then starts the new version and
waits for it to say it is healthy; if it exits first or stays silent past the deadline,
the launcher stops it, points ``current`` back at the previous version, records why in
``rolled_back.json`` and starts the previous version, which reports the rollback.

Deliberately small and synchronous, with no connection of its own: it is the one piece an
update does not replace (it runs from the base installation), so it must rarely need to
change. Everything it shares with the agent is in :mod:`updater.handoff` and the files of
:mod:`updater.install`.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import FrameType

from updater.handoff import READY_FD_ENV, READY_LINE, RESTART_EXIT, ROOT_ENV
from updater.install import InstallRoot, Pending

logger = logging.getLogger("fleet-agentd-launcher")

_STOP_GRACE_S = 30.0


def default_root() -> Path:
    """``/opt/fleetbus`` for root; ``$XDG_DATA_HOME/fleetbus/agent-install`` otherwise."""
    if os.geteuid() == 0:
        return Path("/opt/fleetbus")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return Path(base) / "fleetbus" / "agent-install"


class Launcher:
    """Runs the agent until it exits for good; see the module docstring."""

    def __init__(self, root: Path, agent_args: list[str], health_timeout_s: float) -> None:
        self.root = InstallRoot(root)
        self.agent_args = agent_args
        self.health_timeout_s = health_timeout_s
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        self.root.root.mkdir(parents=True, exist_ok=True)
        while True:
            version_dir = self.root.current_dir()
            version = self.root.version_of(version_dir) or "base"
            pending = self.root.pending()
            if pending is not None and pending.version != version:
                logger.warning(
                    "pending update to %s, but current is %s; dropping it", pending.version, version
                )
                self.root.clear_pending()
                pending = None
            ready_r = self._start(version_dir, version)
            if pending is not None:
                healthy, reason = self._await_health(ready_r)
                if not healthy and not self.stopping:
                    self._stop_child()
                    self._roll_back(pending, reason)
                    continue
                if healthy:
                    logger.info(
                        "%s is healthy; the update from %s is done",
                        version,
                        pending.previous_version,
                    )
                    self.root.clear_pending()
            else:
                os.close(ready_r)
            code = self._wait_child()
            if code == RESTART_EXIT and not self.stopping:
                logger.info("the agent asked to be restarted")
                continue
            # A child killed by a signal: exit as a shell would report it.
            return code if code >= 0 else 128 - code

    def _start(self, version_dir: Path | None, version: str) -> int:
        ready_r, ready_w = os.pipe()
        env = dict(os.environ)
        env[ROOT_ENV] = str(self.root.root)
        env[READY_FD_ENV] = str(ready_w)
        site = self.root.site_of(version_dir)
        if site is not None:
            # Only the version's own directory: nothing of the launcher's PYTHONPATH may
            # shadow the code being started. Dependencies not bundled come from the base.
            env["PYTHONPATH"] = str(site)
        # -P: the working directory must not shadow the version's code (an `agentd`
        # directory where the launcher was started would otherwise win over PYTHONPATH).
        argv = [sys.executable, "-P", "-m", "agentd", *self.agent_args]
        logger.info("starting agent version %s", version)
        self.child = subprocess.Popen(argv, env=env, pass_fds=(ready_w,))
        os.close(ready_w)
        return ready_r

    def _await_health(self, ready_r: int) -> tuple[bool, str]:
        deadline = time.monotonic() + self.health_timeout_s
        received = b""
        with selectors.DefaultSelector() as sel:
            sel.register(ready_r, selectors.EVENT_READ)
            try:
                while READY_LINE not in received:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False, f"not healthy within {self.health_timeout_s:g}s"
                    if not sel.select(remaining):
                        continue
                    chunk = os.read(ready_r, 64)
                    if not chunk:
                        code = self._wait_child(timeout=5.0)
                        return False, f"the new agent exited with code {code} before it was healthy"
                    received += chunk
            finally:
                os.close(ready_r)
        return True, ""

    def _wait_child(self, timeout: float | None = None) -> int:
        assert self.child is not None
        try:
            return self.child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1

    def _stop_child(self) -> None:
        assert self.child is not None
        if self.child.poll() is not None:
            return
        self.child.terminate()
        try:
            self.child.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()

    def _roll_back(self, pending: Pending, reason: str) -> None:
        logger.error(
            "update to %s failed: %s; restoring %s",
            pending.version,
            reason,
            pending.previous_version,
        )
        previous = Path(pending.previous) if pending.previous else None
        self.root.write_rolled_back(pending, reason)
        self.root.switch(previous)
        self.root.clear_pending()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-agentd-launcher",
        description=(
            "Run fleet-agentd from the version its install root's 'current' link names, "
            "restart it into a new version when it asks, and roll back to the previous "
            "version when the new one is not healthy in time. Arguments after -- go to "
            "fleet-agentd (e.g. -- -c /etc/fleetbus/agentd.toml)."
        ),
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"install root holding versions/ and current (env {ROOT_ENV}; "
        "default /opt/fleetbus as root, else ~/.local/share/fleetbus/agent-install)",
    )
    parser.add_argument(
        "--health-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a new version has to report healthy before it is rolled back (default 60)",
    )
    parser.add_argument("agent_args", nargs="*", help="arguments for fleet-agentd, after --")
    parser.add_argument(
        "-V",
        "--version",
        action="version",
        version=f"%(prog)s {_version()}",
        help="print the launcher's version and exit",
    )
    return parser


def _version() -> str:
    # Not bus.command's helper: the launcher stays independent of the agent's packages.
    try:
        return metadata.version("fleetbus")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    root = args.root or (Path(os.environ[ROOT_ENV]) if os.environ.get(ROOT_ENV) else default_root())
    if args.health_timeout <= 0:
        print("fleet-agentd-launcher: --health-timeout must be positive", file=sys.stderr)
        return 2
    return Launcher(root.resolve(), list(args.agent_args), args.health_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
