"""The one exception hierarchy of fleetbus, and the one place it maps to exit codes.

Every package raises these (or subclasses of them); no ``nats.errors`` type escapes
``bus/``. The exit codes are the contract of ``fleet`` and ``fleet-headless``::

    FleetError                     1  something failed
    ├── ConnectionFailedError      1  no server, or the connection was lost
    ├── StoreFullError             1  the server's store is full (refused or unacknowledged)
    ├── FleetTimeoutError          3  a bounded wait ran out (also a TimeoutError)
    │   ├── PublishTimeoutError    3  the server never acknowledged a publish
    │   └── SubmissionUnknownError 3  a job was sent, its storage never confirmed
    ├── UsageError                 2  bad arguments, config or input (also a ValueError)
    │   ├── InvalidTokenError      2  an id that would be unsafe in a subject
    │   ├── SecretFileError        2  a key or secret file missing, unreadable or too open
    │   └── ProvisioningConflictError 2  a stream or bucket exists with another config
    ├── AuthError                  2  authentication or authorisation failed
    │   ├── SignatureError         2  a signature is missing, forged or by an unknown key
    │   └── PermissionDeniedError  2  the server refused a subject to this principal
    ├── BadMessageError            2  bytes that are not a valid message (also a ValueError)
    │   └── PayloadTooLargeError   2  over the size limit
    ├── JobFailedError             4  the job ran and failed (on any target)
    └── VerificationError          5  the log or a projection failed verification
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONNECTION = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_JOB_FAILED = 4
EXIT_VERIFICATION = 5
EXIT_SKIPPED = 6  # a multi-target run skipped unsupported agents; the rest succeeded
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells expect after Ctrl-C


class FleetError(Exception):
    """Base of every fleetbus error. ``exit_code`` is what a command exits with."""

    exit_code: int = EXIT_CONNECTION


class ConnectionFailedError(FleetError, ConnectionError):
    """No NATS server could be reached, or the connection was lost for good."""

    exit_code = EXIT_CONNECTION


class FleetTimeoutError(FleetError, TimeoutError):
    """A bounded wait ran out. The operation may still complete later."""

    exit_code = EXIT_TIMEOUT


class PublishTimeoutError(FleetTimeoutError):
    """JetStream did not acknowledge a publish after every retry.

    The event may still have been stored; retrying with the same ``msg_id`` is safe
    because the stream deduplicates it.
    """

    def __init__(self, subject: str, msg_id: str, attempts: int) -> None:
        self.subject = subject
        self.msg_id = msg_id
        self.attempts = attempts
        super().__init__(
            f"no acknowledgement for {subject} (msg id {msg_id}) after {attempts} attempts"
        )


class StoreFullError(FleetError):
    """The server's store is full: it refuses writes, or acknowledges none.

    ``certain`` is False when inferred from silence (the write may yet be stored, as
    after a timeout); True when the server refused it outright (it is not stored).
    """

    def __init__(self, subject: str, reason: str, *, certain: bool = True) -> None:
        self.subject = subject
        self.reason = reason
        self.certain = certain
        super().__init__(f"the server's store is full: {reason} (writing {subject})")


class SubmissionUnknownError(FleetTimeoutError):
    """A job was sent but the server never confirmed storing it: it may yet run.

    Never resubmit it under a new id; ``fleet job show JOB_ID`` tells whether it exists.
    """

    def __init__(self, job_id: str, agent: str, cause: str) -> None:
        self.job_id = job_id
        self.agent = agent
        super().__init__(
            f"job {job_id} on {agent}: unknown whether the server stored it ({cause}); "
            f"it may still run. Check with `fleet job show {job_id}` before submitting "
            "it again"
        )


class UsageError(FleetError, ValueError):
    """Bad arguments, configuration or input: the caller must change something."""

    exit_code = EXIT_USAGE


class InvalidTokenError(UsageError):
    """A value that would be unsafe as one element of a NATS subject."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class SecretFileError(UsageError):
    """A key or secret file is missing, unreadable, malformed or readable by others."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ProvisioningConflictError(UsageError):
    """A stream or bucket exists with a configuration other than the one required.

    ``differences`` lists ``(field, existing, wanted)``; nothing was changed.
    """

    def __init__(self, stream: str, differences: list[tuple[str, object, object]]) -> None:
        self.stream = stream
        self.differences = differences
        lines = ", ".join(f"{f} is {old!r}, wanted {new!r}" for f, old, new in differences)
        super().__init__(f"stream {stream} exists with a different configuration: {lines}")


class AuthError(FleetError):
    """Authentication or authorisation failed."""

    exit_code = EXIT_USAGE


class SignatureError(AuthError):
    """A signature is missing, does not verify, or is by a key that is not trusted."""


class PermissionDeniedError(AuthError):
    """The server refused this principal a subject (publish or subscribe)."""

    def __init__(self, operation: str, subject: str) -> None:
        self.operation = operation
        self.subject = subject
        super().__init__(f"permission denied {operation} {subject!r}")


class BadMessageError(FleetError, ValueError):
    """Bytes that do not decode to a valid message. Carries what was wrong, never raw data."""

    exit_code = EXIT_USAGE


class PayloadTooLargeError(BadMessageError):
    """A message over the configured size limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")


class SubjectTakenError(FleetError):
    """A publish that must be the first on its subject found another message there.

    ``seq`` is the stream sequence of the message that got there first: for a job's
    ``.finished`` subject, the outcome that was recorded instead of ours.
    """

    def __init__(self, subject: str, seq: int) -> None:
        super().__init__(f"{subject} already holds message {seq}")
        self.subject = subject
        self.seq = seq


class NotActiveError(FleetError):
    """This master does not hold the master lease (any longer): it must not publish."""


class RevisionMismatchError(FleetError):
    """A conditional KV write found another revision than the one it was based on."""

    def __init__(self, bucket: str, key: str) -> None:
        super().__init__(f"{bucket}/{key} was changed by someone else")
        self.bucket = bucket
        self.key = key


class KeyExistsError(RevisionMismatchError):
    """A KV create found the key already there."""


class JobFailedError(FleetError):
    """The job ran and did not succeed on at least one target."""

    exit_code = EXIT_JOB_FAILED


class VerificationError(FleetError):
    """``fleet audit --verify`` or ``fleet replay --verify`` found a problem."""

    exit_code = EXIT_VERIFICATION


class BundleError(VerificationError):
    """An update bundle is unsigned, tampered with, untrusted, or cannot be installed.

    ``stage`` says where it failed, as ``update.failed`` records it.
    """

    def __init__(self, reason: str, stage: str = "verify") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that ended a command.

    Args:
        exc: what ended the command.

    Returns:
        The contract's code for fleetbus errors, 130 for an interrupt, 3 for any other
        timeout, and 1 for anything unexpected.
    """
    if isinstance(exc, FleetError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, TimeoutError):
        return EXIT_TIMEOUT
    return EXIT_CONNECTION
