"""A small asynchronous client for the Kubernetes API: where the server is, who we are, and HTTP calls whose
failures come back as `store` errors.

Configuration comes from the `kubernetes` package (in-cluster service account, or `KUBECONFIG` /
`~/.kube/config` and its current context), so every way that package authenticates — tokens, client
certificates, exec plugins, token files that rotate — works here too. The calls go through aiohttp, not
the `kubernetes` client: that client blocks, and the gateway's event loop serves requests; a thread per
watch would not scale to every role's watches either. `kubernetes_asyncio` would do, but it is a second,
generated client of ~900 modules for the seven calls the store makes.

Every request is retried on 429, 5xx and connection failures by `retrying.transient`. Errors map onto
`store`'s hierarchy by status code (kopf's `_cogs/clients/errors.py` does the same), so aiohttp's
exceptions never cross this module's boundary.

Deliberately not here: what the paths and objects mean (`kube_store`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from llamesh_api import retrying, store

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeConfigError(Exception):
    """No usable Kubernetes configuration: the message says where it looked and what to set."""


@dataclasses.dataclass
class Connection:
    """Where the API server is and how to authenticate to it."""

    server: str
    namespace: str
    ssl_context: ssl.SSLContext | bool
    token: str | None = None
    refresh: Any = None  # the kubernetes Configuration, when its token can rotate
    ca_path: str | None = None  # for clients that take files (kopf's login)
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False

    def headers(self) -> dict[str, str]:
        if self.refresh is not None and self.refresh.refresh_api_key_hook is not None:
            self.refresh.refresh_api_key_hook(self.refresh)  # rotates an expiring token (exec plugins, files)
            self.token = _bearer(self.refresh)
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def load(*, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None) -> Connection:
    """In-cluster configuration when running in a pod, else the kubeconfig (`KUBECONFIG` or ~/.kube/config)."""
    from kubernetes import client, config  # imported here: only the Kubernetes roles need it

    configuration = client.Configuration()
    in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context, client_configuration=configuration, persist_config=False
            )
    except (config.ConfigException, OSError, TypeError, ValueError) as exc:
        raise KubeConfigError(
            f"no Kubernetes configuration ({exc}); run in a pod with a service account, or set KUBECONFIG "
            "or --kubeconfig to a kubeconfig file"
        ) from exc
    if namespace is None:
        namespace = _namespace(in_cluster=in_cluster, kubeconfig=kubeconfig, context=context)
    return Connection(
        server=configuration.host.rstrip("/"),
        namespace=namespace,
        ssl_context=_ssl_context(configuration),
        token=_bearer(configuration),
        refresh=configuration if configuration.refresh_api_key_hook is not None else None,
        ca_path=configuration.ssl_ca_cert or None,
        cert_path=configuration.cert_file or None,
        key_path=configuration.key_file or None,
        insecure=not configuration.verify_ssl,
    )


def _bearer(configuration: Any) -> str | None:
    value = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
    if not value:
        return None
    token = str(value)
    return token.removeprefix("Bearer ").strip()


def _namespace(*, in_cluster: bool, kubeconfig: str | None, context: str | None) -> str:
    if in_cluster:
        try:
            return IN_CLUSTER_NAMESPACE.read_text().strip() or "default"
        except OSError:
            return "default"
    from kubernetes import config

    contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    chosen = next((item for item in contexts if item["name"] == context), current) if context else current
    found = (chosen or {}).get("context", {}).get("namespace")
    return str(found) if found else "default"


def _ssl_context(configuration: Any) -> ssl.SSLContext | bool:
    if not configuration.host.startswith("https"):
        return False
    if not configuration.verify_ssl:
        return False  # the kubeconfig says insecure-skip-tls-verify
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if configuration.cert_file and configuration.key_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    if configuration.tls_server_name:
        context.check_hostname = True
    return context


class Client:
    """JSON over HTTP to one API server, with `store` errors and the retry policy."""

    def __init__(self, connection: Connection, *, policy: retrying.Policy = retrying.DEFAULT) -> None:
        self.connection = connection
        self._policy = policy
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.connection.ssl_context, limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=None)
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """One call, retried on transient failures; the decoded JSON answer."""

        async def once() -> dict[str, Any]:
            headers = {**self.connection.headers(), "Accept": "application/json"}
            data = None
            if body is not None:
                headers["Content-Type"] = content_type
                data = json.dumps(body)
            try:
                async with self._http().request(
                    method,
                    self.connection.server + path,
                    params=params,
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                ) as response:
                    text = await response.text()
                    if response.status >= 400:
                        raise error_for(response.status, text, response.headers.get("Retry-After"))
                    answer: dict[str, Any] = json.loads(text) if text else {}
                    return answer
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise store.Unavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

        return await retrying.transient(once, what=f"{method} {path}", policy=self._policy)

    async def stream(self, path: str, *, params: dict[str, str], timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """The JSON lines of a watch. The opening is retried; a stream that breaks raises Unavailable."""

        async def opening() -> aiohttp.ClientResponse:
            try:
                response = await self._http().get(
                    self.connection.server + path,
                    params=params,
                    headers={**self.connection.headers(), "Accept": "application/json"},
                    # the server ends the watch after timeoutSeconds; a silent connection longer than that is dead
                    timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout_s + 30),
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise store.Unavailable(f"watch {path}: {type(exc).__name__}: {exc}") from exc
            if response.status >= 400:
                text = await response.text()
                response.release()
                raise error_for(response.status, text, response.headers.get("Retry-After"))
            return response

        response = await retrying.transient(opening, what=f"watch {path}", policy=self._policy)
        try:
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise store.Unavailable(f"watch {path} broke: {type(exc).__name__}: {exc}") from exc
        finally:
            response.close()


def error_for(status: int, text: str, retry_after: str | None = None) -> store.StoreError:
    """The store error for an API answer with this status and body (a Kubernetes `Status`, usually)."""
    try:
        body = json.loads(text)
    except ValueError:
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    message = message or text.strip()[:300] or f"HTTP {status}"
    reason = body.get("reason", "") if isinstance(body, dict) else ""
    if status == 404:
        return store.NotFound(message)
    if status == 409:
        return store.AlreadyExists(message) if reason == "AlreadyExists" else store.Conflict(message)
    if status == 410:
        return store.Gone(message)
    if status == 422 or status == 400:
        return store.Invalid(message)
    if status in (401, 403):
        return store.Forbidden(message)
    if status == 429:
        return store.TooManyRequests(message, retry_after_s=_seconds(retry_after))
    if status >= 500:
        return store.ServerError(message, retry_after_s=_seconds(retry_after))
    return store.StoreError(f"HTTP {status}: {message}")


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
