"""The headless login throttle, by the clock it is given."""

from __future__ import annotations

from master.auth import Throttle


def test_pauses_after_repeated_failures_and_doubles() -> None:
    throttle = Throttle(after=3, first=10.0, cap=25.0)
    key = ("batch", "batch")
    for now in (0.0, 1.0):
        throttle.failed(key, now)
        assert not throttle.blocked(key, now)
    throttle.failed(key, 2.0)
    assert throttle.blocked(key, 2.0)
    assert throttle.blocked(key, 11.9)
    assert not throttle.blocked(key, 12.0)
    assert throttle.failed(key, 12.0) == 4
    assert throttle.blocked(key, 31.9)  # 20 s now
    throttle.failed(key, 40.0)
    assert throttle.blocked(key, 64.9)  # capped at 25 s
    assert not throttle.blocked(key, 65.0)


def test_keys_are_user_and_caller_and_success_clears() -> None:
    throttle = Throttle(after=1, first=60.0)
    throttle.failed(("batch", "mallory"), 0.0)
    assert throttle.blocked(("batch", "mallory"), 1.0)
    assert not throttle.blocked(("batch", "batch"), 1.0)
    throttle.succeeded(("batch", "mallory"))
    assert not throttle.blocked(("batch", "mallory"), 1.0)


def test_the_table_stays_bounded() -> None:
    throttle = Throttle(after=1, first=60.0, kept=100)
    for n in range(1000):
        throttle.failed((f"user{n}", "x"), 0.0)
    assert len(throttle._failures) <= 100
    assert throttle.blocked(("user999", "x"), 1.0)
