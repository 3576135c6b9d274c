"""The exception hierarchy and its one mapping to exit codes."""

from __future__ import annotations

import pytest

import bus
from bus import errors


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.ConnectionFailedError("x"), 1),
        (errors.FleetTimeoutError("x"), 3),
        (errors.PublishTimeoutError("s", "id", 3), 3),
        (errors.UsageError("x"), 2),
        (errors.InvalidTokenError("x"), 2),
        (errors.SecretFileError("/f", "x"), 2),
        (errors.ProvisioningConflictError("S", [("max_age", 1, 2)]), 2),
        (errors.AuthError("x"), 2),
        (errors.SignatureError("x"), 2),
        (errors.PermissionDeniedError("publishing to", "a.b"), 2),
        (errors.BadMessageError("x"), 2),
        (errors.PayloadTooLargeError(2, 1), 2),
        (errors.JobFailedError("x"), 4),
        (errors.FleetError("x"), 1),
        (KeyboardInterrupt(), 130),
        (TimeoutError(), 3),
        (RuntimeError("bug"), 1),
    ],
)
def test_exit_codes(exc: BaseException, code: int) -> None:
    assert errors.exit_code_for(exc) == code


def test_stdlib_parents_catch_ours() -> None:
    assert isinstance(errors.FleetTimeoutError("x"), TimeoutError)
    assert isinstance(errors.UsageError("x"), ValueError)
    assert isinstance(errors.ConnectionFailedError("x"), ConnectionError)
    assert isinstance(errors.BadMessageError("x"), ValueError)


def test_errors_carry_fields_and_readable_messages() -> None:
    conflict = errors.ProvisioningConflictError("FLEET_EVENTS", [("max_age", 10, 20)])
    assert conflict.differences == [("max_age", 10, 20)]
    assert "max_age is 10, wanted 20" in str(conflict)
    denied = errors.PermissionDeniedError("publishing to", "fleet.evt.x")
    assert str(denied) == "permission denied publishing to 'fleet.evt.x'"


def test_every_public_name_is_exported() -> None:
    # The public API is written down in __all__; everything listed must exist.
    for name in bus.__all__:
        assert hasattr(bus, name), name
    import schemas

    for name in schemas.__all__:
        assert hasattr(schemas, name), name
