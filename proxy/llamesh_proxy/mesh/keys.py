"""A node's mesh identity and trust: the Noise static key, the cluster token, `known_peers` and `allowed_keys`.

Secrets live in `cluster.noise.config_dir` (default `~/.llama-mesh/`): the folder is created 0700, the
files 0600, and a start finds any of them readable or writable by group or others refused with the path
and the `chmod` that fixes it (a secret others can read is no secret). `CLUSTER_TOKEN` and
`NODE_PRIVATE_KEY` (base64 of the 32-byte X25519 private key) replace the files, for containers.

Trust (`decide`, pure): with `allowed_keys` set, only those keys are accepted (TOFU is off). Otherwise,
with `tofu` on, a peer's first key is recorded in `known_peers` under each name it is known by (`node=<id>`,
and `addr=<host:port>` on the dialling side) and a different key for a recorded name is refused; with
`tofu` off only keys already in `known_peers` are accepted.

Key rotation: a node whose `previous_key_path` is set proves, in the handshake, that it also holds that
older key (see `noise`). A peer that trusted the older key then trusts the new one: under TOFU it re-pins
the new key, with `allowed_keys` it accepts it while the older one is still listed. Once every peer has
seen the new key, drop `previous_key_path` (and the old key from `allowed_keys`).

Not here: the handshake itself (`noise`) and sockets (`transport`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from llamesh_api import config

log = logging.getLogger(__name__)

KEY_PREFIX = "noise25519:"
DEFAULT_CONFIG_DIR = "~/.llama-mesh/"
TOKEN_ENV = "CLUSTER_TOKEN"
PRIVATE_KEY_ENV = "NODE_PRIVATE_KEY"
_SECRET_BITS = stat.S_IRWXG | stat.S_IRWXO  # any access by group or others


class KeysError(Exception):
    """The mesh's secrets cannot be used; the message names the file or variable and the fix."""


class Untrusted(Exception):
    """A peer's key is not trusted by this node; the message says why and what would change that."""


def public_key_text(public_bytes: bytes) -> str:
    """A public key as configs and logs write it: `noise25519:<base64>`."""
    return KEY_PREFIX + base64.b64encode(public_bytes).decode("ascii")


def parse_public_key(text: str) -> bytes:
    """The 32 raw bytes of a `noise25519:<base64>` key; ValueError names what is wrong."""
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"{text!r} is not a Noise key; keys are written 'noise25519:<base64>'")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{text!r} is not valid base64 after 'noise25519:'") from exc
    if len(raw) != 32:
        raise ValueError(f"{text!r} decodes to {len(raw)} bytes; an X25519 public key has 32")
    return raw


@dataclasses.dataclass(frozen=True)
class StaticKey:
    """An X25519 key pair: the Noise static key of a node."""

    private_bytes: bytes

    @property
    def public_bytes(self) -> bytes:
        public = x25519.X25519PrivateKey.from_private_bytes(self.private_bytes).public_key()
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_key(self) -> str:
        return public_key_text(self.public_bytes)

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 with a peer's public key (used to prove possession of a previous key)."""
        private = x25519.X25519PrivateKey.from_private_bytes(self.private_bytes)
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))

    @classmethod
    def generate(cls) -> StaticKey:
        private = x25519.X25519PrivateKey.generate()
        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return cls(raw)

    def __repr__(self) -> str:  # never the private bytes in a log or a traceback
        return f"StaticKey({self.public_key})"


# --- trust: the pure decision ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Policy:
    tofu: bool
    allowed_keys: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str  # why it was refused, or "" when accepted
    record: Mapping[str, str]  # names to (re-)pin in known_peers: name -> key


def decide(
    policy: Policy,
    *,
    known: Mapping[str, str],
    names: Iterable[str],
    key: str,
    previous_key: str | None = None,
) -> Verdict:
    """Whether a peer presenting `key` (and having proven it holds `previous_key`, if given) is trusted.

    `names` are what the peer is known by (`node=<id>`, `addr=<host:port>`); `known` is `known_peers`."""
    names = list(names)
    presented = {key} if previous_key is None else {key, previous_key}
    if policy.allowed_keys:
        if presented & policy.allowed_keys:
            return Verdict(True, "", {})
        return Verdict(False, f"its key {key} is not in cluster.noise.allowed_keys", {})
    record: dict[str, str] = {}
    for name in names:
        pinned = known.get(name)
        if pinned == key:
            continue
        if pinned is not None and pinned == previous_key:
            record[name] = key  # a proven rotation: follow it
            continue
        if pinned is not None:
            return Verdict(
                False,
                f"{name} presented key {key}, but known_peers pins {pinned} for it; if that node was given a "
                f"new key on purpose, remove its line from known_peers (or have it set previous_key_path)",
                {},
            )
        if not policy.tofu:
            return Verdict(
                False, f"{name} is not in known_peers and cluster.noise.tofu is false (key {key} not trusted)", {}
            )
        record[name] = key
    return Verdict(True, "", record)


class TrustStore:
    """`decide` over the `known_peers` file, which it rewrites (0600, atomically) when a key is pinned."""

    def __init__(self, policy: Policy, *, path: Path) -> None:
        self.policy = policy
        self.path = path
        self._known = read_known_peers(path)

    def known(self) -> Mapping[str, str]:
        return dict(self._known)

    def check(self, *, names: Iterable[str], key: str, previous_key: str | None = None) -> None:
        """Raise Untrusted unless the peer is trusted; pin what TOFU learned."""
        verdict = decide(self.policy, known=self._known, names=names, key=key, previous_key=previous_key)
        if not verdict.accepted:
            raise Untrusted(verdict.reason)
        if verdict.record:
            for name, pinned in verdict.record.items():
                log.info("trusting %s with key %s (known_peers)", name, pinned, extra={"event": "mesh_peer_pinned"})
            self._known.update(verdict.record)
            try:
                write_known_peers(self.path, self._known)
            except OSError as exc:  # trusted for now; the pin is lost at restart, so say how to keep it
                log.warning(
                    "cannot write %s (%s); the new pins hold until this node restarts. Fix the folder or "
                    "cluster.noise.known_peers_path",
                    self.path,
                    exc.strerror,
                    extra={"event": "mesh_known_peers_unwritable"},
                )


