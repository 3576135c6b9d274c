"""The agent's side of self-update: policy, download slot, download, verify, install, switch.

One :class:`Updater` runs inside each agent runtime. It reads the fleet's settings
(KV ``fleet-config``, watched for changes) and decides, by the version policy, whether
this agent is on target, waiting (paused, halted, canaries first, no slot), or
``unsupported`` (a different version it may not or cannot update from). When it may
update, it takes one of ``update.max_concurrent`` download slots, downloads and checks
the bundle, gives the slot back, installs the new version beside the running one,
records what is pending, switches ``current`` and asks to be restarted; the launcher
does the rest (see :mod:`updater.launcher`).

A version that failed here is remembered per announcement and not tried again until a
new announcement, so a bad bundle cannot loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from bus.connection import Bus
from bus.errors import BundleError, FleetError
from bus.lease import Lease
from bus.retry import Backoff
from bus.serve import listen
from bus.tasks import TaskOwner, wait_any
from schemas import (
    AgentUnsupported,
    EventData,
    UpdateApplied,
    UpdateFailed,
    UpdateRolledBack,
    UpdateTokenAcquired,
    UpdateTokenReleased,
)
from schemas.presence import AgentState
from schemas.update import ReleaseTarget, UpdateSettings
from updater.bundle import open_bundle
from updater.download import download
from updater.install import InstallRoot, Pending, purge
from updater.settings import read_settings

logger = logging.getLogger(__name__)

_RECHECK_S = 60.0
_DOWNLOAD_BACKOFF = Backoff(initial=1.0, cap=60.0)
_TOKEN_TTL_S = 30.0

Emit = Callable[[EventData], Coroutine[Any, Any, None]]
Show = Callable[[AgentState, str | None], None]


@dataclass(frozen=True)
class UpdaterOptions:
    """What the agent's configuration says about updating."""

    version: str
    stamped: bool
    auto_update: bool
    release_keys: Collection[str]
    data_dir: Path
    root: Path | None
    rate_bytes_s: int = 0
    token_ttl_s: float = _TOKEN_TTL_S
    keep: Collection[Path] = ()
    """Files no bundle's ``purge`` may remove: what the agent's promises rest on."""


@dataclass(frozen=True)
class Decision:
    """What the policy says for this agent now."""

    state: AgentState
    text: str | None = None
    go: bool = False

    @property
    def unsupported(self) -> bool:
        return self.state == "unsupported"


def _older(a: str, b: str) -> bool:
    try:
        return Version(a) < Version(b)
    except InvalidVersion:
        return False


