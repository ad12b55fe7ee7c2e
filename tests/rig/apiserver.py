"""A private, real Kubernetes API server for tests: etcd plus kube-apiserver on free 127.0.0.1 ports.

Everything a real server decides (schemas, defaults, the status subresource, resourceVersion conflicts, watches,
finalizers, RBAC) is tested against this pair rather than a fake. The binaries come from `$KUBEBUILDER_ASSETS`
(the envtest convention; `setup-envtest use 1.36` provides them) or from `../shared/k8s/assets` next to the
checkout. A throwaway CA signs the serving certificate (made with `cryptography`, no openssl CLI), an admin
token in a token file authenticates as `system:masters`, and a kubeconfig file describes both, so clients can
be strict about TLS and still connect.

`running()` is the usual entry point: start, make sure namespace `default` exists, apply the repository's
CRDs and wait until they are served, yield, and always stop. `restart_apiserver()` replaces kube-apiserver on
the same port with the same etcd, for tests of watches that must survive an API-server restart.

Deliberately not here: a controller-manager, scheduler or kubelet (Pods never run, namespaces never finish
terminating, owner references are never garbage-collected, no `default` ServiceAccount), pytest fixtures
(the test modules own those), and any retry of a failed start (a failure raises with both logs' tails).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import os
import secrets
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import processes

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CRD_DIR = REPO_ROOT / "crds"
SHARED_ASSETS_SCRIPT = REPO_ROOT.parent / "shared" / "k8s" / "assets"
BINARIES = ("etcd", "kube-apiserver")
START_DEADLINE_S = 60.0  # a loaded 2-core machine; the measured start is about 5 s
STOP_GRACE_S = 10.0


class ApiServerError(processes.RigError):
    """The etcd + kube-apiserver pair did not start, or did not do what a test needed from it."""


@dataclass
class ApiServer:
    """A running etcd + kube-apiserver pair and everything a client needs to reach it."""

    url: str  # https://127.0.0.1:PORT
    token: str  # bearer token of an admin in system:masters
    ca_path: Path  # the throwaway CA that signed the serving certificate
    kubeconfig_path: Path  # cluster (CA data, server), token user, context "default" namespace; current
    port: int
    etcd_url: str
    etcd: processes.Child
    apiserver: processes.Child
    etcd_data_dir: Path
    apiserver_data_dir: Path  # certificates, keys, token file; kept across restarts
    apiserver_argv: list[str] = field(repr=False)
    served_paths: list[str] = field(default_factory=list)  # the applied CRDs' collections; probed on restarts

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header of the admin token."""
        return {"Authorization": f"Bearer {self.token}"}

    def ssl_context(self) -> ssl.SSLContext:
        """A strict TLS context that trusts only the throwaway CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def session(self, *, timeout_s: float | None = 30.0) -> aiohttp.ClientSession:
        """An aiohttp session with the token, the CA and `url` as its base (close it: `async with`).
        `timeout_s` bounds each whole request, a watch's stream included; None for long watches."""
        return aiohttp.ClientSession(
            base_url=self.url,
            headers=self.headers,
            connector=aiohttp.TCPConnector(ssl=self.ssl_context()),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of both children's logs, for error messages."""
        return (
            f"--- etcd log {self.etcd.log_path}:\n{self.etcd.log_tail(lines)}\n"
            f"--- kube-apiserver log {self.apiserver.log_path}:\n{self.apiserver.log_tail(lines)}"
        )


def assets_dir() -> Path | None:
    """The folder holding `etcd` and `kube-apiserver`: `$KUBEBUILDER_ASSETS` if it has both, else the folder
    `../shared/k8s/assets` prints (it unpacks them once per machine); None when neither works."""
    env_dir = os.environ.get("KUBEBUILDER_ASSETS")
    if env_dir and _has_binaries(Path(env_dir)):
        return Path(env_dir)
    if not SHARED_ASSETS_SCRIPT.is_file():
        return None
    try:
        completed = subprocess.run(
            ["bash", str(SHARED_ASSETS_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    printed = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not printed:
        return None
    folder = Path(printed[-1])
    return folder if _has_binaries(folder) else None


def _has_binaries(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in BINARIES)


async def start(workdir: Path, *, assets: Path | None = None) -> ApiServer:
    """Start a fresh etcd and kube-apiserver under `workdir`, wait until /readyz answers `ok` with the admin
    token and namespace `default` exists. Raises ApiServerError (with both logs' tails) if that fails."""
    folder = assets or await asyncio.to_thread(assets_dir)
    if folder is None:
        raise ApiServerError(
            "kube-apiserver and etcd binaries not found: set KUBEBUILDER_ASSETS (setup-envtest use 1.36)"
            f" or provide {SHARED_ASSETS_SCRIPT}"
        )
    etcd_data_dir = workdir / "etcd-data"
    apiserver_data_dir = workdir / "apiserver"
    token = secrets.token_hex(24)
    ca_path = await asyncio.to_thread(_write_credentials, apiserver_data_dir, token)

    etcd_port, peer_port, port = _distinct_free_ports(3)
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd = processes.start(
        [
            str(folder / "etcd"),
            "--name",
            "rig",
            "--data-dir",
            str(etcd_data_dir),
            "--listen-client-urls",
            etcd_url,
            "--advertise-client-urls",
            etcd_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ],
        log_path=workdir / "etcd.log",
    )
    argv = _apiserver_argv(folder / "kube-apiserver", apiserver_data_dir, port=port, etcd_url=etcd_url)
    apiserver_log = workdir / "kube-apiserver.log"
    try:
        await processes.wait_healthy(etcd, etcd_url, deadline_s=START_DEADLINE_S)
        apiserver_child = processes.start(argv, log_path=apiserver_log)
    except BaseException as exc:
        await processes.stop(etcd, grace_s=STOP_GRACE_S)
        if isinstance(exc, processes.RigError):
            raise ApiServerError(f"etcd did not become healthy: {exc}") from exc
        raise
    server = ApiServer(
        url=f"https://127.0.0.1:{port}",
        token=token,
        ca_path=ca_path,
        kubeconfig_path=workdir / "kubeconfig.yaml",
        port=port,
        etcd_url=etcd_url,
        etcd=etcd,
        apiserver=apiserver_child,
        etcd_data_dir=etcd_data_dir,
        apiserver_data_dir=apiserver_data_dir,
        apiserver_argv=argv,
    )
    try:
        _write_kubeconfig(server)
        await wait_ready(server)
        await ensure_namespace(server, "default")
    except BaseException:
        await stop(server)
        raise
    return server


async def stop_apiserver(server: ApiServer, *, grace_s: float = STOP_GRACE_S) -> None:
    """Stop kube-apiserver only (SIGTERM, SIGKILL after `grace_s`); etcd and its data stay. A graceful stop
    takes about 1 s and ends open watches cleanly; `grace_s=0` kills it, cutting them mid-stream."""
    await processes.stop(server.apiserver, grace_s=grace_s)


async def restart_apiserver(server: ApiServer, *, grace_s: float = STOP_GRACE_S) -> None:
    """Stop kube-apiserver if it runs, start it again on the same port with the same etcd, and wait until
    /readyz answers `ok` and the applied CRDs' collections answer lists and watches again."""
    await stop_apiserver(server, grace_s=grace_s)
    server.apiserver = processes.start(server.apiserver_argv, log_path=server.apiserver.log_path)
    await wait_ready(server)


async def compact_etcd(server: ApiServer) -> int:
    """Compact etcd's history up to its current revision (as kube-apiserver does every few minutes) and return
    that revision. Together with `restart_apiserver` (whose new watch cache starts after it), no watch can
    resume from an older resourceVersion: it gets the in-stream ERROR 410 Expired."""
    async with aiohttp.ClientSession(base_url=server.etcd_url, timeout=aiohttp.ClientTimeout(total=30)) as session:
        # etcd's JSON gateway: keys are base64; a one-key range only to read the header's revision.
        async with session.post("/v3/kv/range", json={"key": "Lw==", "limit": 1, "keys_only": True}) as response:
            revision = int((await response.json())["header"]["revision"])
        async with session.post("/v3/kv/compaction", json={"revision": revision, "physical": True}) as response:
            if response.status != 200:
                raise ApiServerError(f"etcd compaction: {response.status} {await response.text()}")
    return revision


async def stop(server: ApiServer) -> None:
    """Stop kube-apiserver, then etcd; children that already exited are only reaped."""
    try:
        await stop_apiserver(server)
    finally:
        await processes.stop(server.etcd, grace_s=STOP_GRACE_S)


@contextlib.asynccontextmanager
async def running(workdir: Path, *, crd_dir: Path = CRD_DIR) -> AsyncIterator[ApiServer]:
    """Start a pair, apply the CRDs of `crd_dir` (the repository's `crds/`), yield it, and always stop it."""
    server = await start(workdir)
    try:
        await apply_crds(server, crd_dir)
        yield server
    finally:
        await stop(server)


async def wait_ready(server: ApiServer, *, deadline_s: float = START_DEADLINE_S) -> float:
    """Poll /readyz with the admin token until it answers 200 `ok`, then wait until `served_paths` are served
    (see `wait_served`); return the seconds it took."""
    started = time.monotonic()
    last_answer = "no answer yet"
    async with server.session(timeout_s=5.0) as session:
        while True:
            if server.apiserver.process.poll() is not None:
                raise ApiServerError(
                    f"kube-apiserver exited with {server.apiserver.process.returncode} before /readyz answered"
                    f" ok\n{server.log_tails()}"
                )
            try:
                async with session.get("/readyz") as response:
                    text = await response.text()
                    if response.status == 200 and text.strip() == "ok":
                        break
                    last_answer = f"{response.status} {text[-500:]}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                last_answer = repr(exc)
            if time.monotonic() - started > deadline_s:
                raise ApiServerError(
                    f"{server.url}/readyz did not answer ok within {deadline_s:.0f} s (last: {last_answer})\n"
                    f"{server.log_tails()}"
                )
            await asyncio.sleep(0.1)
        for path in server.served_paths:
            await wait_served(server, session, path, deadline_s=max(1.0, deadline_s - (time.monotonic() - started)))
    return time.monotonic() - started


async def wait_served(
    server: ApiServer, session: aiohttp.ClientSession, path: str, *, deadline_s: float = START_DEADLINE_S
) -> None:
    """Wait until a list of the collection `path` and a watch of it both answer 200. readyz says `ok` before
    that: a watch answers 429 "storage is (re)initializing" for a moment after a (re)start."""

    async def served() -> bool:
        try:
            async with session.get(path) as response:
                await response.read()
                if response.status != 200:
                    return False
            async with session.get(path, params={"watch": "true", "timeoutSeconds": "1"}) as response:
                return response.status == 200  # leaving it unread closes the stream
        except (TimeoutError, aiohttp.ClientError):
            return False

    await _wait_for(served, deadline_s, f"{path} to answer lists and watches", server)


async def ensure_namespace(server: ApiServer, name: str) -> None:
    """Create namespace `name` unless it exists (nothing else here would create it)."""
    async with server.session() as session:
        async with session.get(f"/api/v1/namespaces/{name}") as response:
            if response.status == 200:
                return
            if response.status != 404:
                raise ApiServerError(
                    f"GET namespace {name}: {response.status} {await response.text()}\n{server.log_tails()}"
                )
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        async with session.post("/api/v1/namespaces", json=body) as response:
            if response.status not in (201, 409):
                raise ApiServerError(
                    f"creating namespace {name}: {response.status} {await response.text()}\n{server.log_tails()}"
                )


async def apply_crds(
    server: ApiServer, crd_dir: Path, *, namespace: str = "default", deadline_s: float = START_DEADLINE_S
) -> list[str]:
    """Create every CustomResourceDefinition in `crd_dir`'s YAML files (existing ones are kept), then wait
    until each is Established and its collections answer lists and watches (in `namespace` if namespaced).
    Returns the CRDs' names; the collections are added to `server.served_paths`."""
    crds = await asyncio.to_thread(load_crds, crd_dir)
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    async with server.session() as session:
        for crd in crds:
            async with session.post(base, json=crd) as response:
                if response.status not in (201, 409):
                    raise ApiServerError(
                        f"creating CRD {crd['metadata']['name']}: {response.status} {await response.text()}\n"
                        f"{server.log_tails()}"
                    )
        for crd in crds:
            name = crd["metadata"]["name"]

            async def established(name: str = name) -> bool:
                got = await _get_json(session, f"{base}/{name}")
                conditions = ((got or {}).get("status") or {}).get("conditions") or []
                return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

            await _wait_for(established, deadline_s, f"CRD {name} to be Established", server)
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                prefix = f"/apis/{spec['group']}/{version['name']}"
                scope = f"/namespaces/{namespace}" if spec.get("scope", "Namespaced") == "Namespaced" else ""
                path = f"{prefix}{scope}/{spec['names']['plural']}"
                await wait_served(server, session, path, deadline_s=deadline_s)
                if path not in server.served_paths:
                    server.served_paths.append(path)
    return [crd["metadata"]["name"] for crd in crds]


def load_crds(crd_dir: Path = CRD_DIR) -> list[dict[str, Any]]:
    """The CustomResourceDefinition documents of every YAML file in `crd_dir`, in file-name order."""
    return [
        document
        for path in sorted(crd_dir.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition"
    ]


async def _get_json(session: aiohttp.ClientSession, path: str) -> dict[str, Any] | None:
    """The JSON body of GET `path` if it answers 200, else None."""
    try:
        async with session.get(path) as response:
            if response.status != 200:
                await response.read()
                return None
            body: dict[str, Any] = await response.json()
            return body
    except (TimeoutError, aiohttp.ClientError):
        return None


async def _wait_for(condition: Callable[[], Awaitable[bool]], deadline_s: float, what: str, server: ApiServer) -> None:
    deadline = time.monotonic() + deadline_s
    while not await condition():
        if time.monotonic() > deadline:
            raise ApiServerError(f"timed out after {deadline_s:.0f} s waiting for {what}\n{server.log_tails()}")
        await asyncio.sleep(0.1)


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = processes.free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _apiserver_argv(binary: Path, data_dir: Path, *, port: int, etcd_url: str) -> list[str]:
    return [
        str(binary),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--tls-cert-file={data_dir / 'serving.crt'}",
        f"--tls-private-key-file={data_dir / 'serving.key'}",
        f"--cert-dir={data_dir / 'certs'}",
        f"--token-auth-file={data_dir / 'tokens.csv'}",
        "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={data_dir / 'sa.pub'}",
        f"--service-account-signing-key-file={data_dir / 'sa.key'}",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--disable-admission-plugins=ServiceAccount",
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        # Without it, SIGTERM waits for open watches until the grace runs out and SIGKILL cuts them (10 s).
        "--shutdown-watch-termination-grace-period=2s",
    ]


def _write_credentials(data_dir: Path, token: str) -> Path:
    """Write the CA, the serving certificate and key, the service-account key pair and the token file into
    `data_dir` (made if missing); return the CA certificate's path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llamesh-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(serving_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sa_key = ec.generate_private_key(ec.SECP256R1())

    ca_path = data_dir / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (data_dir / "serving.crt").write_bytes(serving_cert.public_bytes(serialization.Encoding.PEM))
    _write_private_key(data_dir / "serving.key", serving_key)
    _write_private_key(data_dir / "sa.key", sa_key)
    (data_dir / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    tokens = data_dir / "tokens.csv"
    tokens.write_text(f'{token},admin,admin-uid,"system:masters"\n')
    tokens.chmod(0o600)
    return ca_path


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _write_kubeconfig(server: ApiServer) -> None:
    ca_data = base64.b64encode(server.ca_path.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "rig", "cluster": {"server": server.url, "certificate-authority-data": ca_data}}],
        "users": [{"name": "admin", "user": {"token": server.token}}],
        "contexts": [{"name": "rig", "context": {"cluster": "rig", "user": "admin", "namespace": "default"}}],
        "current-context": "rig",
        "preferences": {},
    }
    server.kubeconfig_path.write_text(yaml.safe_dump(config, sort_keys=False))
    server.kubeconfig_path.chmod(0o600)
