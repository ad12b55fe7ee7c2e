"""The three custom resources: LlamaModel (desired), LlamaInstance (one process), LlamaNode (one host).

These mirror Kubernetes' Deployment / Pod / Node split (DESIGN.md). The same pydantic models are held
in the in-memory store on bare metal and rendered into CRDs for the API server. Python attributes are
snake_case; the wire form (Kubernetes objects, CRD schemas) is camelCase through aliases.

Nothing here decides anything: planners read these, drivers write them.
"""

from __future__ import annotations

import datetime
import enum
import re
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from llamesh_api import cookbook

GROUP = "llamesh.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, validate_by_name=True, validate_by_alias=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class OwnerReference(_Wire):
    api_version: str
    kind: str
    name: str
    uid: str
    controller: bool = True
    block_owner_deletion: bool = True


class ObjectMeta(_Wire):
    model_config = ConfigDict(extra="ignore")  # the API server adds fields we do not use

    name: str
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: datetime.datetime | None = None
    deletion_timestamp: datetime.datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    owner_references: list[OwnerReference] = Field(default_factory=list)
    finalizers: list[str] = Field(default_factory=list)


class Condition(_Wire):
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str = ""
    message: str = ""
    last_transition_time: datetime.datetime | None = None


class Resource(_Wire):
    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_name: ClassVar[str]
    namespaced: ClassVar[bool] = True

    api_version: str = API_VERSION
    kind: str = ""
    metadata: ObjectMeta

    def model_post_init(self, context: Any, /) -> None:
        if not self.kind:
            self.kind = self.kind_name

    @property
    def name(self) -> str:
        return self.metadata.name


# --- LlamaModel -----------------------------------------------------------------------------------


class ProfileStatus(_Wire):
    args_hash: str
    ready_instances: int = 0
    instances: int = 0
    parsed_model_params: dict[str, Any] | None = None


class ModelStatus(_Wire):
    observed_generation: int | None = None
    ready_instances: int = 0
    instances: int = 0
    profiles: dict[str, ProfileStatus] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)


class LlamaModel(Resource):
    kind_name = "LlamaModel"
    plural = "llamamodels"
    short_name = "lm"

    spec: cookbook.ModelSpec
    status: ModelStatus = Field(default_factory=ModelStatus)

    @classmethod
    def from_cookbook(cls, model: cookbook.Model, *, namespace: str | None = None) -> Self:
        return cls(metadata=ObjectMeta(name=model.name, namespace=namespace), spec=model.spec())


# --- LlamaInstance --------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    """An instance's lifecycle, as the agent reports it."""

    PENDING = "Pending"  # asked for, not yet placed on a node
    SCHEDULED = "Scheduled"  # bound to a node, its agent has not started it
    DOWNLOADING = "Downloading"  # fetching the model file
    STARTING = "Starting"  # process running, /health not yet 200
    READY = "Ready"  # serving
    DRAINING = "Draining"  # finishing in-flight requests, taking no new ones
    STOPPED = "Stopped"  # exited on purpose
    FAILED = "Failed"  # could not start, or crashed

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.STOPPED, Phase.FAILED)


class Reason(enum.StrEnum):
    DEMAND = "demand"
    PREWARM = "prewarm"
    MIN_INSTANCES = "min_instances"


class InstanceSpec(_Wire):
    model: str
    profile: str
    args_hash: str
    reason: Reason = Reason.DEMAND
    node_name: str | None = Field(None, description="The node that runs it; set by the operator.")
    drain: bool = Field(False, description="Stop taking requests and stop once idle.")
    drain_reason: str | None = None


class GatewayUsage(_Wire):
    """What one gateway replica reports about its traffic to an instance (only that replica writes it)."""

    in_flight: int = 0
    last_request_at: datetime.datetime | None = None
    claimed: int = Field(0, description="Slots of this instance the replica may use; all claims ≤ the limit.")
    claimed_at: datetime.datetime | None = Field(
        None, description="When the claim was last renewed; an older claim than the claim TTL counts for nothing."
    )
    waiting: int = Field(0, description="Requests the replica holds queued that this instance could serve.")