def _same(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


class Updater:
    """See the module docstring. ``await run()`` until cancelled."""

    def __init__(
        self,
        bus: Bus,
        agent_id: str,
        options: UpdaterOptions,
        *,
        emit: Emit,
        show: Show,
        restart: Callable[[], None] | None,
    ) -> None:
        self.bus = bus
        self.agent_id = agent_id
        self.options = options
        self.root = InstallRoot(options.root) if options.root is not None else None
        self._emit = emit
        self._show = show
        self._restart = restart
        self._changed = asyncio.Event()
        self._stopped = asyncio.Event()
        self._unsupported_said: tuple[str, str] | None = None
        # Read before the agent reports healthy: the launcher clears it once it has.
        self._pending_at_start = self.root.pending() if self.root is not None else None

    def nudge(self) -> None:
        """Re-evaluate now (the agent's configuration changed)."""
        self._changed.set()

    def stop(self) -> None:
        """Make :meth:`run` return at its next step.

        Cancelling alone is not enough: on Python 3.11 a cancellation that lands as a
        nats-py request completes can be swallowed by ``asyncio.wait_for``.
        """
        self._stopped.set()
        self._changed.set()

    # --- policy -----------------------------------------------------------------------

    def decide(self, settings: UpdateSettings) -> Decision:
        """The version policy (the RHQ prime directive: every agent runs the target)."""
        o, t = self.options, settings.target
        if t is None or _same(t.version, o.version):
            return Decision("ready")
        v = t.version

        def unsupported(why: str) -> Decision:
            return Decision("unsupported", f"runs {o.version}, target is {v}: {why}")

        failed = self.root.failed().get(v) if self.root is not None else None
        if failed is not None and failed.get("announcement") == t.announcement:
            return unsupported(
                f"{v} failed here ({failed.get('reason')}); waiting for a new announcement"
            )
        if o.stamped:
            return unsupported("version stamped by config ('version' in the agent's config)")
        if not o.auto_update:
            return unsupported("auto_update = false in the agent's config")
        if self.root is None or self._restart is None:
            return unsupported("not run by fleet-agentd-launcher, so it cannot apply updates")
        if not o.release_keys:
            return unsupported("no release_keys in the agent's config to verify bundles with")
        if not settings.enabled:
            return unsupported("updates are disabled fleet-wide (fleet update enable)")
        if _older(v, o.version) and not t.allow_downgrade:
            return unsupported("the target is older (a downgrade needs --allow-downgrade)")
        if settings.paused:
            return Decision("ready", f"update to {v} paused (fleet update resume)")
        stage = settings.stage_of(v)
        if stage == "halted":
            return Decision("ready", f"rollout of {v} halted (fleet update resume)")
        if stage == "canary" and self.agent_id not in t.canaries:
            return Decision("ready", f"waiting for the canaries of {v}")
        if settings.max_concurrent == 0:
            return Decision("ready", f"downloads of {v} refused: update.max_concurrent = 0")
        return Decision("updating", f"updating to {v}", go=True)

    # --- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Report what happened across the last restart, then follow the settings."""
        await self._report_restart()
        # Plain subscriptions to the update keys' subjects: every put is also a message
        # there. Unlike a KV watcher (an ordered consumer) they need no consumer, survive
        # reconnects and are cancelled cleanly; the bucket's other keys (the master's
        # checkpoints) do not wake every agent.
        bucket = self.bus.subjects.config_bucket
        changes = [
            await listen(self.bus, self.bus.subjects.kv_key(bucket, f"{group}.>"), self.nudge)
            for group in ("release", "update")
        ]
        try:
            while not self._stopped.is_set():
                try:
                    settings = await read_settings(self.bus)
                except FleetError as exc:
                    logger.warning("update settings: %s", exc)
                    await self._wait_change(5.0)
                    continue
                decision = self.decide(settings)
                await self._apply_decision(decision, settings.target)
                if decision.go and settings.target is not None:
                    if await self._update(settings.target):
                        return
                    continue
                await self._wait_change(_RECHECK_S)
        finally:
            for change in changes:
                await change.stop()

    async def _apply_decision(self, decision: Decision, target: ReleaseTarget | None) -> None:
        self._show(decision.state, decision.text)
        if not decision.unsupported or target is None:
            self._unsupported_said = None
            return
        key = (target.announcement, decision.text or "")
        if self._unsupported_said == key:
            return
        logger.warning("! %s", decision.text)
        await self._say(
            AgentUnsupported(
                agent=self.agent_id,
                version=self.options.version,
                target=target.version,
                reason=decision.text or "",
            )
        )
        self._unsupported_said = key

    async def _wait_change(self, timeout: float) -> None:
        if self._stopped.is_set():
            return
        await wait_any(self._changed, self._stopped, timeout=timeout)
        self._changed.clear()

    async def _say(self, data: EventData) -> None:
        try:
            await self._emit(data)
        except FleetError as exc:
            logger.error("! could not record %s: %s", data.TYPE, exc)

    # --- across a restart -------------------------------------------------------------

    async def _report_restart(self) -> None:
        if self.root is None:
            return
        rolled = self.root.take_rolled_back()
        if rolled is not None and rolled.get("version"):
            version, reason = str(rolled["version"]), str(rolled.get("reason", "unknown"))
            logger.error("! the update to %s was rolled back: %s", version, reason)
            self.root.remember_failure(version, str(rolled.get("announcement", "")), reason)
            await self._say(
                UpdateRolledBack(
                    version=version,
                    agent=self.agent_id,
                    restored=self.options.version,
                    reason=reason[:4000],
                )
            )
        pending = self._pending_at_start
        if pending is not None and _same(pending.version, self.options.version):
            logger.info("→ updated from %s to %s", pending.previous_version, pending.version)
            await self._say(
                UpdateApplied(
                    version=self.options.version,
                    agent=self.agent_id,
                    previous=pending.previous_version,
                )
            )
            manifest = self.root.manifest_of(self.root.current_dir()) or {}
            globs = [g for g in manifest.get("purge", []) if isinstance(g, str)]
            removed = purge(self.options.data_dir, globs, keep=self.options.keep)
            if removed:
                logger.info("purged what %s no longer wants: %s", pending.version, removed)
            self.root.prune()

    # --- one update -------------------------------------------------------------------

    async def _update(self, target: ReleaseTarget) -> bool:
        """Try to move to ``target``; True once a restart into it was requested."""
        assert self.root is not None
        assert self._restart is not None
        taken = await self._take_slot(target)
        if taken is None:
            return False
        lease, slot = taken
        v = target.version
        await self._say(UpdateTokenAcquired(version=v, agent=self.agent_id, slot=slot))
        try:
            # The slot is renewed while the download runs, and no longer.
            async with TaskOwner(f"update {v}") as tasks:
                tasks.spawn(lease.keep(), "download-slot")
                data = await self._download(target)
        except BundleError as exc:
            await self._fail(target, exc.stage, exc.reason)
            return False
        finally:
            # Recorded before the slot is free, so the log never shows more holders
            # than there are slots.
            await self._say(UpdateTokenReleased(version=v, agent=self.agent_id, slot=slot))
            try:
                await lease.release()
            except FleetError as exc:
                logger.warning("releasing download slot %d: %s (it expires by itself)", slot, exc)
        if data is None or self._stopped.is_set():
            return False
        try:
            bundle = open_bundle(data, self.options.release_keys)
            if not _same(bundle.version, v):
                raise BundleError(f"the bundle holds {bundle.version}, not the announced {v}")
            if _older(bundle.version, self.options.version) and not target.allow_downgrade:
                raise BundleError(f"{bundle.version} is older than {self.options.version}")
            self._show("updating", f"installing {v}")
            version_dir = await asyncio.to_thread(self.root.install, bundle)
        except BundleError as exc:
            await self._fail(target, exc.stage, exc.reason)
            return False
        except OSError as exc:
            await self._fail(target, "install", f"cannot install: {exc}")
            return False
        previous = self.root.current_dir()
        pending = Pending(
            version=bundle.version,
            previous=str(previous) if previous is not None else None,
            previous_version=self.options.version,
            announcement=target.announcement,
        )
        try:
            self.root.write_pending(pending)
            self.root.switch(version_dir)
        except OSError as exc:
            self.root.clear_pending()
            await self._fail(target, "switch", f"cannot switch to {version_dir}: {exc}")
            return False
        logger.warning("→ %s installed; draining jobs, then restarting into it", v)
        self._show("draining", f"restarting into {v}")
        self._restart()
        return True

    async def _take_slot(self, target: ReleaseTarget) -> tuple[Lease, int] | None:
        """A download slot, waiting the advertised retry-after (plus jitter) while none is
        free; None if meanwhile the policy stopped allowing this update."""
        bucket = self.bus.subjects.tokens_bucket
        while not self._stopped.is_set():
            try:
                settings = await read_settings(self.bus)
                decision = self.decide(settings)
                if not decision.go or settings.target != target:
                    return None
                n = settings.max_concurrent
                start = random.randrange(n)
                for i in range(n):
                    slot = (start + i) % n
                    lease = Lease(
                        self.bus, bucket, f"slot-{slot}", self.agent_id, self.options.token_ttl_s
                    )
                    if await lease.try_acquire():
                        return lease, slot
                delay = settings.retry_after_s * (1 + random.random() / 2)
                text = f"all {n} download slots are taken; trying again in {delay:.0f}s"
            except FleetError as exc:
                delay, text = 5.0, f"cannot take a download slot: {exc}"
            self._show("updating", text)
            await self._wait_change(delay)
        return None

    async def _download(self, target: ReleaseTarget) -> bytes | None:
        """The bundle, retried with backoff (capped at 60 s) while the bus is down; None
        if the announcement changed meanwhile."""
        attempt = 0
        while not self._stopped.is_set():
            self._show("updating", f"downloading {target.version}")
            try:
                return await download(
                    self.bus,
                    target.object_name,
                    target.sha256,
                    rate_bytes_s=self.options.rate_bytes_s,
                )
            except BundleError:
                raise
            except FleetError as exc:
                delay = _DOWNLOAD_BACKOFF.delay(attempt)
                attempt += 1
                logger.warning("download of %s: %s; again in %.1fs", target.version, exc, delay)
                self._show("updating", f"download of {target.version} interrupted; retrying")
            await wait_any(self._stopped, timeout=delay)  # backoff, ended early by a stop
            try:
                if (await read_settings(self.bus)).target != target:
                    return None
            except FleetError:
                pass
        return None

    async def _fail(self, target: ReleaseTarget, stage: str, reason: str) -> None:
        assert self.root is not None
        logger.error("! update to %s failed (%s): %s", target.version, stage, reason)
        self.root.remember_failure(target.version, target.announcement, reason)
        await self._say(
            UpdateFailed(
                version=target.version,
                agent=self.agent_id,
                stage=stage,  # type: ignore[arg-type]
                reason=reason[:4000],
            )
        )
