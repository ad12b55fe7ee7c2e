"""Node-to-node security: Noise_XX sessions, the cluster token, key pinning, the secrets on disk, and the
public port's protocol detection.

Covers: `detect` tells HTTP/1.1, Noise, TLS and h2c apart by first bytes; the trust decision (TOFU pins,
a changed key refused, a proven rotation followed, allowed_keys, tofu off); two in-process sessions
authenticate each other and carry data both ways; a wrong token, an unpinned key, a changed key and a
forged rotation are refused with the reason on both sides; rotation through previous_key_path; secrets
generated 0700/0600, loose modes refused naming the file and the chmod, CLUSTER_TOKEN and NODE_PRIVATE_KEY
overrides. Over real sockets against the gateway as `llamesh serve` opens it: a NoiseConnector session is
served and the handler sees the peer's key, plain HTTP still works and sees no peer, a wrong token or an
unpinned key is refused while the server keeps serving, a flipped bit in a frame drops the connection, a
session is closed after `session_ttl_seconds`, Noise on a node without it is closed, a silent Noise client
is closed by the header deadline, and h2c gets a GOAWAY. With the real llama-server under `llamesh serve`:
/v1/models and a streamed chat completion through Noise, and loose key permissions stop the start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import stat
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

import noise_support as ms
from llamesh_api import config
from llamesh_proxy import connections
from llamesh_proxy.mesh import keys, noise, transport
from rig import processes, waiting

# --- detection and the trust decision (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "wire"),
    [
        (b"GET / HTTP/1.1\r\n", transport.Wire.HTTP1),
        (b"POST /v1/chat", transport.Wire.HTTP1),
        (b"PUT", transport.Wire.HTTP1),
        (b"LMNZ\x00\x20", transport.Wire.NOISE),
        (b"\x16\x03\x01\x02\x00", transport.Wire.TLS),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", transport.Wire.H2C),
        (b"LMNX", transport.Wire.HTTP1),
        (b"\x16\x01", transport.Wire.HTTP1),
    ],
)
def test_detect_tells_the_protocol_by_its_first_bytes(first: bytes, wire: transport.Wire) -> None:
    assert transport.detect(first) is wire


@pytest.mark.parametrize("prefix", [b"L", b"LMN", b"\x16", b"P", b"PRI"])
def test_detect_waits_while_the_first_bytes_could_be_any(prefix: bytes) -> None:
    assert transport.detect(prefix) is None


KEY_A, KEY_B, KEY_C = (keys.StaticKey.generate().public_key for _ in range(3))
TOFU = keys.Policy(tofu=True, allowed_keys=frozenset())


def test_tofu_pins_a_new_peer_under_each_name_and_accepts_it_again() -> None:
    first = keys.decide(TOFU, known={}, names=["node=b", "addr=h:1"], key=KEY_A)
    assert first.accepted and first.record == {"node=b": KEY_A, "addr=h:1": KEY_A}
    again = keys.decide(TOFU, known=first.record, names=["node=b", "addr=h:1"], key=KEY_A)
    assert again.accepted and again.record == {}


def test_tofu_refuses_a_changed_key_for_a_known_name() -> None:
    verdict = keys.decide(TOFU, known={"node=b": KEY_A}, names=["node=b"], key=KEY_B)
    assert not verdict.accepted and verdict.record == {}
    assert f"node=b presented key {KEY_B}, but known_peers pins {KEY_A}" in verdict.reason
    assert "remove its line from known_peers" in verdict.reason
    moved = keys.decide(TOFU, known={"addr=h:1": KEY_A}, names=["node=c", "addr=h:1"], key=KEY_B)
    assert not moved.accepted  # another node answering on a pinned address


def test_a_proven_rotation_is_followed_and_repinned() -> None:
    verdict = keys.decide(TOFU, known={"node=b": KEY_A}, names=["node=b"], key=KEY_B, previous_key=KEY_A)
    assert verdict.accepted and verdict.record == {"node=b": KEY_B}
    elsewhere = keys.decide(TOFU, known={"node=b": KEY_C}, names=["node=b"], key=KEY_B, previous_key=KEY_A)
    assert not elsewhere.accepted


def test_allowed_keys_accept_only_listed_keys_and_pin_nothing() -> None:
    policy = keys.Policy(tofu=True, allowed_keys=frozenset({KEY_A}))
    assert keys.decide(policy, known={}, names=["node=b"], key=KEY_A) == keys.Verdict(True, "", {})
    refused = keys.decide(policy, known={"node=b": KEY_B}, names=["node=b"], key=KEY_B)
    assert not refused.accepted and "not in cluster.noise.allowed_keys" in refused.reason
    assert keys.decide(policy, known={}, names=["node=b"], key=KEY_B, previous_key=KEY_A).accepted  # rotating


def test_without_tofu_only_known_peers_are_accepted() -> None:
    policy = keys.Policy(tofu=False, allowed_keys=frozenset())
    assert keys.decide(policy, known={"node=b": KEY_A}, names=["node=b"], key=KEY_A).accepted
    refused = keys.decide(policy, known={}, names=["node=b"], key=KEY_A)
    assert not refused.accepted and "tofu is false" in refused.reason


# --- sessions in process ------------------------------------------------------------------------------------------


def authorizer(security: keys.MeshSecurity) -> noise.Authorize:
    def authorize(peer: noise.NoisePeer) -> None:
        security.trust.check(names=[f"node={peer.node_id}"], key=peer.public_key, previous_key=peer.previous_key)

    return authorize


def pair(initiator: keys.MeshSecurity, responder: keys.MeshSecurity) -> tuple[noise.Session, noise.Session]:
    """Run the handshake between two in-process sessions; raises Refused on the initiator's side."""
    client = noise.Session(initiator, initiator=True, authorize=authorizer(initiator))
    server = noise.Session(responder, initiator=False, authorize=authorizer(responder))
    to_server = client.start()
    while to_server:
        answer = server.receive(to_server)
        if answer.refusal is not None:
            client.receive(answer.outgoing)  # raises the refusal on the initiator
            raise AssertionError("the initiator did not raise the refusal")
        to_server = client.receive(answer.outgoing).outgoing if answer.outgoing else b""
    return client, server


