"""What the gateway knows of the store: models and their profiles, instances, nodes — in memory.

The store is watched (see `following`) and every event lands here, so the request path never reads the
store: resolving `model[:profile]`, finding an instance's URL and answering /v1/models are dictionary
lookups. A profile is served only while its model and the profile are both enabled. Model and profile
names match case-insensitively, as in the seed.

Nothing here decides admission (that is `queueing`) or talks to the store (that is `following`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any

from llamesh_api import config, cookbook, launch_args, resources
from llamesh_proxy import queueing

API_KEY_FLAGS = ("--api-key",)
_STARTING_PHASES = frozenset(
    {resources.Phase.PENDING, resources.Phase.SCHEDULED, resources.Phase.DOWNLOADING, resources.Phase.STARTING}
)


class Capability(enum.Enum):
    """Which OpenAI endpoints a profile serves: text generation, or only embeddings, or only reranking."""

    TEXT = "text"
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"


def capability(profile: cookbook.Profile) -> Capability:
    if profile.is_embedding:
        return Capability.EMBEDDINGS
    if profile.is_rerank:
        return Capability.RERANK
    return Capability.TEXT


def pool_key(model: str, profile: str) -> str:
    """The queueing pool of `model:profile` (lower case, like the operator's keys)."""
    return f"{model}:{profile}".lower()


@dataclasses.dataclass(frozen=True)
class Target:
    """A servable `model:profile`, with everything the request path needs precomputed."""

    model: str
    model_description: str | None
    model_uid: str | None
    profile: cookbook.Profile
    pool: str
    display: str
    capability: Capability
    args_hash: str
    policy: queueing.Policy
    max_wait_ms: int
    startup_timeout_s: float  # how long an instance may take to start (download included)
    max_request_duration_ms: int
    upstream_api_key: str | None

    @property
    def profile_id(self) -> str:
        return self.profile.id


@dataclasses.dataclass(frozen=True)
class PoolView:
    routable: list[str]
    starting: list[str]
    known: list[str]
    unreachable: int = 0


@dataclasses.dataclass(frozen=True)
class InstanceChange:
    pool: str
    failed_unready: bool  # it just became FAILED without ever having been READY


def is_routable(instance: resources.LlamaInstance) -> bool:
    status = instance.status
    return (
        status.phase is resources.Phase.READY
        and not instance.spec.drain
        and status.host is not None
        and status.port is not None
    )


def is_starting(instance: resources.LlamaInstance) -> bool:
    return instance.phase in _STARTING_PHASES and not instance.spec.drain


def base_url(instance: resources.LlamaInstance) -> str:
    host = instance.status.host or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{instance.status.port}"


class Catalog:
    """In-memory copies of LlamaModel, LlamaInstance and LlamaNode, with the lookups the gateway needs."""

    def __init__(self, *, defaults: config.ModelDefaults) -> None:
        self._defaults = defaults
        self._models: dict[str, resources.LlamaModel] = {}
        self._targets: dict[str, Target] = {}
        self._instances: dict[str, resources.LlamaInstance] = {}
        self._urls: dict[str, str] = {}
        self._unreachable: dict[str, tuple[object, ...]] = {}  # instance → the process that failed to answer
        self._pools: dict[str, dict[str, None]] = {}  # pool → instance names, in arrival order
        self._nodes: dict[str, resources.LlamaNode] = {}

    # --- models -------------------------------------------------------------------------------

    def apply_model(self, event_type: str, model: resources.LlamaModel) -> set[str]:
        """Record a model event; return the pools that stopped being servable."""
        if event_type == "DELETED":
            self._models.pop(model.name, None)
        else:
            self._models[model.name] = model
        return self._rebuild_targets()

    def replace_models(self, models: Iterable[resources.LlamaModel]) -> set[str]:
        self._models = {model.name: model for model in models}
        return self._rebuild_targets()

    def resolve(self, requested: str) -> Target | None:
        """`model[:profile]` (profile `default` when omitted), case-insensitively."""
        model, profile = cookbook.split_key(requested)
        return self._targets.get(pool_key(model, profile))

    def target(self, pool: str) -> Target | None:
        return self._targets.get(pool)

    def targets(self) -> list[Target]:
        return list(self._targets.values())

    @property
    def model_count(self) -> int:
        return len(self._models)

    def _rebuild_targets(self) -> set[str]:
        before = set(self._targets)
        targets: dict[str, Target] = {}
        for model in self._models.values():
            if not model.spec.enabled:
                continue
            for profile in model.spec.profiles:
                if profile.enabled:
                    target = self._target(model, profile)
                    targets[target.pool] = target
        self._targets = targets
        return before - set(targets)

    def _target(self, model: resources.LlamaModel, profile: cookbook.Profile) -> Target:
        defaults = self._defaults
        return Target(
            model=model.name,
            model_description=model.spec.description,
            model_uid=model.metadata.uid,
            profile=profile,
            pool=pool_key(model.name, profile.id),
            display=cookbook.display_name(model.name, profile.id),
            capability=capability(profile),
            args_hash=profile.args_hash(),
            policy=queueing.Policy(
                max_concurrent=defaults.max_concurrent_requests_per_instance,
                max_queue=profile.max_queue_size_or(defaults),
                max_instances=profile.max_instances_or(defaults),
                affinity=defaults.routing is config.Routing.AFFINITY,
            ),
            max_wait_ms=profile.max_wait_in_queue_ms_or(defaults),
            startup_timeout_s=float(profile.startup_timeout()),
            max_request_duration_ms=profile.max_request_duration_ms_or(defaults),
            upstream_api_key=launch_args.flag_value(profile.llama_server_args, API_KEY_FLAGS),
        )

    # --- instances ----------------------------------------------------------------------------

    def apply_instance(self, event_type: str, instance: resources.LlamaInstance) -> InstanceChange:
        """Record an instance event; say which pool it touched and whether it was a failed start."""
        name = instance.name
        previous = self._instances.get(name)
        pool = pool_key(instance.spec.model, instance.spec.profile)
        if event_type == "DELETED":
            self._forget_instance(name)
            return InstanceChange(pool, failed_unready=False)
        if previous is not None and pool_key(previous.spec.model, previous.spec.profile) != pool:
            self._forget_instance(name)
        self._instances[name] = instance
        self._pools.setdefault(pool, {})[name] = None
        if is_routable(instance):
            self._urls[name] = base_url(instance)
        else:
            self._urls.pop(name, None)
        failed_now = instance.phase is resources.Phase.FAILED and (
            previous is None or previous.phase is not resources.Phase.FAILED
        )
        return InstanceChange(pool, failed_unready=failed_now and instance.status.ready_at is None)

    def replace_instances(self, instances: Iterable[resources.LlamaInstance]) -> set[str]:
        """A fresh listing: drop what is gone, record the rest; return every pool touched."""
        fresh = {instance.name: instance for instance in instances}
        touched: set[str] = set()
        for name in list(self._instances):
            if name not in fresh:
                touched.add(self.apply_instance("DELETED", self._instances[name]).pool)
        for instance in fresh.values():
            touched.add(self.apply_instance("MODIFIED", instance).pool)
        return touched

    def pool_view(self, pool: str) -> PoolView:
        names = self._pools.get(pool, {})
        instances = [self._instances[name] for name in names]
        return PoolView(
            routable=[i.name for i in instances if is_routable(i) and not self._is_unreachable(i)],
            starting=[i.name for i in instances if is_starting(i)],
            # routed around, it still counts toward max_instances until its agent reports it: a replacement
            # beyond the limit would only be deleted by the operator (and asked for again, and again)
            unreachable=sum(1 for i in instances if is_routable(i) and self._is_unreachable(i)),
            known=list(names),
        )

    def mark_unreachable(self, name: str) -> str | None:
        """This gateway could not connect to `name`: stop routing to it until its status changes.

        Closes the window between an instance dying and its agent reporting it (milliseconds, more under
        load; as long as the agent itself is gone). What its agent says about the process — phase,
        address, pid — lifts the mark when it changes; other writes do not (the gateways' own usage
        reports, this one's included, change the object every second). Returns its pool.
        """
        instance = self._instances.get(name)
        if instance is None:
            return None
        self._unreachable[name] = _process_identity(instance)
        return pool_key(instance.spec.model, instance.spec.profile)

    def _is_unreachable(self, instance: resources.LlamaInstance) -> bool:
        marked = self._unreachable.get(instance.name)
        return marked is not None and marked == _process_identity(instance)

    def pools(self) -> list[str]:
        return list(self._pools)

    def url(self, name: str) -> str | None:
        return self._urls.get(name)

    def instance(self, name: str) -> resources.LlamaInstance | None:
        return self._instances.get(name)

    def restored_from(self, name: str) -> str | None:
        """The instance whose saved KV caches `name` restored at start, if it restored any."""
        instance = self._instances.get(name)
        if instance is None or not instance.status.kv_cache_restored:
            return None
        return instance.status.kv_cache_restored_from

    def instances(self) -> list[resources.LlamaInstance]:
        return list(self._instances.values())

    def _forget_instance(self, name: str) -> None:
        previous = self._instances.pop(name, None)
        self._urls.pop(name, None)
        self._unreachable.pop(name, None)
        if previous is not None:
            pool = pool_key(previous.spec.model, previous.spec.profile)
            members = self._pools.get(pool)
            if members is not None:
                members.pop(name, None)
                if not members:
                    del self._pools[pool]

    # --- nodes --------------------------------------------------------------------------------

    def apply_node(self, event_type: str, node: resources.LlamaNode) -> None:
        if event_type == "DELETED":
            self._nodes.pop(node.name, None)
        else:
            self._nodes[node.name] = node

    def replace_nodes(self, nodes: Iterable[resources.LlamaNode]) -> None:
        self._nodes = {node.name: node for node in nodes}

    def node(self, name: str) -> resources.LlamaNode | None:
        return self._nodes.get(name)

    def nodes(self) -> list[resources.LlamaNode]:
        return list(self._nodes.values())

    def binary_present(self) -> bool:
        return any(node.status.binary_path for node in self._nodes.values())

    def llama_cpp_version(self, node_name: str) -> str | None:
        node = self._nodes.get(node_name)
        if node is not None and node.status.llama_cpp_version:
            return node.status.llama_cpp_version
        return next((n.status.llama_cpp_version for n in self._nodes.values() if n.status.llama_cpp_version), None)

    def parsed_model_params(self, target: Target, *, node_name: str) -> dict[str, Any] | None:
        """A READY instance's parsed params, else what a node learned for the args hash (same llama.cpp only)."""
        for name in self._pools.get(target.pool, {}):
            instance = self._instances[name]
            if is_routable(instance) and instance.status.parsed_model_params:
                return instance.status.parsed_model_params
        nodes = sorted(self._nodes.values(), key=lambda node: node.name != node_name)  # our own node first
        for node in nodes:
            learned = node.status.learned.get(target.args_hash)
            if learned is None or not learned.parsed_model_params:
                continue
            current = node.status.llama_cpp_version
            if learned.llama_cpp_version and current and learned.llama_cpp_version != current:
                continue  # learned under another llama.cpp build: withheld until an instance refreshes it
            return learned.parsed_model_params
        return None


def _process_identity(instance: resources.LlamaInstance) -> tuple[object, ...]:
    status = instance.status
    return (status.phase, status.host, status.port, status.pid, status.started_at)
