"""Ports for llama-server instances.

Covers: configured candidates handed out round-robin (a retry gets the next port), ports in use by another
program or held by this agent skipped, release, a clear error when all are taken; OS-assigned ports when
nothing is configured; `is_free` on a listening port.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from llamesh_agent import ports


@pytest.fixture
def three_free_ports() -> Iterator[list[int]]:
    """Three ports that are free now (held by bound, non-listening sockets until the test starts)."""
    sockets = [socket.socket() for _ in range(3)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    found = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    yield found


def test_candidates_round_robin_and_release(three_free_ports: list[int]) -> None:
    allocator = ports.PortAllocator(three_free_ports)
    first = allocator.allocate()
    second = allocator.allocate()
    assert [first, second] == three_free_ports[:2]
    assert allocator.held == {first, second}
    allocator.release(first)
    assert allocator.allocate() == three_free_ports[2]  # the next one, not the one just released
    assert allocator.allocate() == first  # wrapped around to the free one
    with pytest.raises(ports.NoFreePort, match="all 3 ports in llama_cpp_ports are taken"):
        allocator.allocate()
    allocator.release(None)  # harmless


def test_ports_in_use_are_skipped(three_free_ports: list[int]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", three_free_ports[0]))
        listener.listen()
        assert not ports.is_free(three_free_ports[0])
        allocator = ports.PortAllocator(three_free_ports)
        assert allocator.allocate() == three_free_ports[1]


def test_os_assigned_ports_when_not_configured() -> None:
    allocator = ports.PortAllocator()
    picked = {allocator.allocate() for _ in range(5)}
    assert len(picked) == 5 and allocator.held == picked
    assert all(ports.is_free(port) for port in picked)