def read_known_peers(path: Path) -> dict[str, str]:
    """`known_peers`: one `<name> noise25519:<base64>` a line; `#` starts a comment."""
    if not path.exists():
        return {}
    check_private(path)
    known: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, key = line.partition(" ")
        try:
            parse_public_key(key.strip())
        except ValueError as exc:
            raise KeysError(f"{path} line {number}: {exc}; fix or delete that line") from exc
        known[name] = key.strip()
    return known


def write_known_peers(path: Path, known: Mapping[str, str]) -> None:
    lines = ["# llamesh: peers trusted on first use (name key); delete a line to trust a new key for it"]
    lines += [f"{name} {key}" for name, key in sorted(known.items())]
    _write_private(path, "\n".join(lines) + "\n")


# --- the node's own secrets ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshSecurity:
    """What a node brings to every Noise handshake: who it is, what it holds, whom it trusts."""

    node_id: str
    static_key: StaticKey
    token: bytes
    trust: TrustStore
    previous_key: StaticKey | None = None
    session_ttl_s: float = 0.0  # a Noise connection is closed after this long (once its request is done); 0: never

    @property
    def public_key(self) -> str:
        return self.static_key.public_key

    def __repr__(self) -> str:
        return f"MeshSecurity(node_id={self.node_id!r}, public_key={self.public_key!r})"


def load(
    noise: config.NoiseConfig,
    *,
    node_id: str,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
) -> MeshSecurity:
    """The node's identity and trust from `noise` (files generated on first use); KeysError names the fix."""
    environ = os.environ if environ is None else environ
    folder = config.resolve_path(noise.config_dir or DEFAULT_CONFIG_DIR, base_dir=base_dir)
    _ensure_private_dir(folder)

    token_text = environ.get(TOKEN_ENV)
    if token_text is not None:
        if not token_text.strip():
            raise KeysError(f"{TOKEN_ENV} is set but empty; unset it or set it to the cluster's token")
        token = token_text.strip().encode()
    else:
        token = _read_or_create(folder / "cluster_token", lambda: secrets.token_urlsafe(32)).encode()

    key_text = environ.get(PRIVATE_KEY_ENV)
    if key_text is not None:
        static_key = _decode_private(key_text, source=f"environment variable {PRIVATE_KEY_ENV}")
    else:
        key_path = config.resolve_path(noise.private_key_path or str(folder / "node.key"), base_dir=base_dir)
        text = _read_or_create(key_path, lambda: base64.b64encode(StaticKey.generate().private_bytes).decode())
        static_key = _decode_private(text, source=str(key_path))

    previous = None
    if noise.previous_key_path:
        previous_path = config.resolve_path(noise.previous_key_path, base_dir=base_dir)
        if not previous_path.is_file():
            raise KeysError(
                f"cluster.noise.previous_key_path is {previous_path}, which is not a file; point it at the old "
                "node.key or unset it"
            )
        check_private(previous_path)
        previous = _decode_private(previous_path.read_text(), source=str(previous_path))

    allowed = frozenset(noise.allowed_keys)
    for key in allowed:
        try:
            parse_public_key(key)
        except ValueError as exc:
            raise KeysError(f"cluster.noise.allowed_keys: {exc}") from exc
    known_path = config.resolve_path(noise.known_peers_path or str(folder / "known_peers"), base_dir=base_dir)
    trust = TrustStore(Policy(tofu=noise.tofu, allowed_keys=allowed), path=known_path)
    return MeshSecurity(
        node_id=node_id,
        static_key=static_key,
        token=token,
        trust=trust,
        previous_key=previous,
        session_ttl_s=float(noise.session_ttl_seconds),
    )


def check_private(path: Path) -> None:
    """Refuse a secret (file or folder) that group or others may access, naming the fix."""
    mode = path.stat().st_mode
    if mode & _SECRET_BITS:
        wanted = "700" if stat.S_ISDIR(mode) else "600"
        raise KeysError(
            f"{path} has mode {stat.S_IMODE(mode):o}, so other users may read the cluster's secrets; "
            f"run: chmod {wanted} {path}"
        )


def _ensure_private_dir(folder: Path) -> None:
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        folder.chmod(0o700)  # mkdir's mode is masked by the umask
    if not folder.is_dir():
        raise KeysError(f"cluster.noise.config_dir {folder} is not a folder; point it at a folder")
    check_private(folder)


def _read_or_create(path: Path, make: Callable[[], str]) -> str:
    """The file's text (after the permission check), or `make()` written to it 0600 when it is missing."""
    if path.exists():
        check_private(path)
        return path.read_text().strip()
    text = make()
    _write_private(path, text + "\n")
    log.info("generated %s", path, extra={"event": "mesh_secret_generated", "path": str(path)})
    return text


def _write_private(path: Path, text: str) -> None:
    """Write through a 0600 temporary file renamed over `path`: never a moment with looser modes or half a file."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, text.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def _decode_private(text: str, *, source: str) -> StaticKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error as exc:
        raise KeysError(f"{source} is not base64 of an X25519 private key; regenerate it or fix it") from exc
    if len(raw) != 32:
        raise KeysError(f"{source} decodes to {len(raw)} bytes; an X25519 private key has 32")
    return StaticKey(raw)