def test_two_sessions_authenticate_each_other_and_carry_data_both_ways(tmp_path: Path) -> None:
    a, b = ms.security(tmp_path, "a"), ms.security(tmp_path, "b")
    client, server = pair(a, b)
    assert client.established and server.established
    assert client.peer == noise.NoisePeer(public_key=b.public_key, node_id="b")
    assert server.peer == noise.NoisePeer(public_key=a.public_key, node_id="a")
    big = os.urandom(200_000)  # more than three frames
    assert server.receive(client.seal(big)).plaintext == big
    assert client.receive(server.seal(b"pong")).plaintext == b"pong"
    sealed = client.seal(b"secret request")
    assert b"secret request" not in sealed


def test_a_wrong_token_is_refused_on_both_sides(tmp_path: Path) -> None:
    a, b = ms.security(tmp_path, "a", token="not-the-token"), ms.security(tmp_path, "b")
    with pytest.raises(noise.Refused, match="node a did not prove the cluster token"):
        pair(a, b)
    assert b.trust.known() == {}  # nothing pinned for a refused peer


def test_an_unpinned_key_is_refused_with_allowed_keys(tmp_path: Path) -> None:
    a = ms.security(tmp_path, "a")
    outsider = ms.security(tmp_path, "outsider")
    b = ms.security(tmp_path, "b", allowed_keys=[a.public_key])
    pair(a, b)
    with pytest.raises(noise.Refused, match=r"is not in cluster.noise.allowed_keys"):
        pair(outsider, b)


def test_tofu_records_a_key_then_refuses_another_for_the_same_node(tmp_path: Path) -> None:
    a, b = ms.security(tmp_path, "a"), ms.security(tmp_path, "b")
    pair(a, b)
    known_peers = tmp_path / "b" / "known_peers"
    assert f"node=a {a.public_key}" in known_peers.read_text()
    assert stat.S_IMODE(known_peers.stat().st_mode) == 0o600
    impostor = ms.security(tmp_path, "a", config_dir=str(tmp_path / "impostor"))  # same node id, new key
    with pytest.raises(noise.Refused, match=r"node=a presented key .* but known_peers pins"):
        pair(impostor, b)
    reloaded = ms.security(tmp_path, "b")  # the pin survives a restart
    with pytest.raises(noise.Refused, match="known_peers pins"):
        pair(impostor, reloaded)


