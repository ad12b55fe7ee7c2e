"""mDNS discovery: advertise this node as `_llama-mesh._tcp.local` and hand every node found to the gossip.

On by default when the cluster is enabled (`cluster.discovery.mdns`). The service instance is named after
the node id; its TXT record carries `node_id` and `url` (the URL peers reach this node's public port at), so
a node behind a `public_url` is reached there rather than at the address mDNS saw. What is found is only
a URL to gossip with: trust is the Noise handshake's business (cluster token, pinned keys), never mDNS's.
Merged with `cluster.peers` in the gossip loop (`peers.Gossiper.add_peer`).

Not here: leaving the cluster (a node that is gone just stops answering gossip and goes stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable
from urllib import parse

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf import asyncio as zeroconf_asyncio

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_MS = 3000


def service_type(service_name: str) -> str:
    """zeroconf's spelling: a fully qualified name with the trailing dot."""
    return service_name if service_name.endswith(".") else service_name + "."


def advertised_addresses(url: str) -> list[str]:
    """The addresses to advertise for `url`: its host when that is an address (not a wildcard), else this
    host's addresses as the resolver knows them."""
    host = parse.urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and not address.is_unspecified:
        return [str(address)]
    found = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)}
    return sorted(str(a) for a in found)


@contextlib.asynccontextmanager
async def advertised(
    *,
    service_name: str,
    node_id: str,
    url: str,
    found: Callable[[str], None],
    interfaces: list[str] | None = None,
) -> AsyncIterator[zeroconf_asyncio.AsyncZeroconf]:
    """Advertise this node and browse for others while the block runs; `found(url)` for each other node."""
    kind = service_type(service_name)
    port = parse.urlsplit(url).port or 80
    chosen: list[str] | InterfaceChoice = interfaces if interfaces is not None else InterfaceChoice.All
    zc = zeroconf_asyncio.AsyncZeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)
    info = zeroconf_asyncio.AsyncServiceInfo(
        kind,
        f"{node_id}.{kind}",
        port=port,
        parsed_addresses=advertised_addresses(url),
        properties={"node_id": node_id, "url": url},
    )
    lookups: set[asyncio.Task[None]] = set()

    async def look_up(name: str) -> None:
        peer = zeroconf_asyncio.AsyncServiceInfo(kind, name)
        if not await peer.async_request(zc.zeroconf, LOOKUP_TIMEOUT_MS):
            return
        properties = peer.decoded_properties
        if properties.get("node_id") == node_id:
            return
        peer_url = properties.get("url")
        if not peer_url:
            addresses = peer.parsed_addresses()
            if not addresses:
                return
            peer_url = f"http://{addresses[0]}:{peer.port}"
        log.info("mDNS found %s at %s", properties.get("node_id"), peer_url, extra={"event": "mesh_mdns_peer"})
        found(peer_url)

    def changed(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.ensure_future(look_up(name))
            lookups.add(task)
            task.add_done_callback(lookups.discard)

    await zc.async_register_service(info)
    browser = zeroconf_asyncio.AsyncServiceBrowser(zc.zeroconf, kind, handlers=[changed])
    try:
        yield zc
    finally:
        for task in list(lookups):
            task.cancel()
        await browser.async_cancel()
        with contextlib.suppress(Exception):  # best effort: the goodbye packet on the way out
            await zc.async_unregister_service(info)
        await zc.async_close()
