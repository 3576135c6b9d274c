"""Answering control requests (``fleet.ctl.<agent>.<op>``): status, config, log, restart.

Every request passes one authorisation hook, :meth:`ControlServer.authorize`, before its
operation runs: it must be signed, fresh and not replayed, by a key whose trust grant
names the operation (:class:`agentd.controlauth.ControlAuth`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agentd.config import AgentConfig
from agentd.context import AgentContext
from agentd.controlauth import ControlAuth
from agentd.logbuffer import recent_log_lines
from bus import AuthError, FleetError, decode_model, encode_model
from schemas import ControlReply, ControlRequest

logger = logging.getLogger(__name__)

OPERATIONS = ("status", "config-get", "config-set", "log", "restart")
SETTABLE = frozenset(
    {
        "max_jobs",
        "labels",
        "log_level",
        "heartbeat_s",
        "job_kill_grace_s",
        "shutdown_grace_s",
        "max_output_bytes",
        "auto_update",
    }
)


class ControlServer:
    """The agent's side of ``fleet.ctl.<agent>.*``."""

    def __init__(
        self,
        ctx: AgentContext,
        *,
        status: Callable[[], dict[str, Any]],
        reconfigure: Callable[[AgentConfig, list[str]], Awaitable[None]],
        restart: Callable[[], None] | None,
    ) -> None:
        self._ctx = ctx
        self._status = status
        self._reconfigure = reconfigure
        self._restart = restart
        self._auth = ControlAuth(ctx.config.replay_window_s)

    def authorize(self, subject: str, op: str, request: ControlRequest) -> None:
        """Raise if this request may not run ``op``: the one place control is authorised.

        Raises:
            AuthError: not allowed (answered as an error, and logged).
        """
        reason = self._auth.refusal(self._ctx.trust, request, subject, op)
        if reason is not None:
            logger.warning("! control: %s", reason)
            raise AuthError(reason)

    async def handle(self, subject: str, payload: bytes) -> bytes:
        """Answer one request; nothing a request does can end the agent."""
        op = subject.rsplit(".", 1)[-1]
        try:
            request = decode_model(payload, ControlRequest) if payload else ControlRequest()
            self.authorize(subject, op, request)
            reply = ControlReply(ok=True, data=await self._run(op, request.args))
        except (FleetError, ValueError) as exc:
            reply = ControlReply(ok=False, error=str(exc))
        except Exception:
            logger.exception("! control %s", op)
            reply = ControlReply(ok=False, error=f"{op} failed inside the agent; see its log")
        return encode_model(reply)

    async def _run(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "status":
            return self._status()
        if op == "config-get":
            return self._ctx.config.model_dump(mode="json")
        if op == "config-set":
            return await self._set_config(args)
        if op == "log":
            lines = args.get("lines", 200)
            if not isinstance(lines, int) or lines < 1:
                raise ValueError("lines must be a positive integer")
            return {"lines": recent_log_lines(lines)}
        if op == "restart":
            if self._restart is None:
                raise ValueError("this agent cannot restart itself (not run by fleet-agentd)")
            self._restart()
            return {"restarting": True}
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPERATIONS)}")

    async def _set_config(self, args: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(args) - SETTABLE)
        if unknown:
            settable = ", ".join(sorted(SETTABLE))
            raise ValueError(f"cannot set {', '.join(unknown)} at run time; settable: {settable}")
        if not args:
            raise ValueError("nothing to set")
        new = AgentConfig.model_validate({**self._ctx.config.model_dump(), **args})
        await self._reconfigure(new, sorted(args))
        return {"changed": sorted(args)}
