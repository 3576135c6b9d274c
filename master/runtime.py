"""The master: folds the log into projections, watches presence, answers queries.

On start it loads the newest snapshot and replays only the tail; it is ``ready`` once it
has caught up with the log. Live, it verifies every event's signature once (on ingest),
snapshots every N events or T seconds, publishes signed checkpoints of the log's hash
chain, records configured agents in the log, and notices agents whose heartbeat expired:
it records them offline and, past a grace, records their running jobs ``abandoned``,
once (the agent, when it returns, sees that record and does not add its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import api
from pydantic import ValidationError

from bus import (
    BadMessageError,
    Bus,
    FleetError,
    SignatureError,
    Signer,
    decode_envelope,
    decode_model,
    encode_model,
    sign_envelope,
    verify_envelope,
)
from bus.codec import decode_data, pack
from bus.runtime import wait_any
from master.auth import AuthFailed, AuthService
from master.chain import Chain
from master.config import MasterConfig
from master.outcomes import Outcomes
from master.projection import Projection, RolloutView
from master.rollout import next_step
from master.snapshot import load_snapshot, save_snapshot
from master.users import UserStore
from schemas import (
    AgentDeregistered,
    AgentOffline,
    AgentRegistered,
    AuditCheckpoint,
    ControlReply,
    ControlRequest,
    EventData,
    UpdateRolloutHalted,
    make_envelope,
)
from schemas.auth import AuthStart, AuthSubmit
from schemas.registry import summarize_validation_error
from schemas.update import RolloutStage
from updater.settings import read_settings, write_setting

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "audit.checkpoint"
_STATE_REPLY_LIMIT = 800 * 1024


class MasterRuntime:
    """One master. ``await run()`` until :meth:`stop`."""

    def __init__(self, bus: Bus, config: MasterConfig, signer: Signer) -> None:
        self.bus = bus
        self.config = config
        self.signer = signer
        self.projection = Projection()
        self.chain = Chain()
        self.ready = asyncio.Event()
        self.unverified = 0
        self._subjects = bus.subjects
        self._stopping = asyncio.Event()
        self._since_snapshot = 0
        self._since_checkpoint = 0
        self._last_snapshot = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._grace_timers: dict[str, asyncio.Task[None]] = {}
        self._work: set[asyncio.Task[Any]] = set()
        self.auth = AuthService(bus, UserStore(config.users_path), signer, config.id)
        self._rollout_changed = asyncio.Event()
        self._presence_watcher: Any = None
        self.outcomes = Outcomes(bus, signer, config.id, config.offline_grace_s)

    def stop(self) -> None:
        """Snapshot and stop. Safe from a signal handler."""
        self._stopping.set()

    async def reload(self, config: MasterConfig) -> None:
        """Take a new registry and settings without dropping any state."""
        self.config = config
        await self._register_configured()
        logger.info("configuration reloaded (hash %s)", config.config_hash()[:12])

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        snapshot = await load_snapshot(self.bus)
        if snapshot is not None:
            self.projection, self.chain = snapshot.projection, snapshot.chain
            logger.info("loaded the snapshot at seq %d", snapshot.seq)
        start = self.projection.seq + 1
        info = await self.bus.js.stream_info(self._subjects.events_stream)
        if info.state.last_seq < start:
            self.ready.set()
        sub = await self.bus.js.subscribe(
            self._subjects.all_events,
            cb=self._on_event,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )
        control = await self.bus.nc.subscribe(
            self._subjects.master_control_all, cb=self._on_control
        )
        try:
            await self.ready.wait()
            logger.info(
                "→ master ready at seq %d (%d events)", self.projection.seq, self.projection.events
            )
            await self._register_configured()
            async with asyncio.TaskGroup() as tg:
                outcomes = tg.create_task(
                    self.outcomes.run(self.projection, self._stopping), name="outcomes"
                )
                watcher = tg.create_task(self._watch_presence(), name="presence")
                ticker = tg.create_task(self._tick(), name="tick")
                steer = tg.create_task(self._steer_rollouts(), name="rollouts")
                self._rollout_changed.set()
                await self._stopping.wait()
                if self._presence_watcher is not None:
                    # Ends its `async for` even if a cancellation gets lost (see above).
                    with contextlib.suppress(nats.errors.Error, OSError):
                        await self._presence_watcher.stop()
                for task in (outcomes, watcher, ticker, steer):
                    task.cancel()
        finally:
            for sub_ in (sub, control):
                with contextlib.suppress(nats.errors.Error, OSError):
                    await sub_.unsubscribe()
            for task in [*self._grace_timers.values(), *self._work]:
                task.cancel()
            with contextlib.suppress(FleetError):
                await save_snapshot(self.bus, self.projection, self.chain)
        logger.info("← master stopped at seq %d", self.projection.seq)

    # --- folding ----------------------------------------------------------------------------

    async def _on_event(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.projection.seq:
            return
        self.chain.add(msg.data)
        try:
            envelope = decode_envelope(msg.data)
            event = decode_data(envelope)
        except BadMessageError as exc:
            logger.warning("! event at seq %d cannot be decoded: %s", seq, exc)
            self.projection.apply_undecodable(seq)
        else:
            if self.ready.is_set():
                self._verify(seq, envelope, msg.subject)
            self.projection.apply(seq, event)
            self.outcomes.observe(event)
            if envelope.type.startswith(("update.", "settings.")):
                self._rollout_changed.set()
        self._since_snapshot += 1
        self._since_checkpoint += 1
        if not self.ready.is_set() and msg.metadata.num_pending == 0:
            self.ready.set()
        if self.ready.is_set():
            # Counters reset here, not in the tasks: events folded before a task runs
            # must not spawn a second one.
            if self._since_checkpoint >= self.config.checkpoint_every:
                self._since_checkpoint = 0
                self._spawn(self._checkpoint())
            if self._since_snapshot >= self.config.snapshot_every:
                self._since_snapshot = 0
                self._spawn(self._snapshot())

    def _verify(self, seq: int, envelope: Any, subject: str) -> None:
        try:
            verify_envelope(envelope, subject=subject)
        except SignatureError as exc:
            self.unverified += 1
            logger.warning("! event at seq %d does not verify: %s", seq, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _snapshot(self) -> None:
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        try:
            await save_snapshot(self.bus, self.projection, self.chain)
        except FleetError as exc:
            logger.error("! snapshot failed: %s", exc)

    async def _checkpoint(self) -> None:
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        data = AuditCheckpoint(
            count=self.chain.count, through_seq=self.projection.seq, chain=self.chain.hex
        )
        try:
            await self._emit(data, self._subjects.audit_event("checkpoint"))
            kv = await self.bus.key_value(self._subjects.config_bucket)
            await kv.put(CHECKPOINT_KEY, pack(data.model_dump()))
        except (FleetError, nats.errors.Error) as exc:
            logger.error("! checkpoint failed: %s", exc)

    async def _tick(self) -> None:
        period = min(self.config.snapshot_interval_s, self.config.checkpoint_interval_s)
        # This loop and the next end on the stop flag, not only on cancellation (see
        # bus.runtime.wait_any).
        while not self._stopping.is_set():
            await wait_any(self._stopping, timeout=period)
            if self._stopping.is_set():
                return
            now = time.monotonic()
            if (
                self._since_checkpoint
                and now - self._last_checkpoint >= self.config.checkpoint_interval_s
            ):
                await self._checkpoint()
            if (
                self._since_snapshot
                and now - self._last_snapshot >= self.config.snapshot_interval_s
            ):
                await self._snapshot()

    async def _steer_rollouts(self) -> None:
        """Promote canary rollouts and halt failing ones, whenever an update event lands."""
        while not self._stopping.is_set():
            await wait_any(self._stopping, self._rollout_changed)
            if self._stopping.is_set():
                return
            self._rollout_changed.clear()
            try:
                await self._steer_once()
            except FleetError as exc:
                logger.error("! rollout: %s", exc)
                self._rollout_changed.set()
                await wait_any(self._stopping, timeout=1.0)  # a pause before retrying

    async def _steer_once(self) -> None:
        settings = await read_settings(self.bus)
        target = settings.target
        if target is None:
            return
        stage = settings.stage_of(target.version)
        rollout = self.projection.rollouts.get(target.version)
        step = next_step(target, stage, rollout)
        if step is None:
            return
        if step.halt_reason is not None and rollout is not None:
            logger.warning("! rollout of %s halted: %s", target.version, step.halt_reason)
            await self._emit(
                UpdateRolloutHalted(
                    version=target.version,
                    failures=rollout.failures_since_resume,
                    max_failures=target.max_failures,
                    reason=step.halt_reason,
                ),
                self._subjects.update_event(target.version, "rollout_halted"),
            )
        else:
            logger.info("→ canaries of %s are healthy; rolling out to all", target.version)
        await write_setting(
            self.bus,
            "release.stage",
            RolloutStage(version=target.version, stage=step.stage),
            signer=self.signer,
            source=self.config.id,
            version=target.version,
            shown=step.stage,
        )

    async def _emit(self, data: EventData, subject: str) -> None:
        envelope = make_envelope(data, source=self.config.id, subject=subject)
        await self.bus.publish_event(sign_envelope(envelope, self.signer))

    # --- registry -----------------------------------------------------------------------------

    async def _register_configured(self) -> None:
        """Record in the log every change between the config's registry and the log's."""
        for agent_id, principal in self.config.agents.items():
            view = self.projection.agents.get(agent_id)
            if (
                view
                and view.configured
                and view.public_key == principal.public_key
                and view.labels == principal.labels
            ):
                continue
            data = AgentRegistered(
                agent=agent_id, public_key=principal.public_key, labels=principal.labels
            )
            await self._emit(data, self._subjects.agent_event(agent_id, "registered"))
        for agent_id, view in self.projection.agents.items():
            if view.configured and agent_id not in self.config.agents:
                await self._emit(
                    AgentDeregistered(agent=agent_id),
                    self._subjects.agent_event(agent_id, "deregistered"),
                )

    # --- presence -------------------------------------------------------------------------------

    async def _watch_presence(self) -> None:
        kv = await self.bus.key_value(self._subjects.presence_bucket)
        watcher = self._presence_watcher = await kv.watchall()
        initial: set[str] = set()
        caught_up = False
        try:
            async for entry in watcher:
                if entry is None:
                    caught_up = True
                    # Online in the log, but no heartbeat now: expired while we were away.
                    for agent_id, view in self.projection.agents.items():
                        if view.online and agent_id not in initial:
                            await self._went_away(
                                agent_id, "heartbeat expired while the master was down"
                            )
                    continue
                if entry.operation in (None, "PUT") and entry.value:
                    if not caught_up:
                        initial.add(entry.key)
                    timer = self._grace_timers.pop(entry.key, None)
                    if timer is not None:
                        timer.cancel()
                elif entry.operation == "PURGE":
                    await self._went_away(entry.key, "heartbeat expired")
                # DEL: a clean shutdown; the agent recorded itself offline and its jobs.
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _went_away(self, agent_id: str, reason: str) -> None:
        view = self.projection.agents.get(agent_id)
        if view is None or not view.online:
            return
        try:
            await self._emit(
                AgentOffline(agent=agent_id, reason=reason, last_seen=view.last_seen),
                self._subjects.agent_event(agent_id, "offline"),
            )
        except FleetError as exc:
            logger.error("! cannot record %s offline: %s", agent_id, exc)
        if view.running and agent_id not in self._grace_timers:
            self._grace_timers[agent_id] = asyncio.create_task(self._abandon_after_grace(agent_id))

    async def _abandon_after_grace(self, agent_id: str) -> None:
        await asyncio.sleep(self.config.offline_grace_s)
        self._grace_timers.pop(agent_id, None)
        try:
            await self.outcomes.abandon(self.projection, agent_id)
        except FleetError as exc:
            logger.error("! cannot record %s's jobs abandoned: %s", agent_id, exc)

    # --- queries -----------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        op = msg.subject.rsplit(".", 1)[-1]
        try:
            request = decode_model(msg.data, ControlRequest) if msg.data else ControlRequest()
            if op.startswith("auth-"):
                data = await self._authenticate(op, request.args)
            else:
                data = self.query(op, request.args)
            reply = ControlReply(ok=True, data=data)
        except AuthFailed as exc:
            reply = ControlReply(ok=False, error=str(exc))
        except ValidationError as exc:
            reply = ControlReply(ok=False, error=f"bad request: {summarize_validation_error(exc)}")
        except (FleetError, ValueError) as exc:
            reply = ControlReply(ok=False, error=str(exc))
        if msg.reply:
            with contextlib.suppress(FleetError, nats.errors.Error):
                await msg.respond(encode_model(reply, max_size=self.bus.settings.max_msg_size))

    async def _authenticate(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "auth-salt":
            return {"salt": self.auth.salt(str(AuthStart.model_validate(args).user))}
        if op == "auth-start":
            return self.auth.start(AuthStart.model_validate(args)).model_dump()
        if op == "auth-submit":
            return (await self.auth.submit(AuthSubmit.model_validate(args))).model_dump()
        raise ValueError(f"unknown operation {op!r}")

    def query(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Answer a query from the projection (``fleet.ctl.master.<op>``)."""
        p = self.projection
        if op == "jobs":
            jobs = sorted(p.jobs.values(), key=lambda j: j.job_id)
            if args.get("agent"):
                jobs = [j for j in jobs if j.agent == args["agent"]]
            if args.get("status"):
                jobs = [j for j in jobs if j.status == args["status"]]
            limit = int(args.get("limit") or 0)
            if limit:
                jobs = jobs[-limit:]
            return {
                "jobs": [j.to_json() for j in jobs],
                "agents": [a.to_json() for a in sorted(p.agents.values(), key=lambda a: a.id)],
                "seq": p.seq,
            }
        if op == "job":
            job = p.jobs.get(str(args.get("job_id")))
            if job is None:
                raise ValueError(f"no job {args.get('job_id')}")
            return job.to_json(tail=True)
        if op == "agents":
            return {"agents": [a.to_json() for a in sorted(p.agents.values(), key=lambda a: a.id)]}
        if op == "rollouts":
            rollouts: list[RolloutView] = sorted(p.rollouts.values(), key=lambda r: r.version)
            return {"rollouts": [r.to_json() for r in rollouts]}
        if op == "state":
            state = p.to_state()
            doc: dict[str, Any] = {"seq": p.seq, "chain": self.chain.hex, "count": self.chain.count}
            if len(pack(state, max_size=2**31)) <= _STATE_REPLY_LIMIT:
                doc["state"] = state
            return doc
        if op == "status":
            return {
                "seq": p.seq,
                "events": p.events,
                "unverified": self.unverified,
                "config_hash": self.config.config_hash(),
                "ready": self.ready.is_set(),
            }
        raise ValueError(f"unknown query {op!r}; known: jobs, job, agents, rollouts, state, status")
