"""Steering rollouts: carry out :func:`ledger.rollout.next_step` whenever an update or
settings event lands (a stage write in KV ``fleet-config`` and, for a halt, a signed
``update.rollout_halted``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bus import FleetError
from bus.retry import Backoff
from bus.tasks import wait_any
from ledger.rollout import next_step
from schemas import UpdateRolloutHalted
from schemas.update import RolloutStage
from updater.settings import read_settings, write_setting

if TYPE_CHECKING:
    from master.controller import Master

logger = logging.getLogger(__name__)

_BACKOFF = Backoff(initial=1.0, cap=30.0)


async def steer_rollouts(master: Master) -> None:
    """Promote canary rollouts and halt failing ones until the master stops acting."""
    failures = 0
    # Ends on the stop flag, not only on cancellation (see bus.tasks.wait_any).
    while await wait_any(master.off_duty, master.rollout_changed) and not master.off_duty.is_set():
        master.rollout_changed.clear()
        try:
            await steer_once(master)
        except FleetError as exc:
            logger.error("! rollout: %s", exc)
            master.rollout_changed.set()
            await wait_any(master.off_duty, timeout=_BACKOFF.delay(failures))
            failures += 1
        else:
            failures = 0


async def steer_once(master: Master) -> None:
    """Take the next step of the target's rollout, if there is one."""
    settings = await read_settings(master.bus)
    target = settings.target
    if target is None:
        return
    stage = settings.stage_of(target.version)
    rollout = master.projection.rollouts.get(target.version)
    step = next_step(target, stage, rollout)
    if step is None:
        return
    if step.halt_reason is not None and rollout is not None:
        logger.warning("! rollout of %s halted: %s", target.version, step.halt_reason)
        await master.emit(
            UpdateRolloutHalted(
                version=target.version,
                failures=rollout.failures_since_resume,
                max_failures=target.max_failures,
                reason=step.halt_reason,
            ),
            master.subjects.update_event(target.version, "rollout_halted"),
        )
    else:
        logger.info("→ canaries of %s are healthy; rolling out to all", target.version)
    master.leadership.check()  # a master that lost its lease writes nothing
    await write_setting(
        master.bus,
        "release.stage",
        RolloutStage(version=target.version, stage=step.stage),
        signer=master.signer,
        source=master.config.id,
        version=target.version,
        shown=step.stage,
    )
