"""The gateway's per-request shortcuts (issue 11) decide exactly as the slower code they replaced.

- `inference.parse_object` parses with orjson and hands whatever orjson refuses to the standard library:
  for every body below, the 400 message is the one `json.loads` gives, or the document is, except that
  orjson reads integers beyond 64 bits as floats (no decision depends on a number); `without_stream`,
  which re-encodes a body for embeddings and rerank, keeps them exact;
- `requestlog.random_uuid4` makes version-4, RFC 4122 UUID strings, as `str(uuid.uuid4())`;
- `inference.new_request_id` makes 32 lower-case hex digits, as `os.urandom(16).hex()` did;
- `forwarder.upstream_headers` drops headers by name whatever their case, keeps repeated ones, and keeps
  the client's order.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from llamesh_proxy import errors, forwarder, inference, requestlog

BODIES = [
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
    b'{"a": 1, "a": 2}',  # duplicate keys: the last wins
    b'{"n": NaN, "i": Infinity, "j": -Infinity}',  # orjson refuses these literals; json takes them
    b'{"big": 123456789012345678901234567890}',  # beyond 64 bits: orjson refuses, json takes it
    b'{"f": 1e400, "g": -0.0, "h": 0.1}',
    b'{"s": "\\ud800"}',  # a lone surrogate escape
    b'\xef\xbb\xbf{"bom": true}',  # UTF-8 with a byte-order mark
    '{"utf16": "é"}'.encode("utf-16"),
    b'  {"spaced": [1, 2, 3]}  \n',
    b'{"unicode": "\xc3\xa9\xe2\x82\xac"}',
    b"",
    b"{",
    b'{"a": 1,}',
    b"\xff\xfe\xfa",
    b"[1, 2]",
    b'"text"',
    b"null",
    b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for json's decoder
    b'{"x": ' + b"[" * 2000 + b"]" * 2000 + b"}",  # deeper than orjson's limit, within json's
]


def standard(body: bytes) -> tuple[str, Any]:
    """What the gateway answered before orjson: the document, or the 400's message."""
    try:
        document = json.loads(body)
    except ValueError:
        return "error", "Invalid JSON"
    except RecursionError:
        return "error", "Invalid JSON: nested too deeply"
    if not isinstance(document, dict):
        return "error", "Request body must be a JSON object"
    return "ok", document


def same(left: Any, right: Any) -> bool:
    """Equality that also holds for NaN (which is never equal to itself) and tells -0.0 from 0.0."""
    if isinstance(left, float) and isinstance(right, float):
        if math.isnan(left) or math.isnan(right):
            return math.isnan(left) and math.isnan(right)
        return left == right and math.copysign(1, left) == math.copysign(1, right)
    if isinstance(left, dict) and isinstance(right, dict):
        return list(left) == list(right) and all(same(left[key], right[key]) for key in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
    return type(left) is type(right) and left == right


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_parse_object_decides_as_the_standard_library(body: bytes) -> None:
    expected_kind, expected = standard(body)
    try:
        document = inference.parse_object(body)
    except errors.InvalidRequest as exc:
        assert (expected_kind, exc.message) == ("error", expected)
    else:
        assert expected_kind == "ok", expected
        if b"big" in body:  # the one difference: integers beyond 64 bits
            assert document == {"big": float(expected["big"])}
        else:
            assert same(document, expected), (document, expected)
        assert (
            inference.without_stream(body)
            == json.dumps({key: value for key, value in expected.items() if key != "stream"}).encode()
        )


def test_random_uuid4_is_a_version_4_uuid() -> None:
    made = {requestlog.random_uuid4() for _ in range(5000)}
    assert len(made) == 5000
    for text in made:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)


def test_new_request_id_is_32_hex_digits() -> None:
    made = {inference.new_request_id() for _ in range(5000)}
    assert len(made) == 5000
    assert all(re.fullmatch(r"[0-9a-f]{32}", text) for text in made)


def test_upstream_headers_drop_by_name_in_any_case_and_keep_order() -> None:
    client = CIMultiDict(
        [
            ("HOST", "gw"),
            ("Accept", "a"),
            ("x-api-key", "secret"),
            ("X-Custom", "1"),
            ("CONNECTION", "keep-alive"),
            ("x-custom", "2"),
            ("X-Request-Id", "client-id"),
        ]
    )
    dropped = forwarder.REQUEST_HEADERS_DROPPED | {"x-api-key"}
    headers = forwarder.upstream_headers(CIMultiDictProxy(client), dropped=dropped, api_key="k", request_id="r-1")
    assert list(headers.items()) == [
        ("Accept", "a"),
        ("X-Custom", "1"),
        ("x-custom", "2"),
        ("X-Request-Id", "r-1"),
        ("Authorization", "Bearer k"),
    ]
