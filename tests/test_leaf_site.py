"""A remote site behind a NATS leaf node, on loopback, under the generated configs.

The hub (JetStream, domain ``hub``) runs what ``fleet ops server-config --domain hub
--leaf-listen …`` renders; the site's leaf server (no JetStream) runs what ``fleet ops
server-config --leaf branch …`` renders, its link to the hub going through a proxy the
test cuts and restores. The master and the operators' CLI are at the hub; agent web-1 is
at the site, with ``jetstream_domain = "hub"``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
from agents import FLEET, AgentProcess, MasterProcess, finished, job_events, stop_all
from deployment import Cast, refused, run_cli
from linkproxy import LinkProxy
from natsserver import NatsServer, free_port
from test_agent_faults import wait_log
from test_least_privilege import api, consumer_body, deaf

from bus import (
    Bus,
    ConnectSettings,
    Signer,
    StorageSettings,
    connect,
    generate_seed,
    write_seed_file,
)
from bus.errors import AuthError
from bus.lease import Lease
from bus.streams import provision_fleet
from bus.subjects import consumer_create_subject, consumer_delete_subject
from bus.tasks import wait_any

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DOMAIN = "hub"
EVENTS = "FLEET_EVENTS"
LINKED = "Leafnode connection created"


@dataclass
class Site:
    """The hub, the branch site's leaf server behind a cuttable link, and the cast."""

    base: Path
    cast: Cast
    hub: NatsServer
    leaf: NatsServer
    link: LinkProxy
    admin: Bus
    site_seed: Path
    registry: Path

    def agent_settings(self, name: str) -> ConnectSettings:
        """How a principal at the site connects: to the leaf server, in the hub's domain."""
        return ConnectSettings(
            servers=[self.leaf.url],
            name=name,
            nkey_file=self.cast.principals[name].key_file,
            inbox_prefix=f"_INBOX_{name}",
            js_domain=DOMAIN,
        )

    def env(self, name: str) -> dict[str, str]:
        """``fleet`` commands run as ``name`` at the hub."""
        return {
            **os.environ,
            "FLEET_SERVER": self.hub.url,
            "FLEET_NKEY": str(self.cast.principals[name].key_file),
            "FLEET_USER": name,
        }


async def server_config(*args: str) -> str:
    rendered = await run_cli(FLEET, "ops", "server-config", *args)
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout


async def wait_linked(leaf: NatsServer, since: int) -> None:
    linked = await asyncio.to_thread(leaf.wait_for_log, LINKED, 20.0, since=since)
    assert linked, "\n".join(leaf.log[-20:])


