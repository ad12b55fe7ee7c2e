"""TCP ports for llama-server instances: from `llama_cpp_ports` when configured, else picked by the OS.

A port is handed out only when nothing listens on it (checked by binding it) and this agent does not hold it
already; it stays held until released, so two instances starting at once never get the same port. Configured
candidates are walked round-robin from where the last search stopped, so a retry after a failed spawn gets a
different port than the attempt before (the seed's port rotation).

Not here: which host llama-server binds (the supervisor's business), and any guarantee against another
program taking the port between the check and llama-server's own bind; a spawn that loses that race fails
and is retried on a new port.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

BIND_HOST = "127.0.0.1"


class PortError(Exception):
    """No port could be handed out."""


class NoFreePort(PortError):
    pass


class PortAllocator:
    """Hands out and takes back ports for the instances of one agent."""

    def __init__(self, candidates: Sequence[int] | None = None, *, host: str = BIND_HOST) -> None:
        self._candidates = list(candidates) if candidates else []
        self._host = host
        self._held: set[int] = set()
        self._next_index = 0

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def allocate(self) -> int:
        """A port nothing listens on and this agent does not hold; hold it until `release`."""
        port = self._from_candidates() if self._candidates else self._from_os()
        self._held.add(port)
        return port

    def release(self, port: int | None) -> None:
        """Give a port back; releasing one that is not held is harmless."""
        if port is not None:
            self._held.discard(port)

    def _from_candidates(self) -> int:
        count = len(self._candidates)
        for step in range(count):
            index = (self._next_index + step) % count
            port = self._candidates[index]
            if port in self._held or not is_free(port, host=self._host):
                continue
            self._next_index = (index + 1) % count
            return port
        raise NoFreePort(
            f"all {count} ports in llama_cpp_ports are taken ({len(self._held)} by this node's instances); "
            "add ports or ranges to llama_cpp_ports in config.yaml, or remove it to use OS-assigned ports"
        )

    def _from_os(self) -> int:
        # The kernel avoids recently used ephemeral ports, so a fresh pick rarely repeats one we hold;
        # a few tries cover the rare case.
        for _ in range(16):
            port = ephemeral_port(host=self._host)
            if port not in self._held:
                return port
        raise NoFreePort("the OS kept assigning ports this node already holds; is the ephemeral range tiny?")


def is_free(port: int, *, host: str = BIND_HOST) -> bool:
    """Whether `port` can be bound on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise PortError(f"cannot test port {port} on {host}: {exc}") from exc
        return True


def ephemeral_port(*, host: str = BIND_HOST) -> int:
    """A port the OS picks for us (bound to port 0, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
