"""The fold, pure: snapshot plus tail equals full replay, for any event sequence."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from samples import sample_data, subject_for

from bus.codec import encode_envelope
from ledger.chain import Chain
from ledger.projection import Projection, differences
from ledger.snapshot import decode_snapshot, encode_snapshot
from schemas import (
    AgentOffline,
    AgentOnline,
    AgentRegistered,
    ArgvCommand,
    Event,
    EventData,
    JobCancelRequested,
    JobFinished,
    JobRequest,
    JobStarted,
    JobSubmitted,
    UpdateAnnounced,
    UpdateApplied,
    UpdateFailed,
    default_registry,
    make_envelope,
)

JOBS = [f"01JB3Z00000000000000000{n:03d}" for n in range(6)]
AGENTS = ["a1", "a2", "a3"]
KEY = "UCXNMSR5ZJQJH2XSTTJQIRMMCSRHKQR5LXDJQFGQ4RUEPT3QEWM2HH2L"
STATUSES = ["succeeded", "failed", "timed_out", "cancelled", "expired", "rejected", "abandoned"]

job = st.sampled_from(JOBS)
agent = st.sampled_from(AGENTS)
event_data = st.one_of(
    st.builds(
        lambda j, a: JobSubmitted(
            job_id=j,
            agent=a,
            request=JobRequest(command=ArgvCommand(argv=["x"])),
            submitted_by="op",
        ),
        job,
        agent,
    ),
    st.builds(lambda j, a: JobStarted(job_id=j, agent=a, pid=7, effective_user="u"), job, agent),
    st.builds(
        lambda j, a, s, c: JobFinished(job_id=j, agent=a, status=s, exit_code=c),
        job,
        agent,
        st.sampled_from(STATUSES),
        st.integers(0, 3),
    ),
    st.builds(lambda j, a: JobCancelRequested(job_id=j, agent=a, requested_by="op"), job, agent),
    st.builds(lambda a: AgentOnline(agent=a, version="1", host="h"), agent),
    st.builds(lambda a: AgentOffline(agent=a, reason="gone"), agent),
    st.builds(lambda a: AgentRegistered(agent=a, public_key=KEY), agent),
    st.builds(lambda v: UpdateAnnounced(version=v), st.sampled_from(["1", "2"])),
    st.builds(lambda a: UpdateApplied(version="2", agent=a, previous="1"), agent),
    st.builds(lambda a: UpdateFailed(version="2", agent=a, stage="verify", reason="x"), agent),
)


def as_events(datas: list[EventData]) -> list[tuple[int, bytes, Event[EventData]]]:
    out = []
    for seq, data in enumerate(datas, 1):
        envelope = make_envelope(data, source="p", subject=subject_for(data), ts=seq * 1000)
        decoded = default_registry.decode(envelope)
        assert isinstance(decoded, Event)
        out.append((seq, encode_envelope(envelope), decoded))
    return out


def fold(
    events: list[tuple[int, bytes, Event[EventData]]],
    start: Projection | None = None,
    chain: Chain | None = None,
) -> tuple[Projection, Chain]:
    projection, chain = start or Projection(), chain or Chain()
    for seq, raw, event in events:
        projection.apply(seq, event)
        chain.add(raw)
    return projection, chain


@settings(max_examples=200, deadline=None)
@given(st.lists(event_data, max_size=60), st.data())
def test_snapshot_plus_tail_equals_full_replay(datas: list[EventData], draw: st.DataObject) -> None:
    events = as_events(datas)
    full, full_chain = fold(events)
    cut = draw.draw(st.integers(0, len(events)))
    head, head_chain = fold(events[:cut])
    snapshot = decode_snapshot(encode_snapshot(head, head_chain))  # through the real bytes
    resumed, resumed_chain = fold(events[cut:], snapshot.projection, snapshot.chain)
    assert differences(full, resumed) == []
    assert resumed.to_state() == full.to_state()
    assert resumed_chain.value == full_chain.value


def test_first_terminal_status_wins_and_transitions_are_kept() -> None:
    j, a = JOBS[0], "a1"
    datas: list[EventData] = [
        AgentOnline(agent=a, version="1", host="h"),
        JobStarted(job_id=j, agent=a, pid=1, effective_user="u"),
        JobFinished(job_id=j, agent=a, status="abandoned"),
        JobFinished(job_id=j, agent=a, status="succeeded"),
        AgentOffline(agent=a, reason="x"),
        AgentOnline(agent=a, version="2", host="h"),
    ]
    projection, _ = fold(as_events(datas))
    assert projection.jobs[j].status == "abandoned"
    assert projection.agents[a].running == []
    assert [online for _, online in projection.agents[a].transitions] == [True, False, True]
    assert projection.agents[a].version == "2"


def test_differences_are_readable() -> None:
    a, _ = fold(as_events(sample_data()[:4]))
    b = Projection.from_state(a.to_state())
    assert differences(a, b) == []
    b.jobs[JOBS[0]] = b.jobs.pop(next(iter(b.jobs)))
    lines = differences(a, b)
    assert any("only in the first" in line for line in lines)
    assert any("only in the second" in line for line in lines)
