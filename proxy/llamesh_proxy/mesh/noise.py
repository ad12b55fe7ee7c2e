"""One Noise_XX_25519_ChaChaPoly_SHA256 session between two nodes, as bytes in and bytes out (no sockets).

Wire format, on the gateway's public port (protocol detection tells it from TLS and HTTP by its first bytes):

    client -> server   MAGIC ("LMNZ"), then frames
    frame              2-byte big-endian length (1..65535), then that many bytes
    handshake          XX: -> e;  <- e, ee, s, es;  -> s, se   (prologue PROLOGUE)
    hellos             -> initiator hello;  <- responder hello or refusal  (first encrypted frames, JSON)
    then               encrypted frames both ways: the HTTP/1.1 bytes, at most MAX_PLAINTEXT per frame

A hello carries the sender's node id and `HMAC-SHA256(cluster token, label || role || handshake hash)`: the
handshake hash binds the proof to this session, so a recorded proof is worthless elsewhere, and the role
keeps a responder's proof from being reflected. A node rotating its key adds its previous public key and
`HMAC-SHA256(X25519(previous private, peer static), label || role || handshake hash)`, which only a holder
of the previous private key can compute (the peer computes the same X25519 from its own static key).

The responder checks the initiator's hello before it sends its own (a stranger learns nothing), and
answers a failed check with an encrypted refusal naming the reason, then the caller closes. Any frame that
fails authentication (tampered, replayed, reordered) raises `NoiseError`: the connection must be dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from typing import Any

from noise import connection as noise_connection
from noise import exceptions as noise_exceptions

from llamesh_proxy.mesh import keys

MAGIC = b"LMNZ"
PROLOGUE = b"llamesh-noise-v1"
PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
MAX_FRAME = 65535
MAX_PLAINTEXT = MAX_FRAME - 16  # the ChaChaPoly tag
_LENGTH = struct.Struct(">H")
_TOKEN_LABEL = b"llamesh-token-v1|"
_ROTATION_LABEL = b"llamesh-rotation-v1|"


class NoiseError(Exception):
    """The session cannot go on: a malformed, tampered or unexpected message. Drop the connection."""


class Refused(NoiseError):
    """The other side (or this side) refused the peer; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class NoisePeer:
    """The authenticated other end of a session (what handlers see as `llamesh.noise_peer`)."""

    public_key: str  # noise25519:<base64>, the key it used in this handshake
    node_id: str
    previous_key: str | None = None  # a proven older key, while the peer rotates


Authorize = Callable[[NoisePeer], None]  # raises keys.Untrusted to refuse


class _State(enum.Enum):
    MAGIC = enum.auto()  # responder: before the marker
    HANDSHAKE = enum.auto()
    HELLO = enum.auto()  # waiting for the other side's hello
    OPEN = enum.auto()
    CLOSED = enum.auto()


@dataclasses.dataclass
class Received:
    """What one call to `Session.receive` produced."""

    plaintext: bytes = b""  # application bytes, in order
    outgoing: bytes = b""  # to write to the socket now
    refusal: str | None = None  # this side refused the peer: write `outgoing`, then close


