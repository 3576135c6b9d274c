"""``fleet-agentd --simulate N``: N agent identities in one process, for benchmarks and
large-fleet tests.

Each identity is a whole :class:`~agentd.agent.Agent`, the daemon's own code path, with
its own id (``<id>-0001`` …), data directory under the configured ``data_dir`` (key,
journal, seals), presence, control subject and connection. Its own connection, because
the server's permissions are per key: under the generated least-privilege configuration
each simulated agent may do exactly what a real one with its key may. What is shared is
the process: the event loop, the log, the pid file. Simulated agents do not update
themselves and serve no ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from agentd.agent import Agent
from agentd.config import AgentConfig
from agentd.identity import ensure_identity
from bus import Bus, FleetError, UsageError
from bus.daemon_shell import connect_unless_stopped, wait_for_storage
from bus.tasks import first_of

logger = logging.getLogger(__name__)

MAX_SIMULATED = 100_000
STARTING_AT_ONCE = 64
"""Identities starting together (connect, storage check, first catch-up); the rest wait.
Thousands connecting at once in one event loop miss the 2 s connect timeout by the
thousand, retry, and keep the server and this loop busy with handshakes that fail."""
STARTING_WITHIN_S = 30.0


def simulated_id(base: str, n: int) -> str:
    """The id of the ``n``-th (from 1) simulated identity: ``<base>-0001``."""
    return f"{base}-{n:04d}"


def simulated_configs(config: AgentConfig, count: int) -> list[AgentConfig]:
    """The configuration of each of ``count`` simulated identities: the given one with its
    own id and data directory (``<data_dir>/<id>``), its key in there, no metrics port.

    Raises:
        UsageError: ``count`` is out of range, or an explicit ``nkey_file`` would make
            every identity the same.
    """
    if not 1 <= count <= MAX_SIMULATED:
        raise UsageError(f"--simulate takes 1 to {MAX_SIMULATED} identities, not {count}")
    if config.nkey_file is not None:
        raise UsageError("--simulate gives each identity its own key: leave nkey_file unset")
    out = []
    for n in range(1, count + 1):
        agent_id = simulated_id(config.id, n)
        out.append(
            config.model_copy(
                update={
                    "id": agent_id,
                    "data_dir": config.data_dir / agent_id,
                    "metrics_listen": "",
                    "auto_update": False,
                }
            )
        )
    # Validated as a whole config each (the id must be a valid, unreserved agent id).
    return [AgentConfig.model_validate(c.model_dump()) for c in out]


async def serve_simulated(config: AgentConfig, count: int) -> None:
    """Run ``count`` simulated agents until SIGTERM/SIGINT; each drains as a daemon does."""
    configs = simulated_configs(config, count)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        logger.info("→ simulating %d agents (%s … %s)", count, configs[0].id, configs[-1].id)
        starting = asyncio.Semaphore(STARTING_AT_ONCE)
        async with asyncio.TaskGroup() as tg:
            for one in configs:
                tg.create_task(_serve_one(one, stop, starting), name=f"agent {one.id}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    logger.info("← %d simulated agents stopped", count)


async def _serve_one(config: AgentConfig, stop: asyncio.Event, starting: asyncio.Semaphore) -> None:
    """One identity's life: connect with its own key, wait for storage, run the agent.

    ``starting`` is held from connecting until the agent has caught up once (or stopped).
    """
    signer = ensure_identity(config)
    async with contextlib.AsyncExitStack() as started:
        await started.enter_async_context(starting)
        bus = await connect_unless_stopped(config.connect_settings(), stop)
        if bus is None:
            return

        async def presence(b: Bus) -> object:
            return await b.kv(b.subjects.presence_bucket)

        async with bus:
            if not await wait_for_storage(bus, stop, presence):
                return
            agent = Agent(bus, config, signer)
            running = asyncio.create_task(agent.run(), name=f"agent {config.id}")
            stopper = asyncio.create_task(stop.wait(), name=f"stop {config.id}")
            try:
                # An identity that cannot catch up (retrying) lets the next one start
                # after a while rather than hold its place for ever.
                await first_of(
                    agent.intake.caught_up.wait(),
                    asyncio.shield(running),
                    stop.wait(),
                    timeout=STARTING_WITHIN_S,
                )
                await started.aclose()  # the next identity may start
                await asyncio.wait((running, stopper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                agent.stop()
                stopper.cancel()
                await asyncio.gather(stopper, return_exceptions=True)
                try:
                    await running
                except FleetError as exc:
                    # One identity refused (a key the server does not know, say) is said
                    # loudly; it does not take the other simulated agents down with it.
                    logger.error("! simulated agent %s stopped: %s", config.id, exc)
