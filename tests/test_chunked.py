"""The chunked-body reader the gateway splices streams with (`chunked.Dechunker`).

Covers: whatever the split of the bytes into reads (every split point of a small body, thousands of random
splits of bigger ones, with chunk extensions, upper-case and zero-padded sizes, trailers), the forwarded
bytes are exactly the body's chunks as sent, before its last chunk, and the data exactly what they carry;
nothing after the end is taken, and what is not answered yet starts at a chunk; malformed sizes, a chunk
not followed by CRLF, and over-long size lines or trailer sections are refused.
"""

from __future__ import annotations

import io
import random

import pytest

from llamesh_proxy import chunked


def encode(pieces: list[bytes], *, size_format: str = "{:x}", extension: bytes = b"", trailers: bytes = b"") -> bytes:
    body = b"".join(size_format.format(len(p)).encode() + extension + b"\r\n" + p + b"\r\n" for p in pieces)
    return body + b"0" + extension + b"\r\n" + trailers + b"\r\n"


def reference_decode(body: bytes) -> tuple[bytes, bytes]:
    """(the chunks before the last, their data), read line by line: the same answer by other means."""
    stream, data, consumed = io.BytesIO(body), b"", 0
    while True:
        line = stream.readline()
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return body[:consumed], data
        data += stream.read(size)
        assert stream.read(2) == b"\r\n"
        consumed = stream.tell()


def feed_in_pieces(body: bytes, cuts: list[int]) -> tuple[bytes, bytes, chunked.Dechunker]:
    dechunker = chunked.Dechunker()
    wire, data = b"", b""
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        forwarded, carried = dechunker.feed(body[start:end])
        assert bool(forwarded) == bool(carried)  # whole chunks of data, never a bare frame
        wire, data = wire + forwarded, data + carried
    return wire, data, dechunker


def test_every_split_point_of_a_small_body() -> None:
    body = encode([b'data: {"n":1}\n\n', b"x", b'data: {"usage":{"completion_tokens":2}}\n\n'])
    expected = reference_decode(body)
    for first in range(len(body) + 1):
        for second in range(first, len(body) + 1, 7):
            wire, data, dechunker = feed_in_pieces(body, [first, second])
            assert (wire, data) == expected, (first, second)
            assert dechunker.done


@pytest.mark.parametrize(
    ("size_format", "extension", "trailers"),
    [("{:x}", b"", b""), ("{:X}", b";name=value", b""), ("{:08x}", b" ; a=1", b"X-Checksum: 1\r\nX-More: 2\r\n")],
)
def test_random_splits_of_bigger_bodies(size_format: str, extension: bytes, trailers: bytes) -> None:
    rng = random.Random(7)
    for _ in range(300):
        pieces = [rng.randbytes(rng.choice([1, 2, 15, 16, 17, 255, 4096, 70_000])) for _ in range(rng.randint(1, 12))]
        body = encode(pieces, size_format=size_format, extension=extension, trailers=trailers)
        cuts = sorted(rng.sample(range(len(body) + 1), k=min(len(body), rng.randint(0, 30))))
        wire, data, dechunker = feed_in_pieces(body, cuts)
        assert data == b"".join(pieces)
        assert (wire, data) == reference_decode(body)
        assert dechunker.done


def test_nothing_after_the_end_is_taken_and_an_unfinished_chunk_waits() -> None:
    dechunker = chunked.Dechunker()
    assert dechunker.feed(b"5\r\nhel") == (b"", b"")
    assert dechunker.feed(b"lo\r\n3\r\nab") == (b"5\r\nhello\r\n", b"hello")
    assert dechunker.feed(b"c\r\n0\r\n") == (b"3\r\nabc\r\n", b"abc")
    assert not dechunker.done  # the last chunk's line, but not yet the empty line after it
    assert dechunker.feed(b"\r\nHTTP/1.1 200 OK\r\n") == (b"", b"")
    assert dechunker.done
    assert dechunker.feed(b"5\r\nhello\r\n") == (b"", b"")


def test_what_is_not_answered_yet_starts_at_a_chunk() -> None:
    dechunker = chunked.Dechunker()
    assert dechunker.feed(b"5\r\nhello\r\n3\r\nab") == (b"5\r\nhello\r\n", b"hello")
    assert dechunker.unconsumed() == b"3\r\nab"  # for a parser to go on with
    assert dechunker.unconsumed() == b""


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhi\r\n",
        b"-2\r\nhi\r\n",
        b"0x2\r\nhi\r\n",
        b"+2\r\nhi\r\n",
        b"\r\nhi\r\n",
        b"2\r\nhiX\r\n",
        b"1" * 5000,
        b"0\r\n" + b"X: y\r\n" * 1000,
        b"1" * 17 + b"\r\n",
    ],
)
def test_what_is_no_chunked_body_is_refused(body: bytes) -> None:
    with pytest.raises(chunked.ChunkedError):
        chunked.Dechunker().feed(body)