class Session:
    """One side of one session. `start()` (initiator) or the first `receive()` (responder) begins it."""

    def __init__(self, security: keys.MeshSecurity, *, initiator: bool, authorize: Authorize) -> None:
        self._security = security
        self._initiator = initiator
        self._authorize = authorize
        self._buffer = bytearray()
        self._state = _State.HANDSHAKE if initiator else _State.MAGIC
        self._noise = noise_connection.NoiseConnection.from_name(PROTOCOL_NAME)
        self._noise.set_prologue(PROLOGUE)
        self._noise.set_keypair_from_private_bytes(noise_connection.Keypair.STATIC, security.static_key.private_bytes)
        if initiator:
            self._noise.set_as_initiator()
        else:
            self._noise.set_as_responder()
        self._noise.start_handshake()
        self._remote_static: bytes | None = None
        self.peer: NoisePeer | None = None

    @property
    def established(self) -> bool:
        return self._state is _State.OPEN

    def start(self) -> bytes:
        """The initiator's first bytes: the marker and handshake message 1."""
        assert self._initiator and self._state is _State.HANDSHAKE
        return MAGIC + _frame(bytes(self._noise.write_message()))

    def receive(self, data: bytes) -> Received:
        """Feed bytes from the socket; raises NoiseError (or Refused, on the initiator) to end the session."""
        if self._state is _State.CLOSED:
            raise NoiseError("the session is closed")
        self._buffer += data
        result = Received()
        try:
            if self._state is _State.MAGIC:
                if len(self._buffer) < len(MAGIC):
                    return result
                if bytes(self._buffer[: len(MAGIC)]) != MAGIC:
                    raise NoiseError("not a llamesh Noise connection (no LMNZ marker)")
                del self._buffer[: len(MAGIC)]
                self._state = _State.HANDSHAKE
            plaintext = bytearray()
            for frame in self._frames():
                if self._state is _State.OPEN:
                    plaintext += self._decrypt(frame)
                else:
                    self._step(frame, result)
                    if result.refusal is not None:
                        self._state = _State.CLOSED
                        return result
            result.plaintext = bytes(plaintext)
            return result
        except NoiseError:
            self._state = _State.CLOSED
            raise

    def seal(self, plaintext: bytes) -> bytes:
        """Application bytes as encrypted frames."""
        if self._state is not _State.OPEN:
            raise NoiseError("the handshake is not finished")
        view = memoryview(plaintext)
        return b"".join(
            _frame(self._noise.encrypt(bytes(view[start : start + MAX_PLAINTEXT])))
            for start in range(0, len(view), MAX_PLAINTEXT)
        )

    # --- the handshake -----------------------------------------------------------------------------------------

    def _frames(self) -> list[bytes]:
        frames = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length == 0:
                raise NoiseError("an empty frame")
            if len(self._buffer) < _LENGTH.size + length:
                break
            frames.append(bytes(self._buffer[_LENGTH.size : _LENGTH.size + length]))
            del self._buffer[: _LENGTH.size + length]
        return frames

    def _step(self, frame: bytes, result: Received) -> None:
        if self._state is _State.HANDSHAKE:
            self._handshake(frame, result)
        elif self._state is _State.HELLO:
            self._hello(frame, result)

    def _handshake(self, frame: bytes, result: Received) -> None:
        # The remote static key lives in the handshake state, which the library drops when the handshake ends.
        state = self._noise.noise_protocol.handshake_state
        try:
            self._noise.read_message(frame)
        except (noise_exceptions.NoiseError, ValueError, TypeError) as exc:
            raise NoiseError(f"handshake message rejected: {exc}") from exc
        except Exception as exc:  # cryptography's InvalidTag and friends during the handshake
            raise NoiseError(f"handshake message rejected: {type(exc).__name__}") from exc
        if self._remote_static is None and getattr(state.rs, "public_bytes", None) is not None:
            self._remote_static = bytes(state.rs.public_bytes)
        if self._initiator:  # after <- e, ee, s, es: send -> s, se and the hello at once
            result.outgoing += _frame(bytes(self._noise.write_message()))
            result.outgoing += _frame(self._noise.encrypt(self._hello_bytes()))
            self._state = _State.HELLO
        elif not self._noise.handshake_finished:  # after -> e: answer <- e, ee, s, es
            result.outgoing += _frame(bytes(self._noise.write_message()))
        else:
            self._state = _State.HELLO

    def _hello(self, frame: bytes, result: Received) -> None:
        message = _json(self._decrypt(frame))
        if "refused" in message:
            raise Refused(f"the peer refused this node: {message['refused']}")
        try:
            self.peer = self._verify(message)
        except Refused as exc:
            if self._initiator:
                raise
            result.outgoing += _frame(self._noise.encrypt(json.dumps({"refused": exc.reason}).encode()))
            result.refusal = exc.reason
            return
        if not self._initiator:
            result.outgoing += _frame(self._noise.encrypt(self._hello_bytes()))
        self._state = _State.OPEN

    def _hello_bytes(self) -> bytes:
        security = self._security
        hello: dict[str, Any] = {
            "node_id": security.node_id,
            "token_proof": self._token_proof(security.token, self._role(self._initiator)),
        }
        if security.previous_key is not None:
            assert self._remote_static is not None
            hello["previous_key"] = security.previous_key.public_key
            shared = security.previous_key.exchange(self._remote_static)
            hello["previous_key_proof"] = self._mac(shared, _ROTATION_LABEL, self._role(self._initiator))
        return json.dumps(hello).encode()

    def _verify(self, hello: dict[str, Any]) -> NoisePeer:
        """The peer's hello: its token proof, its rotation proof if any, then the trust decision."""
        assert self._remote_static is not None
        node_id = hello.get("node_id")
        if not isinstance(node_id, str) or not node_id:
            raise Refused("its hello has no node_id")
        expected = self._token_proof(self._security.token, self._role(not self._initiator))
        if not hmac.compare_digest(str(hello.get("token_proof", "")), expected):
            raise Refused(f"node {node_id} did not prove the cluster token (a different CLUSTER_TOKEN/cluster_token)")
        previous = hello.get("previous_key")
        if previous is not None:
            try:
                previous_bytes = keys.parse_public_key(str(previous))
            except ValueError as exc:
                raise Refused(f"node {node_id} sent a malformed previous_key: {exc}") from None
            shared = self._security.static_key.exchange(previous_bytes)
            proof = self._mac(shared, _ROTATION_LABEL, self._role(not self._initiator))
            if not hmac.compare_digest(str(hello.get("previous_key_proof", "")), proof):
                raise Refused(f"node {node_id} named a previous key it could not prove it holds")
        peer = NoisePeer(
            public_key=keys.public_key_text(self._remote_static),
            node_id=node_id,
            previous_key=None if previous is None else str(previous),
        )
        try:
            self._authorize(peer)
        except keys.Untrusted as exc:
            raise Refused(str(exc)) from None
        return peer

    def _token_proof(self, token: bytes, role: bytes) -> str:
        return self._mac(token, _TOKEN_LABEL, role)

    def _mac(self, key: bytes, label: bytes, role: bytes) -> str:
        message = label + role + b"|" + bytes(self._noise.get_handshake_hash())
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    @staticmethod
    def _role(initiator: bool) -> bytes:
        return b"initiator" if initiator else b"responder"

    def _decrypt(self, frame: bytes) -> bytes:
        try:
            return bytes(self._noise.decrypt(frame))
        except noise_exceptions.NoiseInvalidMessage as exc:
            raise NoiseError("a frame failed authentication (tampered, replayed or out of order)") from exc


def _frame(payload: bytes) -> bytes:
    if not 0 < len(payload) <= MAX_FRAME:
        raise NoiseError(f"a frame of {len(payload)} bytes")
    return _LENGTH.pack(len(payload)) + payload


def _json(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise NoiseError("a hello that is not JSON") from exc
    if not isinstance(value, dict):
        raise NoiseError("a hello that is not a JSON object")
    return value
