"""The headless client's challenge exchange with the master (``fleet.ctl.master.auth-*``).

``auth-salt``: the user's bcrypt salt, to make the secret file on first use.
``auth-start``: a one-time server nonce and the salt. ``auth-submit``: the proof, bound to
the job; the master answers with the job id and its own signature. No message carries
the password or the bcrypt hash.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas.fields import AgentId, EventId, UserName
from schemas.jobs import JobRequest

_STRICT = ConfigDict(strict=True, frozen=True, extra="forbid")
Nonce = Annotated[str, Field(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
BcryptSalt = Annotated[str, Field(pattern=r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{22}$")]


class AuthStart(BaseModel):
    model_config = _STRICT
    user: UserName
    client_nonce: Nonce


class AuthChallenge(BaseModel):
    model_config = _STRICT
    server_nonce: Nonce
    salt: BcryptSalt


class AuthSubmit(BaseModel):
    model_config = _STRICT
    user: UserName
    client_nonce: Nonce
    server_nonce: Nonce
    proof: Annotated[bytes, Field(min_length=32, max_length=32)]
    agent: AgentId
    request: JobRequest


class AuthAccepted(BaseModel):
    model_config = _STRICT
    job_id: EventId
    server_signature: Annotated[bytes, Field(min_length=32, max_length=32)]