def test_rotation_through_previous_key_path_is_accepted_by_peers_that_pinned_the_old_key(tmp_path: Path) -> None:
    a, b = ms.security(tmp_path, "a"), ms.security(tmp_path, "b")
    pair(a, b)  # b pins a's first key
    old_key = tmp_path / "a" / "node.key"
    (tmp_path / "a-old.key").write_text(old_key.read_text())
    (tmp_path / "a-old.key").chmod(0o600)
    old_key.unlink()  # a new node.key is generated at the next load
    rotated = ms.security(tmp_path, "a", previous_key_path=str(tmp_path / "a-old.key"))
    assert rotated.public_key != a.public_key
    _, server = pair(rotated, b)
    assert server.peer is not None and server.peer.previous_key == a.public_key
    assert f"node=a {rotated.public_key}" in (tmp_path / "b" / "known_peers").read_text()  # re-pinned
    finished = ms.security(tmp_path, "a")  # previous_key_path dropped once every peer has the new key
    pair(finished, b)


def test_an_unwritable_known_peers_keeps_the_pin_in_memory_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = ms.security(tmp_path, "a")
    b = ms.security(tmp_path, "b", known_peers_path=str(tmp_path / "no-such-folder" / "known_peers"))
    pair(a, b)
    assert b.trust.known() == {"node=a": a.public_key}
    [warning] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert warning.getMessage().startswith(f"cannot write {tmp_path / 'no-such-folder' / 'known_peers'} (")
    impostor = ms.security(tmp_path, "a", config_dir=str(tmp_path / "impostor"))
    with pytest.raises(noise.Refused, match="known_peers pins"):
        pair(impostor, b)


def test_a_rotation_claim_without_the_old_private_key_is_refused(tmp_path: Path) -> None:
    a, b = ms.security(tmp_path, "a"), ms.security(tmp_path, "b")
    pair(a, b)
    forger = ms.security(tmp_path, "a", config_dir=str(tmp_path / "forger"))
    # It names a's public key as its previous one, but holds another private key under that name.
    claimed = keys.MeshSecurity(
        node_id="a",
        static_key=forger.static_key,
        token=forger.token,
        trust=forger.trust,
        previous_key=keys.StaticKey.generate(),
    )
    with pytest.raises(noise.Refused, match="known_peers pins"):
        pair(claimed, b)


# --- secrets on disk ---------------------------------------------------------------------------------------------


