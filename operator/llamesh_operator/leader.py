"""Leader election on a `coordination.k8s.io/v1` Lease: of several operator replicas, exactly one acts.

Invariant: **a replica acts only while it holds the Lease, and holds it only while it renewed it within
`lease_s`**. The way client-go's leaderelection does it:

- `acquire()` returns once this replica holds the Lease: it creates the Lease, or takes one whose holder
  let it expire (no renewal for `lease_s`) or released it; every write names the resourceVersion it read,
  so of two replicas racing for an expired Lease one gets 409 and keeps waiting.
- `keep()` renews every `renew_s` and raises `LostLeadership` if the Lease was taken, or if it could not
  renew for `lease_s` (another replica may hold it by then). The caller then stops acting — the operator
  process exits, and its Deployment starts it again as a follower.
- `release()` on a clean shutdown clears the holder, so a follower takes over at once instead of after
  `lease_s`.

kopf's own peering (KopfPeering resources) would pause only kopf's handlers; the reconcile loop and the
handlers both run under this one Lease instead.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

from llamesh_api import kube_client, store

log = logging.getLogger(__name__)


class LostLeadership(Exception):
    """This replica no longer holds the Lease; it must stop acting."""


class LeaderElection:
    def __init__(
        self,
        client: kube_client.Client,
        *,
        namespace: str,
        identity: str,
        name: str = "llamesh-operator",
        lease_s: float = 15.0,
        renew_s: float = 5.0,
    ) -> None:
        self.identity = identity
        self._client = client
        self._path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self._name = name
        self._lease_s = lease_s
        self._renew_s = renew_s

    async def acquire(self) -> None:
        announced = False
        while True:
            holder = await self._try_acquire()
            if holder == self.identity:
                log.info("leader election: %s holds lease %s", self.identity, self._name, extra={"event": "leader"})
                return
            if not announced:
                log.info("leader election: %s waits; lease %s is held by %s", self.identity, self._name, holder)
                announced = True
            await asyncio.sleep(self._renew_s)

    async def keep(self) -> None:
        """Renew until cancelled; raise LostLeadership when the Lease is no longer ours."""
        last_renewed = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self._renew_s)
            try:
                lease = await self._client.request("GET", self._path)
                if lease.get("spec", {}).get("holderIdentity") != self.identity:
                    raise LostLeadership(f"lease {self._name} is now held by {lease['spec'].get('holderIdentity')}")
                await self._write(lease, renew_only=True)
                last_renewed = asyncio.get_running_loop().time()
            except LostLeadership:
                raise
            except store.StoreError as exc:
                if asyncio.get_running_loop().time() - last_renewed >= self._lease_s:
                    raise LostLeadership(f"could not renew lease {self._name} for {self._lease_s:g} s: {exc}") from exc
                log.warning("leader election: renewing lease %s failed (%s); retrying", self._name, exc)

    async def release(self) -> None:
        try:
            lease = await self._client.request("GET", self._path)
            if lease.get("spec", {}).get("holderIdentity") == self.identity:
                body = {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                        "spec": {"holderIdentity": None, "renewTime": None}}  # fmt: skip
                await self._client.request("PATCH", self._path, body=body, content_type="application/merge-patch+json")
                log.info("leader election: %s released lease %s", self.identity, self._name)
        except store.StoreError as exc:
            log.warning("leader election: could not release lease %s: %s", self._name, exc)

    async def _try_acquire(self) -> str | None:
        """Try once; the holder afterwards (this identity if it worked)."""
        try:
            lease = await self._client.request("GET", self._path)
        except store.NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self._name},
                "spec": self._spec(acquire=True),
            }
            try:
                await self._client.request("POST", self._collection, body=body)
                return self.identity
            except store.AlreadyExists:
                return None
        spec = lease.get("spec", {})
        holder = spec.get("holderIdentity")
        if holder and holder != self.identity and not self._expired(spec):
            return str(holder)
        try:
            await self._write(lease, renew_only=holder == self.identity)
        except store.Conflict:
            return None  # another replica was quicker
        return self.identity

    def _expired(self, spec: dict[str, Any]) -> bool:
        renewed = spec.get("renewTime") or spec.get("acquireTime")
        if not renewed:
            return True
        moment = datetime.datetime.fromisoformat(renewed.replace("Z", "+00:00"))
        duration = float(spec.get("leaseDurationSeconds") or self._lease_s)
        return (store.utcnow() - moment).total_seconds() > duration

    async def _write(self, lease: dict[str, Any], *, renew_only: bool) -> None:
        spec: dict[str, Any] = {"renewTime": _micro_time()} if renew_only else self._spec(acquire=True)
        if not renew_only:
            spec["leaseTransitions"] = int(lease.get("spec", {}).get("leaseTransitions") or 0) + 1
        body = {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]}, "spec": spec}
        await self._client.request("PATCH", self._path, body=body, content_type="application/merge-patch+json")

    def _spec(self, *, acquire: bool) -> dict[str, Any]:
        now = _micro_time()
        spec: dict[str, Any] = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self._lease_s),
                                "renewTime": now}  # fmt: skip
        if acquire:
            spec["acquireTime"] = now
        return spec


def _micro_time() -> str:
    return store.utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
