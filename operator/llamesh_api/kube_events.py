"""Kubernetes Events about llamesh's resources, so `kubectl describe li/NAME` and `kubectl get events` say
what the operator did (bound, draining, unschedulable, deleted) and why.

An Event is best effort: failing to post one is logged and never fails the action it describes (the API
server may refuse Events under load; the action already happened). Core `v1` Events, which every kubectl
shows; a repeated reason for the same object is posted again, not aggregated.
"""

from __future__ import annotations

import logging
import secrets

from llamesh_api import kube_client, resources, store

log = logging.getLogger(__name__)


class Recorder:
    def __init__(self, client: kube_client.Client, *, component: str, instance: str) -> None:
        self._client = client
        self._component = component
        self._instance = instance

    async def __call__(self, obj: resources.Resource, *, reason: str, message: str, warning: bool = False) -> None:
        namespace = obj.metadata.namespace or "default"
        now = store.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{obj.name}.{secrets.token_hex(8)}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": resources.API_VERSION,
                "kind": obj.kind_name,
                "name": obj.name,
                "namespace": obj.metadata.namespace,
                "uid": obj.metadata.uid,
                "resourceVersion": obj.metadata.resource_version,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": self._component, "host": self._instance},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._client.request("POST", f"/api/v1/namespaces/{namespace}/events", body=body)
        except store.StoreError as exc:
            log.warning("could not post Event %s for %s %s: %s", reason, obj.kind_name, obj.name, exc)
