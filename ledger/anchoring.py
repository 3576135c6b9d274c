"""Is the log whole? Gaps, unanchored tails and the master's witness file.

Signatures and the hash chain show that what is stored was not altered, reordered or
removed *before* a checkpoint. Three things show that nothing was cut off or removed
after it:

- **gaps**: the stream numbers its messages; a sequence missing between two stored ones
  is an event removed (the stream itself denies deletes, so only the disk can do it);
- **unanchored events**: those after the newest checkpoint are covered by no signed hash
  yet. Checkpoints are frequent, so a few are normal; they are counted and said, never
  passed over in silence;
- **the witness**: the master appends every checkpoint it publishes to a file outside
  the store (``witness`` in its data directory). A log that ends before the witness's
  last checkpoint, or whose chain differs there, was cut or rewritten.

The witness file holds one JSON object per line; a torn last line (a crash mid-append)
is ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus import UsageError

WITNESS_FILE = "witness"


class WitnessEntry(BaseModel):
    """One checkpoint as the master published it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    count: int = Field(ge=0)
    """Events the checkpoint's chain covers."""
    chain: str = Field(pattern=r"^[0-9a-f]{64}$")
    through_seq: int = Field(ge=0)
    """The stream sequence of the last event covered."""
    seq: int = Field(ge=0)
    """The stream sequence of the checkpoint event itself."""

    def line(self) -> bytes:
        return (json.dumps(self.model_dump(), separators=(",", ":")) + "\n").encode()


def read_witness(path: Path) -> list[WitnessEntry]:
    """Every entry of a witness file, oldest first.

    Raises:
        UsageError: unreadable, or a line other than the last is not an entry.
    """
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise UsageError(f"cannot read the witness file {path}: {exc.strerror}") from None
    entries = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            entries.append(WitnessEntry.model_validate_json(raw))
        except ValidationError:
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                continue  # torn by a crash while appending: the entries before stand
            raise UsageError(f"{path}:{number}: not a witness entry") from None
    return entries


@dataclass
class Anchoring:
    """Follows the log in order (:meth:`saw`) and says what is not anchored or missing."""

    witness: WitnessEntry | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    """``(kind, text)`` of each problem found."""
    unanchored: int = 0
    """Events after the newest checkpoint."""
    last_seq: int = 0
    _witness_seen: bool = False

    def saw(self, seq: int, count: int, chain: bytes, *, checkpoint: bool) -> None:
        """One stored event: its stream ``seq``, the chain's ``count`` and value after it."""
        if self.last_seq and seq != self.last_seq + 1:
            missing = f"{self.last_seq + 1}" + (
                f"–{seq - 1}" if seq - 1 > self.last_seq + 1 else ""
            )
            self.problems.append(("gap", f"stream sequence {missing} missing before seq {seq}"))
        self.last_seq = seq
        self.unanchored = 0 if checkpoint else self.unanchored + 1
        w = self.witness
        if w is not None and count == w.count:
            self._witness_seen = True
            if chain.hex() != w.chain:
                self.problems.append(
                    ("witness", f"the chain after {count} events differs from the witness's")
                )

    def end(self) -> None:
        """The log read ends here."""
        w = self.witness
        if w is not None and (not self._witness_seen or self.last_seq < w.seq):
            self.problems.append(
                (
                    "truncated",
                    f"the witness holds a checkpoint of {w.count} events (seq {w.seq}); "
                    f"the log ends before it, at seq {self.last_seq}: cut short",
                )
            )
