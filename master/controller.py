"""The master: folds the log into projections, watches presence, answers queries.

On start it loads the newest snapshot and replays only the tail; it is ``ready`` once it
has caught up with the log. Live, it verifies every event's signature once (on ingest),
snapshots every N events or T seconds, publishes signed checkpoints of the log's hash
chain, records configured agents in the log, and notices agents whose heartbeat expired:
it records them offline and, past a grace, records their running jobs ``abandoned``,
once (the agent, when it returns, sees that record and does not add its own). Every
event, caught up on or live, passes :mod:`ledger.gate` (signature, who may say what,
one outcome per job) before it is folded; what fails is counted, never folded.

Every task the master runs (the fold, presence, queries, rollouts, snapshots,
checkpoints, grace timers, reloads) is owned by its :class:`~bus.tasks.TaskOwner`, so
stopping cancels and awaits them all. Parts that react to the log or run on a period
plug in through :meth:`Master.on_folded` and :meth:`Master.every`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bus import Bus, FleetError, Signer, sign_envelope
from bus.log import LogRecord, last_seq
from bus.publish import PublishResult
from bus.retry import Backoff
from bus.tasks import TaskOwner, first_of, wait_any
from ledger.chain import Chain
from ledger.driver import UNDECODABLE, Entry, Problem, RecordDriver
from ledger.gate import guard
from ledger.projection import Projection
from ledger.snapshot import load_snapshot
from ledger.verify import signature_check
from master.auth import THROTTLE_CAP_S, AuthService, Throttle
from master.config import MasterConfig
from master.durability import Durability
from master.ingest import follow_log
from master.leadership import Leadership
from master.observe import start_observability
from master.outcomes import Outcomes
from master.presence import GraceTimers, watch_presence
from master.queries import serve_queries
from master.registry import register_configured
from master.rollouts import steer_rollouts
from master.users import UserStore
from schemas import EventData, make_envelope

logger = logging.getLogger(__name__)

_RESTART = Backoff(initial=1.0, cap=30.0)

FoldListener = Callable[[Entry], None]
"""Called with every record the master folds, in log order, from the fold's task."""


