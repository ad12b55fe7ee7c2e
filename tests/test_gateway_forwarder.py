"""The forwarder's pure parts and the per-request log line.

Covers: which request headers go upstream (hop-by-hop, Host, Content-Length and the client's gateway key
dropped; X-Request-Id set; a profile's `--api-key` sent as a bearer token) and which response headers come
back; reading generated tokens from the end of a response (`usage.completion_tokens`, else
`timings.predicted_n`, else the SSE event count); one JSON log line per request with the seed's fields.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import gateway_support as gs
from llamesh_operator import logsetup
from llamesh_proxy import forwarder


def test_request_headers_sent_upstream() -> None:
    client = {
        "Host": "gateway:8080",
        "Content-Length": "10",
        "Connection": "keep-alive",
        "Keep-Alive": "timeout=5",
        "Transfer-Encoding": "chunked",
        "X-Api-Key": "client-key",
        "Authorization": "Bearer client-key",
        "Content-Type": "application/json",
        "X-Session-Id": "s-1",
        "Accept": "text/event-stream",
    }
    dropped = forwarder.REQUEST_HEADERS_DROPPED | {"x-api-key", "authorization"}
    headers = forwarder.upstream_headers(client, dropped=dropped, api_key=None, request_id="r-1")
    assert dict(headers) == {
        "Content-Type": "application/json",
        "X-Session-Id": "s-1",
        "Accept": "text/event-stream",
        "X-Request-Id": "r-1",
    }
    with_key = forwarder.upstream_headers(client, dropped=dropped, api_key="upstream-secret", request_id="r-1")
    assert with_key["Authorization"] == "Bearer upstream-secret"


@pytest.mark.parametrize(
    ("tail", "events", "expected"),
    [
        (b'data: {"choices":[],"usage":{"completion_tokens":17,"prompt_tokens":3}}\n\ndata: [DONE]\n\n', 0, 17),
        (b'{"usage": {"completion_tokens": 5}, "timings": {"predicted_n": 6}}', 0, 5),
        (b'data: {"choices":[{"finish_reason":"stop"}],"timings":{"predicted_n":9}}\n\ndata: [DONE]\n\n', 12, 9),
        (b"data: [DONE]\n\n", 11, 8),
        (b"", 0, 0),
        (b'{"usage":{"completion_tokens":4}}\n\n{"usage":{"completion_tokens":null}}', 0, 4),  # the last *count*
        (b'{"completion_tokens": 7}' + b" " * forwarder.TAIL_BYTES, 20, 17),  # before the last TAIL_BYTES: unseen
    ],
)
def test_completion_tokens(tail: bytes, events: int, expected: int) -> None:
    assert forwarder.completion_tokens(tail, data_events=events) == expected


async def test_one_json_log_line_per_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = [gs.model("m", gs.profile(max_instances=0))]
    async with gs.running_gateway(tmp_path, models=models, agent=False) as h:
        with caplog.at_level(logging.INFO, logger="llamesh.requests"):
            headers = {"X-Request-Id": "r-9", "X-Session-Id": "s-9"}
            await h.client.post("/v1/chat/completions", json={"model": "m"}, headers=headers)
            await h.client.post("/v1/chat/completions", json={"model": "nope"})
    formatter = logsetup.JsonFormatter(node_id=gs.NODE)
    lines = [json.loads(formatter.format(record)) for record in caplog.records if record.name == "llamesh.requests"]
    assert len(lines) == 2
    first, second = lines
    assert {key: first[key] for key in ("level", "event", "node_id", "request_id", "session_id")} == {
        "level": "warning",
        "event": "request_complete",
        "node_id": gs.NODE,
        "request_id": "r-9",
        "session_id": "s-9",
    }
    assert (first["model"], first["profile"], first["status"], first["error_type"]) == (
        "m",
        "default",
        503,
        "no_capacity",
    )
    assert {"timestamp", "duration_ms", "tokens", "instance", "path"} <= set(first)
    assert (second["status"], second["model"], second["level"]) == (404, None, "info")
    assert len(second["session_id"]) == 36  # generated (a UUID) when the client sends none
