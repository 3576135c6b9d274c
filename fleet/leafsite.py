"""Remote sites: the configs of a leaf node and of the hub it links to.

A site whose agents cannot reach the hub runs its own nats-server as a leaf node of the
hub, without JetStream: its agents use the hub's JetStream through the leaf link, as
``$JS.<domain>.API`` (nats-server forwards no ``$JS.API`` across a leaf link unless
both sides share a domain and system account, which a site must not). The leaf server's
users are the site's agents, each with its own permissions moved into the hub's domain;
its link to the hub logs in as the site's own key, whose permissions at the hub are
exactly what the site's agents together may do, so a compromised site server can do no
more than its agents could.
"""

from __future__ import annotations

from bus import UsageError
from bus.subjects import check_token, control_reply_filter, in_domain, published_in_domain
from fleet.permissions import (
    Permissions,
    Registry,
    Site,
    inbox_prefix,
    permissions,
    user_line,
)


def _site(registry: Registry, name: str) -> Site:
    site = registry.sites.get(name)
    if site is None:
        known = ", ".join(sorted(registry.sites)) or "none"
        raise UsageError(f"no site {name!r} in the registry (sites: {known})")
    unknown = [a for a in site.agents if a not in registry.agents]
    if unknown:
        raise UsageError(f"site {name}: agents {', '.join(unknown)} are not in [agents]")
    return site


def check_domain(domain: str) -> str:
    """Raises: UsageError unless ``domain`` is a safe subject token."""
    try:
        return check_token(domain, "JetStream domain")
    except Exception as exc:
        raise UsageError(str(exc)) from None


def _in_domain(perms: Permissions, domain: str) -> Permissions:
    out: Permissions = {}
    for key, value in perms.items():
        if isinstance(value, dict):
            move = published_in_domain if key == "publish" else in_domain
            out[key] = {k: [move(s, domain) for s in v] for k, v in value.items()}
        else:
            out[key] = value
    return out


def agent_permissions(registry: Registry, domain: str) -> dict[str, Permissions]:
    """Every agent's permissions, with its JetStream API moved into ``domain``."""
    return {
        name: _in_domain(perms, domain)
        for role, name, perms in permissions(registry)
        if role == "agent"
    }


def site_permissions(registry: Registry, site: str, domain: str) -> Permissions:
    """The site's leaf connection at the hub: the union of what its agents may do.

    Across a leaf link, what the user may publish goes from the site to the hub and what
    it may subscribe to comes from the hub to the site.
    """
    agents = agent_permissions(registry, domain)
    publish: list[str] = []
    subscribe: list[str] = []
    for agent in _site(registry, site).agents:
        perms = agents[agent]
        for out, key in ((publish, "publish"), (subscribe, "subscribe")):
            section = perms[key]
            assert isinstance(section, dict)
            out += [s for s in section["allow"] if s not in out]
    # Answers to control requests to its agents: a leaf link has no `allow_responses`
    # (interest in others' inboxes crosses only where it may publish), so the requests
    # name their target in the reply subject and the site may answer only its own.
    askers = [*registry.operators, *registry.admins]  # who may send agents control requests
    publish += [
        control_reply_filter(inbox_prefix(asker), agent)
        for agent in _site(registry, site).agents
        for asker in askers
    ]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def hub_site_users(registry: Registry, domain: str | None) -> list[str]:
    """The hub's ``users`` entries for every site's leaf connection (leaf links only).

    Raises:
        UsageError: the registry has sites but no domain was given, or a site is invalid.
    """
    if not registry.sites:
        return []
    if domain is None:
        raise UsageError("the registry has [sites]: give the hub's JetStream --domain")
    lines = []
    for name, site in registry.sites.items():
        check_token(name, "site name")
        lines.append(f"    # site {name} (its leaf node's link)")
        lines.append(
            user_line(
                site.public_key,
                site_permissions(registry, name, domain),
                allowed_connection_types=["LEAFNODE"],
            )
        )
    return lines


def hub_leafnodes_block(listen: str) -> str:
    """The hub's ``leafnodes`` block: where sites' leaf nodes connect. Their logins are
    the ``users`` of its ``authorization`` (``allowed_connection_types: LEAFNODE``)."""
    return f'leafnodes {{\n  listen: "{listen}"\n}}\n'


def render_leaf(
    registry: Registry,
    site: str,
    *,
    hub_url: str,
    domain: str,
    seed_include: str,
    max_payload: int,
) -> str:
    """The leaf server's config for ``site``: no JetStream, its agents as its users (API
    in the hub's domain), and its link to the hub logging in with the site's seed, read
    from ``seed_include`` (a file holding ``nkey: "SU…"``, mode 0400, never rendered; its
    path relative to the leaf config's directory, as nats-server reads includes)."""
    check_domain(domain)
    agents = agent_permissions(registry, domain)
    lines = [
        f"# Generated by `fleet ops server-config --leaf {site}`: the leaf node of a site.",
        "# Regenerate whenever the registry changes. Agents here set",
        f'# jetstream_domain = "{domain}" in their config.',
        "# No JetStream here: the site's agents use the hub's, across the link.",
        "jetstream: disabled",
        f"max_payload: {max_payload}",
        "authorization {",
        "  users: [",
    ]
    for agent in _site(registry, site).agents:
        lines.append(f"    # agent {agent}")
        lines.append(user_line(registry.agents[agent].public_key, agents[agent]))
    lines += [
        "  ]",
        "}",
        "leafnodes {",
        "  remotes: [",
        "    {",
        f'      url: "{hub_url}"',
        '      # The site\'s seed (nkey: "SU…"), in its own root-only file.',
        f'      include "{seed_include}"',
        "    }",
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"
