"""No orphaned children: ask Linux to SIGKILL a child process when the agent that started it dies.

SIGKILL, not SIGTERM: an agent that dies cannot follow a graceful stop with a kill after the grace period,
and llama-server's graceful stop waits for open keep-alive connections (gateways pool them) up to its read
timeout — minutes of a leaked process holding memory and a port. Nothing is left to drain for a dead agent.

llama-server processes and model downloads are started in their own session (so a Ctrl-C meant for the
agent does not hit them first), which also means nothing stops them if the agent is killed outright.
`preexec_fn()` gives `subprocess`/asyncio the function that sets PR_SET_PDEATHSIG in the child; elsewhere
than Linux it is None and children outlive a killed agent.

Linux ties the signal to the parent *thread*: spawn from the event loop's thread (asyncio and uvloop do).
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# Loaded before any fork: between fork and exec the child may only make the prctl call.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def preexec_fn() -> Callable[[], None] | None:
    return _die_with_parent if _LIBC is not None else None


def _die_with_parent() -> None:
    assert _LIBC is not None
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