async def answered(nc: nats.NATS, subject: str, timeout: float = 20.0) -> nats.aio.msg.Msg:
    """The answer to a request, asked again while the hub's interest has not yet come
    across a link just made (no responders until then)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await nc.request(subject, b"", timeout=5)
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.1)  # interest crossing a new link: nothing to await


@pytest.fixture
async def site(tmp_path: Path, cast: Cast) -> AsyncIterator[Site]:
    seed = generate_seed()
    site_key = tmp_path / "site-branch.nk"
    write_seed_file(site_key, seed, owner=("site", "branch"))

    registry = tmp_path / "registry.toml"
    registry.write_text(
        cast.registry.read_text()
        + f'[sites.branch]\npublic_key = "{Signer(seed).public_key}"\nagents = ["web-1"]\n'
    )
    leaf_port = free_port()
    hub_conf = await server_config(
        "--registry", str(registry), "--domain", DOMAIN,
        "--store-dir", str(tmp_path / "hub" / "js"),
        "--leaf-listen", f"127.0.0.1:{leaf_port}",
    )  # fmt: skip
    hub = NatsServer(tmp_path / "hub", name="hub", config=hub_conf)
    link: LinkProxy | None = None
    leaf: NatsServer | None = None
    admin: Bus | None = None
    try:
        hub.start()
        link = await LinkProxy(leaf_port).start()
        leaf_conf = await server_config(
            "--registry", str(registry), "--leaf", "branch", "--domain", DOMAIN,
            "--hub-url", f"nats-leaf://127.0.0.1:{link.port}",
        )  # fmt: skip
        leaf = NatsServer(tmp_path / "leaf", name="leaf", config=leaf_conf)
        (tmp_path / "leaf").mkdir()
        # The seed stays out of the rendered config, in its own file next to it.
        (tmp_path / "leaf" / "site-seed.conf").write_text(f'nkey: "{seed.decode()}"\n')
        leaf.start()
        await wait_linked(leaf, 0)
        admin = await connect(
            ConnectSettings(
                servers=[hub.url],
                name="admin",
                nkey_file=cast.principals["admin"].key_file,
                inbox_prefix="_INBOX_admin",
            )
        )
        await provision_fleet(admin, StorageSettings())
        made = Site(tmp_path, cast, hub, leaf, link, admin, site_key, registry)
        async with await connect(made.agent_settings("web-1")) as probe:
            await answered(probe.nc, f"$JS.{DOMAIN}.API.STREAM.INFO.{EVENTS}")
        yield made
    finally:
        if admin is not None:
            await admin.close()
        if leaf is not None:
            leaf.stop()
        if link is not None:
            await link.close()
        hub.stop()


def site_agent(site: Site, agent_id: str) -> AgentProcess:
    """A real agent at the site, trusting the operator ``tester``."""
    return AgentProcess(
        site.base,
        site.leaf.url,
        agent_id,
        nkey_file=str(site.cast.principals[agent_id].key_file),
        trusted=[site.cast.principals["tester"].public_key],
        jetstream_domain=DOMAIN,
        heartbeat_s=0.5,
    )


def hub_master(site: Site) -> MasterProcess:
    def section(role: str) -> dict[str, dict[str, str]]:
        principals = site.cast.principals.values()
        return {p.name: {"public_key": p.public_key} for p in principals if p.role == role}

    return MasterProcess(
        site.base,
        site.hub.url,
        nkey_file=str(site.cast.principals["master"].key_file),
        agents=section("agent"),
        operators=section("operator"),
        headless=section("headless"),
    )


async def test_an_agent_behind_a_leaf_node_queues_while_the_link_is_down(
    site: Site, request: pytest.FixtureRequest
) -> None:
    agent = site_agent(site, "web-1")
    master = hub_master(site)
    try:
        await agent.started(site.admin)
        master.start()
        await master.wait_ready(site.admin)
        operator = site.env("tester")

        first = await run_cli(FLEET, "run", "-a", "web-1", "--", "echo", "one", env=operator)
        assert first.returncode == 0, first.stderr + agent.log()[-3000:]
        assert first.stdout == "one\n"
        # An operator at the hub asks the agent at the site (the answer crosses back).
        status = await run_cli(FLEET, "agent", "status", "web-1", "--json", env=operator)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["agent"] == "web-1"

        # The link goes down: the agent's own connection (to the leaf) stays up.
        since = len(site.leaf.log)
        await site.link.cut()
        queued = await run_cli(
            FLEET, "run", "-a", "web-1", "--async", "--json", "--", "echo", "two", env=operator
        )
        assert queued.returncode == 0, queued.stderr  # stored and acknowledged at the hub
        job = json.loads(queued.stdout)["jobs"][0]["job_id"]
        await wait_log(agent, r"heartbeat: .*the hub is unreachable")
        assert [e.type for e in await job_events(site.admin, job)] == ["job.submitted"]

        await site.link.restore()
        await wait_linked(site.leaf, since)
        done = await finished(site.admin, "web-1", job, timeout=60)
        assert done.status == "succeeded", done
        assert done.output_tail == "two\n"
        await wait_log(agent, "the hub was unreachable: catching up")
        types = [e.type for e in await job_events(site.admin, job)]
        assert types.count("job.started") == 1, types
        assert types.count("job.finished") == 1, types

        audit = await run_cli(FLEET, "audit", "--verify", env=operator)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        try:
            master.stop()
        except Exception:
            master.kill()
        stop_all([agent], request)


async def test_a_site_can_do_no_more_than_its_agents(site: Site) -> None:
    s_jobs, s_filter = ("agent_web-1_catchup", "fleet.evt.job.web-1.>")
    their_jobs = ("agent_web-2_catchup", "fleet.evt.job.web-2.>")
    api_in = f"$JS.{DOMAIN}.API"

    # --- an agent at the site, against others' consumers through the hub's domain -----
    async with await connect(site.agent_settings("web-1")) as bus:
        pinned = consumer_create_subject(EVENTS, s_jobs, s_filter, domain=DOMAIN)
        # Its own pinned create reaches the hub's JetStream, which holds the body to it.
        widened = await api(bus, pinned, consumer_body(s_jobs, filter_subject="fleet.evt.>"))
        assert widened["error"]["err_code"] == 10131, widened
        await refused(
            bus,
            f"{api_in}.CONSUMER.CREATE.{EVENTS}",
            consumer_create_subject(EVENTS, s_jobs, their_jobs[1], domain=DOMAIN),
            consumer_create_subject(EVENTS, *their_jobs, domain=DOMAIN),
            consumer_delete_subject(EVENTS, their_jobs[0], domain=DOMAIN),
            f"{api_in}.STREAM.DELETE.{EVENTS}",
            # The hub's API without the domain: not the way, and not allowed.
            f"$JS.API.CONSUMER.CREATE.{EVENTS}.{s_jobs}.{s_filter}",
        )
        await deaf(bus, "fleet.evt.job.web-2.*.submitted", "fleet.evt.>")

    # --- the site's key is for its leaf link only ---------------------------------------
    with pytest.raises(AuthError):
        await connect(
            ConnectSettings(servers=[site.hub.url], name="site", nkey_file=site.site_seed)
        )

    # --- a rogue server with the site's key, open to anyone: the hub holds it to what the
    # site's agents together may do -------------------------------------------------------
    rogue_dir = site.base / "rogue"
    rogue_dir.mkdir()
    (rogue_dir / "site-seed.conf").write_text((site.leaf.store_dir / "site-seed.conf").read_text())
    leaf_port = site.link.target  # straight to the hub, not through the cuttable link
    rogue = NatsServer(
        rogue_dir,
        name="rogue",
        config=(
            "jetstream: disabled\n"
            "leafnodes { remotes: [ { url: "
            f'"nats-leaf://127.0.0.1:{leaf_port}", include "site-seed.conf" }} ] }}\n'
        ),
    )
    try:
        rogue.start()
        assert await asyncio.to_thread(rogue.wait_for_log, LINKED, 20.0)
        nc = await nats.connect(rogue.url, inbox_prefix="_INBOX_web-1")
        try:
            # What an agent of the site may do works: its stream info comes back.
            info = await answered(nc, f"{api_in}.STREAM.INFO.{EVENTS}")
            assert json.loads(info.data)["config"]["name"] == EVENTS
            heard: list[str] = []
            own_job = "fleet.evt.job.web-1.j1.submitted"
            heard_own, probed = asyncio.Event(), asyncio.Event()

            async def hear(msg: nats.aio.msg.Msg) -> None:
                heard.append(msg.subject)
                if msg.subject == own_job:
                    heard_own.set()

            async def probe(msg: nats.aio.msg.Msg) -> None:
                probed.set()

            for wanted in (
                "fleet.evt.job.web-1.*.submitted",
                "fleet.evt.job.web-2.*.submitted",
                "fleet.evt.>",
                "fleet.ctl.>",
            ):
                await nc.subscribe(wanted, cb=hear)
            await nc.subscribe("_INBOX_web-1.probe", cb=probe)  # last: interest goes in order
            await nc.flush()
            # The hub learns the rogue's interest over the link some time later: until
            # it has, nothing published at the hub would cross, allowed or not.
            async with asyncio.timeout(20):
                while not probed.is_set():
                    await site.admin.nc.publish("_INBOX_web-1.probe", b"")
                    await wait_any(probed, timeout=0.2)
            js = site.admin.js
            # web-2's first: once web-1's has crossed, web-2's would have too.
            for name, body in (("web-2", b"b"), ("web-1", b"a")):
                await js.publish(f"fleet.evt.job.{name}.j1.submitted", body)
            async with asyncio.timeout(20):
                await heard_own.wait()
            for denied in (
                f"{api_in}.STREAM.DELETE.{EVENTS}",
                f"{api_in}.STREAM.PURGE.{EVENTS}",
                consumer_create_subject(EVENTS, *their_jobs, domain=DOMAIN),
                f"{api_in}.CONSUMER.CREATE.{EVENTS}",
            ):
                with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                    await nc.request(denied, b"{}", timeout=2)
            # Publishing as the master (a submission) or as another agent: not stored.
            for forged in (
                "fleet.evt.job.web-1.forged.submitted",
                "fleet.evt.job.web-2.forged.finished",
                "fleet.evt.settings.changed",
            ):
                await nc.publish(forged, b"forged")
            await nc.flush()
            # web-1's submission crossed (a site agent hears its own jobs); web-2's did not.
            allowed = await nc.request(f"{api_in}.STREAM.INFO.{EVENTS}", b"", timeout=5)
            assert allowed.data
            # (Its own forgeries it hears locally: that is its own server.)
            assert "fleet.evt.job.web-2.j1.submitted" not in heard, heard
            state = (await js.stream_info(EVENTS)).state
            assert state.messages == 2, "only the hub's own two submissions are stored"
        finally:
            await nc.close()
    finally:
        rogue.stop()


async def test_an_agent_at_the_site_reads_updates_and_takes_download_slots(site: Site) -> None:
    s = site.admin.subjects
    bundle = bytes(range(256)) * 1200  # several chunks
    stored = await (await site.admin.objects(s.bundles_bucket)).put("fleet-9.9.9.tar", bundle)
    await (await site.admin.kv(s.config_bucket)).put("release.target", b"9.9.9")
    async with await connect(site.agent_settings("web-1")) as bus:
        # The update settings: read by key through the hub's domain.
        target = await (await bus.kv(s.config_bucket)).get("release.target")
        assert target is not None
        assert target.value == b"9.9.9"
        # A download slot: a KV write, which crosses the link only in the hub's domain.
        slot = Lease(bus, s.tokens_bucket, "slot-0", "web-1", 30)
        assert await slot.try_acquire()
        assert await Lease(bus, s.tokens_bucket, "slot-0", "web-2", 30).try_acquire() is False
        holder = await (await site.admin.kv(s.tokens_bucket)).get("slot-0")
        assert holder is not None
        assert holder.value == b"web-1"
        # The bundle, chunk by chunk, through an ordered consumer made in the domain.
        objects = await bus.objects(s.bundles_bucket)
        info = await objects.info("fleet-9.9.9.tar")
        assert info is not None
        assert info.size == stored.size
        got = b"".join([c async for c in objects.chunks(info, chunk_timeout_s=10)])
        assert got == bundle
        await slot.release()
    freed = await (await site.admin.kv(s.tokens_bucket)).get("slot-0")
    assert freed is None
