"""Who may call this agent's control operations: signed, fresh, once, and granted.

Control requests (``status``, ``config-get``, ``config-set``, ``log``, ``restart``) must
be signed by a key (:func:`bus.signing.sign_control`) that the agent's trust file grants
that operation (:func:`agentd.trust.control_refusal`). A signed request is good once,
within the replay window, on the subject it was signed for.
"""

from __future__ import annotations

import time

from agentd.trust import TrustFile, control_refusal
from bus import SignatureError
from bus.signing import verify_control
from schemas import ControlRequest


class ControlAuth:
    """Decides control requests; remembers the ids it accepted for ``window_s``."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: dict[str, int] = {}

    def refusal(
        self, trust: TrustFile | None, request: ControlRequest, subject: str, op: str
    ) -> str | None:
        """Why the request must not be answered, or None if it may (then it is used up)."""
        try:
            signer: str | None = verify_control(request, subject, window_s=self.window_s)
        except SignatureError as exc:
            if request.sig is not None:
                return f"{op} refused: {exc}"
            signer = None
        reason = control_refusal(trust, signer, op)
        if reason is not None:
            return f"{op} refused: {reason}"
        now = time.time_ns()
        self._seen = {k: t for k, t in self._seen.items() if t > now}
        assert request.id is not None
        if request.id in self._seen:
            return f"{op} refused: request {request.id} was already answered (a replay?)"
        self._seen[request.id] = now + int(2 * self.window_s * 1e9)
        return None
