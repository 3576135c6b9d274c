"""Reading and writing the fleet's update settings in KV ``fleet-config``.

Every write is mirrored by a signed ``settings.changed`` event, so the log says who
paused, disabled or promoted what, and when.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetError
from bus.signing import Signer, sign_envelope
from schemas import SettingsChanged, make_envelope
from schemas.update import SETTING_KEYS, UpdateSettings, encode_setting, parse_settings

logger = logging.getLogger(__name__)


async def read_settings(bus: Bus) -> UpdateSettings:
    """The current settings; a corrupt key is logged and its default used.

    Raises:
        ConnectionFailedError: the bucket cannot be read.
    """
    entries: dict[str, bytes | None] = {}
    try:
        kv = await bus.kv(bus.subjects.config_bucket)
        for key in SETTING_KEYS:
            entry = await kv.get(key)
            if entry is not None:
                entries[key] = entry.value
    except FleetError as exc:
        raise ConnectionFailedError(f"reading update settings: {exc}") from exc
    settings, problems = parse_settings(entries)
    for problem in problems:
        logger.error("! bad update setting, using its default: %s", problem)
    return settings


async def put_setting(bus: Bus, key: str, value: BaseModel | str | int | float | bool) -> None:
    """Set one key, with no event (for a write another event already records).

    Raises:
        ConnectionFailedError: the bucket refused the write.
    """
    if key not in SETTING_KEYS:
        raise ValueError(f"unknown setting {key}")
    try:
        kv = await bus.kv(bus.subjects.config_bucket)
        await kv.put(key, encode_setting(value))
    except FleetError as exc:
        raise ConnectionFailedError(f"setting {key}: {exc}") from exc


async def write_setting(
    bus: Bus,
    key: str,
    value: BaseModel | str | int | float | bool,
    *,
    signer: Signer,
    source: str,
    version: str | None = None,
    shown: str | int | float | bool | None = None,
) -> None:
    """Set one key and record ``settings.changed`` (``shown`` is the value the event
    carries when ``value`` is a whole model).

    Raises:
        ConnectionFailedError: the bucket or the log refused the write.
    """
    await put_setting(bus, key, value)
    event_value = shown if isinstance(value, BaseModel) else value
    data = SettingsChanged(key=key, value=event_value, changed_by=source, version=version)
    subject = bus.subjects.settings_event("changed")
    envelope = make_envelope(data, source=source, subject=subject)
    await bus.publish_event(sign_envelope(envelope, signer))
