"""One structured JSON line per OpenAI request, written when the request ends (whatever ended it).

The line carries the seed's minimum fields (timestamp, level, event, node_id, session_id, request_id) and
what an operator asks first about a request: model, profile, instance, status, duration, tokens, time
queued, and whether the client or the upstream gave up. The fields travel as the record's `extra` on the
`llamesh.requests` logger; the process's JSON formatter (set up by the CLI) writes them as one line.

Counting for /metrics is `metrics`' business; this module only describes.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

logger = logging.getLogger("llamesh.requests")


@dataclasses.dataclass
class Exchange:
    """One request as it goes through the gateway."""

    request_id: str
    session_id: str | None  # the client's X-Session-Id; a UUID is made up for the log line when absent
    path: str
    model: str | None = None
    profile: str | None = None
    instance: str | None = None
    status: int = 0
    tokens: int = 0
    queued_ms: float = 0.0
    stream: bool = False
    error_type: str | None = None
    client_gone: bool = False
    upstream_failed: bool = False


def emit(exchange: Exchange, *, duration_ms: float) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    level = logging.WARNING if exchange.status >= 500 or exchange.upstream_failed else logging.INFO
    fields: dict[str, Any] = {
        "event": "request_complete",
        "request_id": exchange.request_id,
        "session_id": exchange.session_id or str(uuid.uuid4()),
        "path": exchange.path,
        "model": exchange.model,
        "profile": exchange.profile,
        "instance": exchange.instance,
        "status": exchange.status,
        "duration_ms": round(duration_ms, 1),
        "queued_ms": round(exchange.queued_ms, 1),
        "tokens": exchange.tokens,
        "stream": exchange.stream,
    }
    if exchange.error_type:
        fields["error_type"] = exchange.error_type
    if exchange.client_gone:
        fields["client_disconnected"] = True
    if exchange.upstream_failed:
        fields["upstream_failed"] = True
    logger.log(level, "%s %s -> %s", exchange.path, exchange.model, exchange.status, extra=fields)
