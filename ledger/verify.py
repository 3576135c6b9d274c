"""Checks for :class:`~ledger.driver.RecordDriver`: signatures, trust, the hash chain.

The master runs :func:`signature_check` on every live event; ``fleet audit --verify``
runs it with the trusted keys, plus :class:`CheckpointCheck` and, at the end of the log,
:func:`check_end`.
"""

from __future__ import annotations

from collections.abc import Mapping

from bus import SignatureError, verify_envelope
from ledger.chain import Chain
from ledger.driver import Check, Entry, Problem
from schemas import AuditCheckpoint, Event


def signature_check(trusted: Mapping[str, str] | None = None) -> Check:
    """A check that every event is signed, for the subject it is stored on, and, given
    ``trusted`` (public key → principal), by a trusted key of the principal it names."""

    def check(entry: Entry) -> Problem | None:
        envelope, seq = entry.envelope, entry.seq
        assert envelope is not None
        try:
            signer = verify_envelope(envelope, subject=entry.record.subject)
        except SignatureError as exc:
            kind = "unsigned" if not envelope.signed else "forged"
            return Problem(seq, kind, f"{envelope.type} by {envelope.source}: {exc}")
        if trusted is None:
            return None
        owner = trusted.get(signer)
        if owner is None:
            return Problem(
                seq,
                "unknown signer",
                f"{envelope.type} by {envelope.source}: {signer[:12]}… is not trusted",
            )
        if owner != envelope.source:
            return Problem(
                seq,
                "impersonation",
                f"{envelope.type}: claims {envelope.source}, signed by {owner}",
            )
        return None

    return check


class CheckpointCheck:
    """Compares each ``audit.checkpoint`` with the chain recomputed from the log."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain

    def __call__(self, entry: Entry) -> Problem | None:
        event = entry.event
        if not isinstance(event, Event) or not isinstance(event.data, AuditCheckpoint):
            return None
        checkpoint = event.data
        before = self.chain.count - 1  # the chain already covers the checkpoint itself
        ours = self.chain.at(checkpoint.count) if checkpoint.count <= before else None
        if ours is None:
            text = f"checkpoint covers {checkpoint.count} events, the log has {before} before it"
            return Problem(entry.seq, "chain", f"{text}: events were removed or added")
        if ours.hex() != checkpoint.chain:
            text = f"checkpoint of {checkpoint.count} events does not match the log"
            return Problem(
                entry.seq, "chain", f"{text}: an event was removed, altered or reordered"
            )
        return None


def check_end(chain: Chain, recorded: AuditCheckpoint | None) -> Problem | None:
    """Compare the log's length with the master's latest checkpoint kept outside the log."""
    if recorded is not None and recorded.count > chain.count:
        text = f"the master checkpointed {recorded.count} events, the log holds {chain.count}"
        return Problem(0, "truncated", f"{text}: cut short")
    return None
