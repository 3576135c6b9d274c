"""The master's fold task: read the event log in order and fold every record.

It reads from just after what the master already holds (its snapshot's sequence), so a
restart replays only the tail; it says when it has caught up with what was stored at
start, and then keeps following. The bus reopens a reader it lost (a server restart, a
timeout) from the record after the last one folded: nothing is read twice or skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bus.log import follow

if TYPE_CHECKING:
    from master.controller import Master

_WAIT_S = 1.0
"""How long one read waits for new events; the stop flag is looked at in between."""


async def follow_log(master: Master) -> None:
    """Fold the log into ``master`` until it stops."""
    subjects = master.subjects
    async for batch in follow(
        master.bus,
        subjects.events_stream,
        subjects.all_events,
        start_seq=master.projection.seq + 1,
        wait_s=_WAIT_S,
        stop=master.stopping,
    ):
        for record in batch.records:
            master.fold(record)
        if batch.caught_up:
            master.caught_up()