class Master:
    """One master. ``await run()`` until :meth:`stop`."""

    def __init__(self, bus: Bus, config: MasterConfig, signer: Signer) -> None:
        self.bus = bus
        self.config = config
        self.signer = signer
        self.subjects = bus.subjects
        self.driver = RecordDriver(
            Projection(), Chain(), checks=[signature_check()], on_problem=self._on_problem
        )
        # Every event is checked, caught up on or live, and what fails is counted, not
        # folded: `fleet replay` folds the same log the same way and must agree.
        self.policy = guard(self.driver, config.principals(signer.public_key), signatures=False)
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.off_duty = asyncio.Event()
        """Set while this master does not act as the active one (and once it stops)."""
        self.off_duty.set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.leadership = Leadership(self)
        self.unverified = 0
        self.tasks = TaskOwner("master")
        self.durability = Durability(self)
        self.grace_timers = GraceTimers(self)
        self.auth = AuthService(
            bus,
            UserStore(config.users_path),
            signer,
            config.id,
            Throttle(first=config.auth_throttle_s, cap=max(THROTTLE_CAP_S, config.auth_throttle_s)),
            fence=self.leadership.check,
            unsupported=self._unsupported,
        )
        self.rollout_changed = asyncio.Event()
        self._listeners: list[FoldListener] = [self._note_rollout_change]
        self._periodic: list[tuple[float, Callable[[], Awaitable[None]], str]] = []
        self.outcomes = Outcomes.for_master(self)

    @property
    def projection(self) -> Projection:
        return self.driver.projection

    def _unsupported(self, agent: str) -> str | None:
        """Why ``agent`` is unsupported (its last ``agent.unsupported`` since it came
        online or updated), or None."""
        view = self.projection.agents.get(agent)
        return None if view is None else view.unsupported

    @property
    def chain(self) -> Chain:
        assert self.driver.chain is not None
        return self.driver.chain

    # --- hooks ----------------------------------------------------------------------------

    def on_folded(self, listener: FoldListener) -> None:
        """Call ``listener`` with every record folded from now on (keep it quick and pure;
        spawn a task on :attr:`tasks` for I/O)."""
        self._listeners.append(listener)

    def every(self, period_s: float, action: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``action`` every ``period_s`` seconds once the master is ready, until it
        stops. A failing run is logged; the next still comes."""
        self._periodic.append((period_s, action, name))

    # --- control --------------------------------------------------------------------------

    def stop(self) -> None:
        """Snapshot and stop. Safe from a signal handler."""
        self.stopping.set()
        self.off_duty.set()

    def reload(self, config: MasterConfig) -> None:
        """Take a new registry and settings without dropping any state (in an owned task;
        safe from a signal handler)."""
        self.config = config
        self.policy.principals = config.principals(self.signer.public_key)
        self.policy.learn_from_projection()
        if self.acting:
            try:
                self.tasks.spawn(self._reload(config), "reload")
            except RuntimeError:
                logger.warning("not reloading: the master is stopping")

    async def _reload(self, config: MasterConfig) -> None:
        try:
            await register_configured(self)
        except FleetError as exc:
            logger.error("reload failed: %s", exc)
            return
        logger.info("configuration reloaded (hash %s)", config.config_hash()[:12])

    async def emit(
        self,
        data: EventData,
        subject: str,
        *,
        expected_last_subject_seq: int | None = None,
        event_id: str | None = None,
    ) -> PublishResult:
        """Sign and store an event as the master.

        Raises:
            NotActiveError: this master is not the active one (it never publishes then).
            FleetError: as :meth:`bus.Bus.publish_event`.
        """
        left = self.leadership.check()
        envelope = sign_envelope(
            make_envelope(data, source=self.config.id, subject=subject, event_id=event_id),
            self.signer,
        )
        return await self.bus.publish_event(
            envelope, expected_last_subject_seq=expected_last_subject_seq, deadline_s=left
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Fold the log and, while holding the master lease, serve, until :meth:`stop`."""
        snapshot = await load_snapshot(self.bus)
        if snapshot is not None:
            self.driver.projection, self.driver.chain = snapshot.projection, snapshot.chain
            self.policy.learn_from_projection()
            logger.info("loaded the snapshot at seq %d", snapshot.seq)
        async with self.tasks:
            await start_observability(self)
            fold = self.tasks.spawn(follow_log(self), "fold")
            beat = self.tasks.spawn(self.leadership.heartbeat(self.stopping), "heartbeat")
            lead = self.tasks.spawn(self._lead(), "leadership")
            shields = [asyncio.shield(t) for t in (lead, fold, beat)]
            ended = await first_of(*shields)
            if ended is not shields[0]:
                if not self.stopping.is_set():
                    logger.error("! a part of the master ended; stopping")
                self.stop()
                await lead  # steps down first: snapshot, lease
            if ended is not None:
                ended.result()  # a part failed: say why
        logger.info("← master stopped at seq %d", self.projection.seq)

    async def _lead(self) -> None:
        """Stand by until the lease is ours, act while it is, and again, until stopped."""
        while not self.stopping.is_set():
            if not await self.leadership.take(self.stopping):
                return
            try:
                await self._act()
            finally:
                self.off_duty.set()
                self.grace_timers.cancel_all()
                if self.ready.is_set() and self.leadership.remaining() > 0:
                    # Only while the lease is surely ours: no two masters write snapshots.
                    await self.durability.snapshot()
                await self.leadership.step_down()

    async def _act(self) -> None:
        """Serve as the active master until stopped or the lease is lost."""
        self.off_duty.clear()
        async with TaskOwner("active") as duty:
            try:
                keeper = duty.spawn(self.leadership.hold(self.off_duty), "lease")
                # Queries are answered while catching up too (``status`` says not ready).
                queries = duty.spawn(self._keep_running("queries", serve_queries), "queries")
                caught_up = await first_of(
                    self.stopping.wait(), asyncio.shield(keeper), self._catch_up_now()
                )
                if caught_up is None or self.stopping.is_set() or keeper.done():
                    return
                caught_up.result()
                await self._serve(duty, keeper, queries)
            finally:
                self.off_duty.set()

    async def _catch_up_now(self) -> None:
        """Wait until everything stored now is folded: what the master before us
        published is known before we act (it stopped before our lease could start)."""
        await self.ready.wait()
        while True:
            try:
                target = await last_seq(self.bus, self.subjects.events_stream)
                break
            except FleetError as exc:
                logger.warning("! reading the log's end: %s", exc)
                await wait_any(self.stopping, timeout=1.0)
        await self.folded_through(target)

    async def folded_through(self, seq: int) -> None:
        """Return once the fold has reached ``seq``."""
        if self.projection.seq >= seq:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, waiter))
        try:
            await waiter
        finally:
            self._waiters.remove((seq, waiter))

    async def _serve(self, duty: TaskOwner, *started: asyncio.Task[None]) -> None:
        logger.info(
            "→ master active at seq %d (%d events)", self.projection.seq, self.projection.events
        )
        try:
            await register_configured(self)
        except FleetError as exc:
            logger.error("! recording the configured agents: %s", exc)
        parts = [
            *started,
            duty.spawn(self._keep_running("presence", self._watch_presence), "presence"),
            duty.spawn(steer_rollouts(self), "rollouts"),
            duty.spawn(self.durability.tick(), "durability"),
        ]
        for period, action, name in self._periodic:
            parts.append(duty.spawn(self._repeat(period, action, name), name))
        self.rollout_changed.set()
        # Runs until told to stop or the lease is lost (the first part, the keeper, ends).
        # Parts outlive the bus's troubles (they are restarted); one that ends anyway has
        # a bug: the master stops rather than run half working, and says why.
        shields = [asyncio.shield(p) for p in parts]
        ended = await first_of(self.stopping.wait(), *shields)
        if ended is None or self.stopping.is_set() or ended is shields[0]:
            return
        logger.error("! a part of the master ended; stopping")
        self.stop()
        ended.result()

    @property
    def acting(self) -> bool:
        """Serving as the active master now (the lease held, caught up, not stopping)."""
        return self.leadership.active and not self.off_duty.is_set() and self.ready.is_set()

    async def _keep_running(self, name: str, part: Callable[[Master], Awaitable[None]]) -> None:
        """Run ``part`` until the master stops acting, again after a pause whenever the
        bus fails it (a lost connection, a timeout)."""
        attempt = 0
        while not self.off_duty.is_set():
            try:
                await part(self)
            except FleetError as exc:
                why = str(exc)
            else:
                why = "it ended"
            if self.off_duty.is_set():
                return
            delay = _RESTART.delay(attempt)
            attempt += 1
            logger.error("! %s: %s; again in %.1fs", name, why, delay)
            await wait_any(self.off_duty, timeout=delay)

    @staticmethod
    async def _watch_presence(master: Master) -> None:
        await watch_presence(master, master.grace_timers)

    async def _repeat(
        self, period: float, action: Callable[[], Awaitable[None]], name: str
    ) -> None:
        while not await wait_any(self.off_duty, timeout=period):
            try:
                await action()
            except FleetError as exc:
                logger.error("! %s: %s", name, exc)

    # --- folding --------------------------------------------------------------------------

    def fold(self, record: LogRecord) -> None:
        """Fold one record read from the log (the fold task's only entry point)."""
        if record.seq <= self.projection.seq:
            return  # already in the snapshot, or delivered again after a reconnect
        entry = self.driver.feed(record)
        for listener in self._listeners:
            listener(entry)
        self.durability.folded(entry)
        for seq, waiter in self._waiters:
            if seq <= record.seq and not waiter.done():
                waiter.set_result(None)

    def caught_up(self) -> None:
        """The fold has read everything stored when it started: serve from now on."""
        if not self.ready.is_set():
            self.ready.set()

    def _note_rollout_change(self, entry: Entry) -> None:
        if entry.envelope is not None and entry.envelope.type.startswith(("update.", "settings.")):
            self.rollout_changed.set()

    def _on_problem(self, problem: Problem) -> None:
        if problem.kind == UNDECODABLE:
            logger.warning("! event at %s", problem)
        else:
            self.unverified += 1
            logger.warning("! event at %s: not folded", problem)
