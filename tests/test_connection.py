"""The connection factory against real servers: failure, auth, reconnect, TLS-less basics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from natsserver import NatsServer, free_port, nkey_user_config, tls_config
from tlsutil import make_ca_and_server_cert

from bus import (
    AuthError,
    Bus,
    ConnectionFailedError,
    ConnectSettings,
    SecretFileError,
    Signer,
    backoff_delay,
    connect,
    generate_seed,
    write_seed_file,
)

pytestmark = pytest.mark.both_loops


async def test_no_server_fails_fast_with_exit_code_1() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    # The bound only catches a connect that retries forever; it is not a speed test.
    async with asyncio.timeout(60):
        with pytest.raises(ConnectionFailedError) as info:
            await connect(ConnectSettings(servers=[url], connect_timeout_s=1.0))
    assert url in str(info.value)
    assert info.value.exit_code == 1


async def test_reconnects_after_the_server_restarts(nats_server: NatsServer, bus: Bus) -> None:
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: object) -> None:
        await got.put(msg.data)  # type: ignore[attr-defined]

    await bus.nc.subscribe("fleet.test.ping", cb=on_msg)
    await bus.nc.publish("fleet.test.ping", b"before")
    assert await asyncio.wait_for(got.get(), 5) == b"before"

    await asyncio.to_thread(nats_server.restart, kill=True)
    await bus.wait_reconnected(after=0, timeout=15)

    # Subscriptions are replayed on the new connection; JetStream state survived on disk.
    await bus.nc.publish("fleet.test.ping", b"after")
    assert await asyncio.wait_for(got.get(), 5) == b"after"
    assert (await bus.js.stream_info("FLEET_EVENTS")).config.name == "FLEET_EVENTS"
    assert bus.connected


async def test_nkey_authentication(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    seed = generate_seed()
    key = tmp_path / "op.nk"
    write_seed_file(key, seed)
    pub = Signer(seed).public_key
    server = server_factory(config=nkey_user_config(pub))

    async with await connect(ConnectSettings(servers=[server.url], nkey_file=key)) as b:
        assert b.connected

    other = tmp_path / "stranger.nk"
    write_seed_file(other, generate_seed())
    with pytest.raises(AuthError, match=r"refused our credentials: .*(?i:authorization)"):
        await connect(ConnectSettings(servers=[server.url], nkey_file=other, connect_timeout_s=1))
    with pytest.raises(AuthError) as info:
        await connect(ConnectSettings(servers=[server.url], connect_timeout_s=1))
    assert info.value.exit_code == 2


async def test_unsafe_key_file_is_refused_before_connecting(tmp_path: Path) -> None:
    key = tmp_path / "op.nk"
    write_seed_file(key, generate_seed())
    key.chmod(0o644)
    with pytest.raises(SecretFileError, match="0644"):
        await connect(ConnectSettings(servers=["nats://127.0.0.1:1"], nkey_file=key))


async def test_permission_violations_are_recorded(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    seed = generate_seed()
    key = tmp_path / "a.nk"
    write_seed_file(key, seed)
    pub = Signer(seed).public_key
    deny = '{ publish: { deny: ["secret.>"] }, subscribe: { deny: ["secret.>"] } }'
    server = server_factory(config=nkey_user_config(pub, deny))
    async with await connect(ConnectSettings(servers=[server.url], nkey_file=key)) as b:
        await b.nc.publish("secret.plans", b"x")
        denial = await b.wait_denied("secret.plans", timeout=5)
        assert str(denial) == "permission denied publishing to 'secret.plans'"
        await b.nc.subscribe("secret.inbox")
        denial = await b.wait_denied("secret.inbox", timeout=5)
        assert denial.operation == "subscribing to"


def test_backoff_has_full_jitter_and_a_cap() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff_delay(n, 0.25, 10.0, rng) for n in range(40)]
    assert all(0 <= d <= 10.0 for d in delays)
    assert max(delays[:3]) <= 2.0
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not lock-step


async def test_tls_with_a_ca_made_by_the_test(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    tls = make_ca_and_server_cert(tmp_path / "tls")
    server = server_factory(config=tls_config(tls.cert, tls.key, tls.ca))
    url = server.url.replace("nats://", "tls://")
    async with await connect(ConnectSettings(servers=[url], tls_ca=tls.ca)) as b:
        assert b.connected
        await b.nc.flush()
    # Without trusting the CA, the handshake fails: no silent plaintext fallback.
    stranger = make_ca_and_server_cert(tmp_path / "other")
    with pytest.raises(ConnectionFailedError):
        await connect(ConnectSettings(servers=[url], tls_ca=stranger.ca, connect_timeout_s=1))


async def test_a_refused_publish_says_so_instead_of_timing_out(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    from samples import sample_data, sample_envelope

    from bus import PermissionDeniedError, provision

    seed = generate_seed()
    key = tmp_path / "a.nk"
    write_seed_file(key, seed)
    pub = Signer(seed).public_key
    server = server_factory(
        config=nkey_user_config(pub, '{ publish: { deny: ["fleet.evt.job.>"] } }')
    )
    async with await connect(ConnectSettings(servers=[server.url], nkey_file=key)) as b:
        await provision(b.js)
        envelope = sample_envelope(sample_data()[0])
        with pytest.raises(PermissionDeniedError) as info:
            await b.publish_event(envelope, timeout=1.0)
        assert str(info.value) == f"permission denied publishing to {envelope.subject!r}"
        assert info.value.exit_code == 2
