"""Staged rollout: canaries first, the rest once they are healthy, a halt on failures.

Pure policy over the folded log; the master carries out what it returns (a stage write
in KV ``fleet-config`` and, for a halt, ``update.rollout_halted``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger.views import RolloutView
from schemas.update import ReleaseTarget, Stage


@dataclass(frozen=True)
class RolloutStep:
    """What the master should do next for the target's rollout."""

    stage: Stage
    halt_reason: str | None = None


def next_step(
    target: ReleaseTarget, stage: Stage, rollout: RolloutView | None
) -> RolloutStep | None:
    """The next stage of ``target``'s rollout, or None when it stays where it is.

    Halts when more agents failed (since the announcement or the last resume) than the
    announcement allows; promotes from ``canary`` to ``all`` once every canary applied
    the version and reported healthy.
    """
    if rollout is None or stage == "halted":
        return None
    failures = rollout.failures_since_resume
    if failures > target.max_failures:
        failed = sorted(a for a, s in rollout.agents.items() if s in ("failed", "rolled_back"))
        return RolloutStep(
            "halted",
            f"{failures} agents failed ({', '.join(failed)}), more than the "
            f"{target.max_failures} allowed",
        )
    if stage == "canary" and all(rollout.agents.get(a) == "applied" for a in target.canaries):
        return RolloutStep("all")
    return None