class InstanceStatus(_Wire):
    phase: Phase = Phase.PENDING
    message: str = ""
    host: str | None = None
    port: int | None = None
    pid: int | None = None
    started_at: datetime.datetime | None = None
    ready_at: datetime.datetime | None = None
    stopped_at: datetime.datetime | None = None
    n_slots: int | None = None
    parsed_model_params: dict[str, Any] | None = None
    llama_cpp_version: str | None = None
    spawn_attempts: int = 0
    peak_sysmem_mb: int | None = None
    peak_vram_mb: int | None = None
    usage: dict[str, GatewayUsage] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return sum(report.in_flight for report in self.usage.values())

    @property
    def last_request_at(self) -> datetime.datetime | None:
        times = [report.last_request_at for report in self.usage.values() if report.last_request_at]
        return max(times, default=None)


class LlamaInstance(Resource):
    kind_name = "LlamaInstance"
    plural = "llamainstances"
    short_name = "li"

    spec: InstanceSpec
    status: InstanceStatus = Field(default_factory=InstanceStatus)

    @property
    def key(self) -> str:
        return f"{self.spec.model}:{self.spec.profile}"

    @property
    def phase(self) -> Phase:
        """The phase to decide on: a Pending instance that the operator bound to a node is Scheduled.

        Binding is a spec write alone (the operator owns `spec.nodeName`, the agent owns `status`), so
        `status.phase` stays Pending until the node's agent picks the instance up.
        """
        if self.status.phase is Phase.PENDING and self.spec.node_name:
            return Phase.SCHEDULED
        return self.status.phase


# --- LlamaNode ------------------------------------------------------------------------------------


class NodeSpec(_Wire):
    max_vram_mb: int = 0
    max_sysmem_mb: int = 0
    max_instances: int = 100
    address: str = Field("127.0.0.1", description="Where the gateway reaches this node's instances.")
    rebuild_requests: int = Field(0, description="Bumped to ask the agent for a llama.cpp rebuild.")


class Learned(_Wire):
    """What a node learned about one args hash; kept across evictions and restarts."""

    parsed_model_params: dict[str, Any] | None = None
    llama_cpp_version: str | None = None
    peak_sysmem_mb: int | None = None
    peak_vram_mb: int | None = None


class NodeStatus(_Wire):
    ready: bool = False
    draining: bool = False
    binary_path: str | None = None
    llama_cpp_version: str | None = None
    is_building: bool = False
    last_build_error: str | None = None
    last_build_at: datetime.datetime | None = None
    gpu_telemetry_available: bool = False
    device_vram_total_mb: int = 0
    device_vram_used_mb: int = 0
    llamesh_vram_mb: int = 0
    llamesh_sysmem_mb: int = 0
    active_instances: int = 0
    rebuilds_handled: int = 0
    learned: dict[str, Learned] = Field(default_factory=dict, description="Keyed by args hash.")
    heartbeat_at: datetime.datetime | None = None
    conditions: list[Condition] = Field(default_factory=list)


class LlamaNode(Resource):
    kind_name = "LlamaNode"
    plural = "llamanodes"
    short_name = "ln"
    namespaced = False  # a host belongs to the cluster, like a Node

    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)


REQUESTED_BY = f"{GROUP}/requested-by"  # annotation: which gateway replica or controller asked for an instance


def new_instance(
    *,
    name: str,
    model: str,
    model_uid: str | None,
    profile: str,
    args_hash: str,
    reason: Reason,
    requested_by: str,
) -> LlamaInstance:
    """The one way an instance is made (by a gateway on demand, by the operator for min instances): owned
    by its model, so deleting the model takes its instances along where garbage collection runs."""
    owners = []
    if model_uid:
        owners.append(OwnerReference(api_version=API_VERSION, kind=LlamaModel.kind_name, name=model, uid=model_uid))
    return LlamaInstance(
        metadata=ObjectMeta(name=name, annotations={REQUESTED_BY: requested_by}, owner_references=owners),
        spec=InstanceSpec(model=model, profile=profile, args_hash=args_hash, reason=reason),
    )


def instance_name(model: str, profile: str, suffix: str) -> str:
    """A DNS-1123 name for an instance of `model:profile`, unique through `suffix`."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"{model}-{profile}".lower()).strip("-")
    base = base[:48].rstrip("-") or "instance"  # well under 63 characters, so labels can carry it too
    return f"{base}-{suffix}"


RESOURCE_KINDS: tuple[type[Resource], ...] = (LlamaModel, LlamaInstance, LlamaNode)
