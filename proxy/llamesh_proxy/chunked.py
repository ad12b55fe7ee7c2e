"""An HTTP/1.1 chunked body read incrementally (RFC 9112 §7.1), for relaying it without re-encoding it.

`Dechunker.feed` takes the bytes as they come off the socket and answers with the complete chunks at their
front, exactly as they arrived (to be written on to a client whose answer is chunked too), and the data those
chunks carry (for the gateway's own reading of the stream: token counts, the usage event). A chunk that has
not fully arrived waits for the next feed, so what is forwarded is always whole chunks and the relaying side
may switch to writing its own chunks at any point between them. The last chunk (`0`), any trailer fields
and the final empty line end the body (`done`); they are never part of what is forwarded, because the
relaying side writes its own end.
"""

from __future__ import annotations

import re

MAX_LINE = 4096  # a chunk-size line (with extensions) or a trailer section longer than this is refused

_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ChunkedError(ValueError):
    """The bytes are not a chunked body."""


class Dechunker:
    __slots__ = ("_buffer", "done")

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False

    def unconsumed(self) -> bytes:
        """What was fed but not yet answered (the start of an unfinished chunk, or nothing): it starts at a
        chunk, so a chunked parser handed it, and the bytes after it, reads the rest of the body."""
        rest, self._buffer = self._buffer, b""
        return rest

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """(`wire`, `data`): the complete chunks at the front of what has arrived so far, as they arrived, and
        the data they carry. Raises `ChunkedError` on bytes that are no chunked body; after `done`, the rest
        is ignored."""
        if self.done:
            return b"", b""
        buffer = self._buffer + data if self._buffer else data
        position = 0
        pieces: list[bytes] = []
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                if len(buffer) - position > MAX_LINE:
                    raise ChunkedError("chunk size line too long")
                break
            size_text = buffer[position:line_end].split(b";", 1)[0].strip(b" \t")
            if _SIZE.fullmatch(size_text) is None:
                raise ChunkedError(f"bad chunk size {buffer[position:line_end][:40]!r}")
            size = int(size_text, 16)
            if size == 0:  # the last chunk: then trailer fields, each ending in CRLF, and an empty line
                end = buffer.find(b"\r\n\r\n", line_end)
                if end >= 0:
                    self.done = True
                    self._buffer = b""
                    return buffer[:position], b"".join(pieces)
                if len(buffer) - line_end > MAX_LINE:
                    raise ChunkedError("trailer section too long")
                break
            start = line_end + 2
            end = start + size
            if len(buffer) < end + 2:
                break
            if buffer[end : end + 2] != b"\r\n":
                raise ChunkedError("chunk data not followed by CRLF")
            pieces.append(buffer[start:end])
            position = end + 2
        self._buffer = buffer[position:]
        if position == 0:
            return b"", b""
        return buffer[:position], b"".join(pieces) if len(pieces) != 1 else pieces[0]
