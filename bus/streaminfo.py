"""How full a stream is: what metrics and alerts need to see a limit coming."""

from __future__ import annotations

from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import api

from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetTimeoutError
from bus.migrate import oldest_age_s


@dataclass(frozen=True, slots=True)
class StreamUsage:
    """A stream's state and limits (a limit of 0 means none)."""

    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    max_messages: int
    max_bytes: int
    max_age_s: float
    consumers: int = 0
    max_consumers: int = 0
    discard_new: bool = False
    """Full means new messages are refused (rather than the oldest removed)."""
    oldest_age_s: float | None = None
    """Age of the oldest message (None if empty, or not asked for)."""
    replicas: int = 1
    current_replicas: int | None = None
    """The leader and the replicas it sees current and online (None: not clustered).
    Fewer than a majority of ``replicas`` and the stream cannot store: its quorum is
    lost, even while its leader still answers (it steps down only some seconds later)."""

    @property
    def quorum_lost(self) -> bool:
        return self.current_replicas is not None and self.current_replicas <= self.replicas // 2


async def stream_usage(bus: Bus, stream: str, *, with_age: bool = False) -> StreamUsage:
    """Ask the server about ``stream`` (and, ``with_age``, the age of its oldest message).

    Raises:
        ConnectionFailedError: the stream does not exist or the bus is down.
        PermissionDeniedError: the server refuses this principal the stream's info.
        FleetTimeoutError: the server did not answer.
    """
    try:
        info = await bus.js.stream_info(stream)
        oldest = await oldest_age_s(bus.js, info) if with_age else None
    except nats.js.errors.NotFoundError:
        raise ConnectionFailedError(f"stream {stream} does not exist") from None
    except nats.errors.TimeoutError as exc:
        # A refused request is unanswered too: the server says so only on the side.
        refusal = bus.denial(bus.api_subject(f"STREAM.INFO.{stream}")) or bus.denial(
            bus.api_subject(f"STREAM.MSG.GET.{stream}")
        )
        if refusal is not None:
            raise refusal from exc
        raise FleetTimeoutError(f"no answer about {stream}") from exc
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"cannot read {stream}: {exc}") from exc
    state, config = info.state, info.config

    def limit(value: int | float | None) -> int:
        return int(value) if value is not None and value > 0 else 0

    return StreamUsage(
        name=stream,
        messages=int(state.messages),
        bytes=int(state.bytes),
        first_seq=int(state.first_seq),
        last_seq=int(state.last_seq),
        max_messages=limit(config.max_msgs),
        max_bytes=limit(config.max_bytes),
        max_age_s=float(config.max_age or 0),
        consumers=int(state.consumer_count or 0),
        max_consumers=limit(config.max_consumers),
        discard_new=config.discard == api.DiscardPolicy.NEW,
        oldest_age_s=oldest,
        replicas=int(config.num_replicas or 1),
        current_replicas=_current_replicas(info.cluster),
    )


def _current_replicas(cluster: api.ClusterInfo | None) -> int | None:
    if cluster is None:
        return None
    if cluster.leader is None:
        return 0
    return 1 + sum(1 for p in cluster.replicas or [] if p.current and not p.offline)
