"""The one way to talk to NATS: connection, subjects, storage, codec, signing, publishing.

Nothing outside this package imports ``nats`` or ``msgpack`` or handles their errors:
they are translated into :mod:`bus.errors` here.
"""

from bus.codec import (
    DEFAULT_MAX_SIZE,
    canonical_bytes,
    decode_envelope,
    decode_event,
    decode_model,
    encode_envelope,
    encode_model,
)
from bus.connection import Bus, ConnectSettings, backoff_delay, connect
from bus.errors import (
    AuthError,
    BadMessageError,
    BundleError,
    ConnectionFailedError,
    FleetError,
    FleetTimeoutError,
    InvalidTokenError,
    JobFailedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ProvisioningConflictError,
    PublishTimeoutError,
    SecretFileError,
    SignatureError,
    StoreFullError,
    SubjectTakenError,
    UsageError,
    VerificationError,
    exit_code_for,
)
from bus.eventloop import run
from bus.keys import KEY_KINDS, generate_seed, public_key_of, read_seed_file, write_seed_file
from bus.publish import PublishResult, publish_event, publish_with_retry
from bus.signing import (
    SealBinding,
    Signer,
    seal_for,
    sign_envelope,
    verify_envelope,
    verify_signature,
)
from bus.streams import ProvisionReport, StorageSettings, provision
from bus.subjects import Subjects, check_agent_id, check_token, version_token

__all__ = [
    "DEFAULT_MAX_SIZE",
    "KEY_KINDS",
    "AuthError",
    "BadMessageError",
    "BundleError",
    "Bus",
    "ConnectSettings",
    "ConnectionFailedError",
    "FleetError",
    "FleetTimeoutError",
    "InvalidTokenError",
    "JobFailedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProvisionReport",
    "ProvisioningConflictError",
    "PublishResult",
    "PublishTimeoutError",
    "SealBinding",
    "SecretFileError",
    "SignatureError",
    "Signer",
    "StorageSettings",
    "StoreFullError",
    "SubjectTakenError",
    "Subjects",
    "UsageError",
    "VerificationError",
    "backoff_delay",
    "canonical_bytes",
    "check_agent_id",
    "check_token",
    "connect",
    "decode_envelope",
    "decode_event",
    "decode_model",
    "encode_envelope",
    "encode_model",
    "exit_code_for",
    "generate_seed",
    "provision",
    "public_key_of",
    "publish_event",
    "publish_with_retry",
    "read_seed_file",
    "run",
    "seal_for",
    "sign_envelope",
    "verify_envelope",
    "verify_signature",
    "version_token",
    "write_seed_file",
]