def test_secrets_are_generated_with_private_modes_and_kept(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    first = keys.load(ms_noise(folder), node_id="a", base_dir=tmp_path, environ={})
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("cluster_token", "node.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert len(base64.b64decode((folder / "node.key").read_text())) == 32
    again = keys.load(ms_noise(folder), node_id="a", base_dir=tmp_path, environ={})
    assert (again.public_key, again.token) == (first.public_key, first.token)
    assert len(first.token) >= 32


def ms_noise(folder: Path, **fields: object) -> config.NoiseConfig:
    return config.NoiseConfig.model_validate({"config_dir": str(folder), **fields})


@pytest.mark.parametrize(("name", "mode", "fix"), [("node.key", 0o644, "600"), ("cluster_token", 0o640, "600")])
def test_a_secret_file_others_can_read_stops_loading_naming_the_file_and_the_fix(
    tmp_path: Path, name: str, mode: int, fix: str
) -> None:
    folder = tmp_path / "secrets"
    keys.load(ms_noise(folder), node_id="a", base_dir=tmp_path, environ={})
    (folder / name).chmod(mode)
    with pytest.raises(keys.KeysError) as raised:
        keys.load(ms_noise(folder), node_id="a", base_dir=tmp_path, environ={})
    assert str(raised.value) == (
        f"{folder / name} has mode {mode:o}, so other users may read the cluster's secrets; "
        f"run: chmod {fix} {folder / name}"
    )


def test_a_secrets_folder_others_can_enter_stops_loading(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(keys.KeysError, match=rf"{folder} has mode 755, .* run: chmod 700 {folder}"):
        keys.load(ms_noise(folder), node_id="a", base_dir=tmp_path, environ={})


def test_environment_overrides_replace_the_files(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    private = keys.StaticKey.generate()
    environ = {"CLUSTER_TOKEN": "from-env", "NODE_PRIVATE_KEY": base64.b64encode(private.private_bytes).decode()}
    loaded = keys.load(ms_noise(folder), node_id="a", base_dir=tmp_path, environ=environ)
    assert loaded.token == b"from-env" and loaded.public_key == private.public_key
    assert not (folder / "cluster_token").exists() and not (folder / "node.key").exists()
    with pytest.raises(keys.KeysError, match="environment variable NODE_PRIVATE_KEY decodes to 3 bytes"):
        keys.load(ms_noise(folder), node_id="a", base_dir=tmp_path, environ={"NODE_PRIVATE_KEY": "YWJj"})


def test_bad_key_settings_are_refused_with_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    with pytest.raises(keys.KeysError, match=r"previous_key_path is .*missing.key, which is not a file"):
        keys.load(ms_noise(folder, previous_key_path="missing.key"), node_id="a", base_dir=tmp_path, environ={})
    with pytest.raises(keys.KeysError, match="allowed_keys: 'abc' is not a Noise key"):
        keys.load(ms_noise(folder, allowed_keys=["abc"]), node_id="a", base_dir=tmp_path, environ={})


# --- over real sockets, against the gateway as `llamesh serve` opens it -------------------------------------------


@contextlib.asynccontextmanager
async def noise_gateway(tmp_path: Path, **http: object) -> AsyncIterator[tuple[ms.Served, keys.MeshSecurity]]:
    server = ms.security(tmp_path, "server")
    async with ms.serving(tmp_path, layers=connections.Layers(noise=server), **http) as served:
        yield served, server


def mesh_client(security: keys.MeshSecurity) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=transport.NoiseConnector(security))


async def test_a_noise_client_is_served_and_the_handler_sees_its_key(tmp_path: Path) -> None:
    client = ms.security(tmp_path, "client")
    async with noise_gateway(tmp_path) as (served, server), mesh_client(client) as session:
        for _ in range(3):  # one pooled connection, several requests
            async with session.get(served.base_url + "/whoami") as response:
                assert response.status == 200
                assert await response.json() == {"secure": False, "public_key": client.public_key, "node_id": "client"}
        async with session.get(served.base_url + "/v1/models") as response:
            assert response.status == 200
            assert [model["id"] for model in (await response.json())["data"]] == ["m"]
        body = os.urandom(900_000)  # many frames each way, through both sides' flow control
        async with session.post(served.base_url + "/echo", data=body) as response:
            assert await response.read() == body
        async with session.post(served.base_url + "/v1/chat/completions", json={"model": "nope"}) as response:
            assert response.status == 404 and "nope" in (await response.json())["error"]["message"]
    assert f"node=client {client.public_key}" in (tmp_path / "server" / "known_peers").read_text()
    assert f"node=server {server.public_key}" in (tmp_path / "client" / "known_peers").read_text()
    assert f"addr=127.0.0.1:{served.port} {server.public_key}" in (tmp_path / "client" / "known_peers").read_text()


async def test_plain_http_is_served_alongside_and_sees_no_peer(tmp_path: Path) -> None:
    async with noise_gateway(tmp_path) as (served, _), aiohttp.ClientSession() as session:
        async with session.get(served.base_url + "/whoami") as response:
            assert await response.json() == {"secure": False}
        async with session.get(served.base_url + "/healthz") as response:
            assert response.status == 200


async def test_a_wrong_token_is_refused_and_the_server_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = ms.security(tmp_path, "stranger", token="guessed")
    member = ms.security(tmp_path, "member")
    async with noise_gateway(tmp_path) as (served, _):
        async with mesh_client(stranger) as session:
            with pytest.raises(aiohttp.ClientConnectorError, match="did not prove the cluster token"):
                await session.get(served.base_url + "/healthz")
        async with mesh_client(member) as session, session.get(served.base_url + "/whoami") as response:
            assert (await response.json())["node_id"] == "member"
    refusals = [record for record in caplog.records if getattr(record, "event", None) == "mesh_peer_refused"]
    assert [record.levelno for record in refusals] == [logging.WARNING]
    assert "refused a mesh connection from 127.0.0.1: node stranger did not prove" in refusals[0].getMessage()
    assert "guessed" not in caplog.text and ms.TOKEN not in caplog.text


async def test_an_unpinned_key_is_refused_over_the_socket(tmp_path: Path) -> None:
    member, outsider = ms.security(tmp_path, "member"), ms.security(tmp_path, "outsider")
    server = ms.security(tmp_path, "server", allowed_keys=[member.public_key])
    async with ms.serving(tmp_path, layers=connections.Layers(noise=server)) as served:
        async with mesh_client(outsider) as session:
            with pytest.raises(aiohttp.ClientConnectorError, match=r"not in cluster.noise.allowed_keys"):
                await session.get(served.base_url + "/healthz")
        async with mesh_client(member) as session, session.get(served.base_url + "/healthz") as response:
            assert response.status == 200


async def test_the_client_refuses_a_server_whose_key_changed(tmp_path: Path) -> None:
    client = ms.security(tmp_path, "client")
    async with (
        noise_gateway(tmp_path) as (served, _),
        mesh_client(client) as session,
        session.get(served.base_url + "/healthz") as response,
    ):
        assert response.status == 200
    impostor = ms.security(tmp_path, "server", config_dir=str(tmp_path / "impostor"))
    # A pinned name: the same node id (and, were the port the same, the same address).
    async with (
        ms.serving(tmp_path, layers=connections.Layers(noise=impostor)) as served,
        mesh_client(client) as session,
    ):
        with pytest.raises(aiohttp.ClientConnectorError, match="node=server presented key"):
            await session.get(served.base_url + "/healthz")


async def test_a_flipped_bit_in_a_frame_drops_the_connection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = ms.security(tmp_path, "client")
    async with noise_gateway(tmp_path) as (served, _), ms.Relay(served.port) as relay, mesh_client(client) as session:
        url = f"http://127.0.0.1:{relay.port}"
        async with session.get(url + "/healthz") as response:
            assert response.status == 200
        relay.flip_next = True  # the next request's frame, on the same pooled connection
        with pytest.raises(aiohttp.ClientError):  # a POST: aiohttp does not retry it on a new connection
            async with session.post(url + "/v1/chat/completions", json={"model": "m"}) as response:
                await response.read()
        assert relay.flipped.is_set()
        async with session.get(url + "/healthz") as response:  # a new session, served
            assert response.status == 200
    dropped = [record for record in caplog.records if getattr(record, "event", None) == "mesh_noise_error"]
    assert len(dropped) == 1 and "a frame failed authentication" in dropped[0].getMessage()


async def test_a_noise_connection_is_closed_after_the_session_ttl_and_the_next_request_handshakes_anew(
    tmp_path: Path,
) -> None:
    client = ms.security(tmp_path, "client")
    server = ms.security(tmp_path, "server", session_ttl_seconds=1)
    async with (
        ms.serving(tmp_path, layers=connections.Layers(noise=server)) as served,
        mesh_client(client) as session,
    ):
        gateway_server = served.runner.server
        assert isinstance(gateway_server, connections._Server)
        async with session.get(served.base_url + "/healthz") as response:
            assert response.status == 200
        assert gateway_server.open_connections == 1  # pooled, kept alive
        # Well before aiohttp's client would let the pooled connection go (15 s idle).
        await waiting.eventually(
            lambda: gateway_server.open_connections == 0, within_s=10, what="the session to expire"
        )
        async with session.get(served.base_url + "/healthz") as response:
            assert response.status == 200


async def test_noise_on_a_node_without_it_is_closed(tmp_path: Path) -> None:
    client = ms.security(tmp_path, "client")
    async with ms.serving(tmp_path, layers=connections.Layers()) as served, mesh_client(client) as session:
        with pytest.raises(aiohttp.ClientConnectorError, match="closed the connection during the Noise handshake"):
            await session.get(served.base_url + "/healthz")


async def test_a_silent_noise_client_is_closed_by_the_header_deadline(tmp_path: Path) -> None:
    deadlines = {"protocol_detect_timeout_ms": 1000, "header_read_timeout_ms": 1000}
    async with noise_gateway(tmp_path, **deadlines) as (served, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(noise.MAGIC)  # and nothing more
        try:
            assert await asyncio.wait_for(reader.read(), 20) == b""
        finally:
            writer.close()


async def test_h2c_gets_a_goaway_asking_for_http_1_1(tmp_path: Path) -> None:
    async with noise_gateway(tmp_path) as (served, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        try:
            answer = await asyncio.wait_for(reader.read(), 20)  # then closed
        finally:
            writer.close()
    settings, goaway = answer[:9], answer[9:]
    assert settings[3] == 0x04 and int.from_bytes(settings[:3], "big") == 0
    assert goaway[3] == 0x07 and struct.unpack(">II", goaway[9:17]) == (0, 0xD)  # HTTP_1_1_REQUIRED


# --- `llamesh serve` with the real llama-server --------------------------------------------------------------------


def serve_argv(tmp_path: Path, *, port: int, cookbook: str, **overrides: object) -> list[str]:
    node_config: dict[str, object] = {
        "node_id": "served",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_path": str(tmp_path / "node-metrics.json"),
        "shutdown_grace_period_seconds": 5,
        "llama_cpp": {"enabled": False, "binary_path": "/nonexistent", "cache_dir": str(tmp_path / "cache")},
        "cluster": {"enabled": True, "discovery": {"mdns": False}, "noise": {"config_dir": str(tmp_path / "mesh")}},
    }
    node_config.update(overrides)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(node_config))
    (tmp_path / "cookbook.yaml").write_text(cookbook)
    llamesh = str(Path(sys.executable).parent / "llamesh")
    return [llamesh, "serve", "--config", str(tmp_path / "config.yaml"), "--cookbook", str(tmp_path / "cookbook.yaml")]


def tiny_cookbook(chat_model: Path) -> str:
    return yaml.safe_dump(
        {
            "models": [
                {
                    "name": "tiny",
                    "profiles": [{"id": "default", "model_path": str(chat_model), "llama_server_args": "-c 512 -np 1"}],
                }
            ]
        }
    )


async def test_loose_key_permissions_stop_llamesh_serve_with_the_fix(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh"
    mesh.mkdir(mode=0o700)
    (mesh / "node.key").write_text(base64.b64encode(keys.StaticKey.generate().private_bytes).decode())
    (mesh / "node.key").chmod(0o644)
    argv = serve_argv(tmp_path, port=processes.free_port(), cookbook="models: []\n")
    child = processes.start(argv, log_path=tmp_path / "serve.log")
    try:
        assert await processes.wait_exited(child, deadline_s=60) == 1
    finally:
        await processes.stop(child)
    assert f"error: cluster.noise: {mesh / 'node.key'} has mode 644" in child.log_text()
    assert f"run: chmod 600 {mesh / 'node.key'}" in child.log_text()


@pytest.mark.real
async def test_llamesh_serve_answers_models_and_streams_a_chat_through_noise(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    port = processes.free_port()
    argv = serve_argv(
        tmp_path,
        port=port,
        cookbook=tiny_cookbook(chat_model),
        llama_cpp={"enabled": False, "binary_path": str(llama_server_binary), "cache_dir": str(tmp_path / "cache")},
    )
    base_url = f"http://127.0.0.1:{port}"
    async with processes.running(argv, log_path=tmp_path / "serve.log", base_url=base_url):
        token = (tmp_path / "mesh" / "cluster_token").read_text().strip()  # generated at start, copied here
        peer = ms.security(tmp_path, "peer", token=token)
        async with mesh_client(peer) as session:
            async with session.get(base_url + "/v1/models") as response:
                assert response.status == 200
                assert [model["id"] for model in (await response.json())["data"]] == ["tiny"]
            body = {"model": "tiny", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(base_url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200 and response.content_type == "text/event-stream"
                events = [line async for line in response.content if line.startswith(b"data: ")]
            chunks = [json.loads(line[6:]) for line in events if line.strip() != b"data: [DONE]"]
            assert events[-1].strip() == b"data: [DONE]" and len(chunks) >= 2
            assert chunks[0]["object"] == "chat.completion.chunk"
        stranger = ms.security(tmp_path, "stranger", token="not-" + token)
        async with mesh_client(stranger) as session:
            with pytest.raises(aiohttp.ClientConnectorError, match="did not prove the cluster token"):
                await session.get(base_url + "/v1/models")
        async with aiohttp.ClientSession() as session, session.get(base_url + "/v1/models") as response:
            assert response.status == 200  # plain HTTP on the same port, still served
