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
    """One Kubernetes-style condition: an aspect of the object and whether it holds."""

    type: str = Field(description="What the condition is about, e.g. Accepted or Ready.")
    status: str = Field(description="True, False or Unknown.")  # "True" | "False" | "Unknown"
    reason: str = Field("", description="CamelCase cause of the latest transition, e.g. InstancesReady.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: datetime.datetime | None = Field(None, description="When status last changed.")


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
    """How one enabled profile of the model is running."""

    args_hash: str = Field(
        description="Hash of the profile's effective llama-server args; instances with another hash are drained."
    )
    ready_instances: int = Field(0, description="Instances of this profile that are Ready and not draining.")
    instances: int = Field(0, description="Instances of this profile not Stopped or Failed (starting ones included).")
    parsed_model_params: dict[str, Any] | None = Field(
        None, description="What a ready instance's llama-server reported (n_ctx, n_slots, ...); unset until one is."
    )
    cold_start_stage: int = Field(
        0,
        description=(
            "Cold-start OOM recovery of a retry not yet ready: 0 none, 1 idle instances evicted, "
            "2 every instance drained, 3 waiting for an empty node."
        ),
    )
    cold_oom_evictions: int = Field(
        0, description="Instances drained to make room for this profile's cold-start retries; never decreases."
    )


class ModelStatus(_Wire):
    """What the operator last observed of the model's instances; written by the operator only."""

    observed_generation: int | None = Field(None, description="The metadata.generation this status was computed for.")
    ready_instances: int = Field(0, description="Ready, non-draining instances over all profiles.")
    instances: int = Field(0, description="Instances not Stopped or Failed over all profiles (starting ones included).")
    profiles: dict[str, ProfileStatus] = Field(
        default_factory=dict, description="Per enabled profile id: its instance counts and args hash."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Accepted (the spec passes the cookbook's checks) and Ready (at least one instance is ready).",
    )


class LlamaModel(Resource):
    """A model clients can ask for by name, with its profiles (one cookbook.yaml entry)."""

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
    """Why an instance was created."""

    DEMAND = "demand"
    PREWARM = "prewarm"
    MIN_INSTANCES = "min_instances"


class InstanceSpec(_Wire):
    """Which model profile to run, where, and whether to wind it down."""

    model: str = Field(description="Name of the LlamaModel this instance serves (same namespace).")
    profile: str = Field(description="Id of the model's profile whose llama-server command line it runs.")
    args_hash: str = Field(
        description="Hash of the profile's effective llama-server args when it was created; a change drains it."
    )
    reason: Reason = Field(
        Reason.DEMAND, description="Why it was created: demand (a request), prewarm or min_instances; default: demand."
    )
    node_name: str | None = Field(
        None, description="The node that runs it; set by the operator (unset = not yet placed, Pending)."
    )
    drain: bool = Field(False, description="Stop taking requests and stop once idle; set by the operator.")
    drain_reason: str | None = Field(
        None, description="Why it drains, e.g. idle, profile_changed, profile_removed or capacity: ..."
    )


class GatewayUsage(_Wire):
    """What one gateway replica reports about its traffic to an instance (only that replica writes it)."""

    in_flight: int = Field(0, description="Requests this replica has running on the instance now.")
    last_request_at: datetime.datetime | None = Field(
        None, description="When this replica last sent the instance a request; idle time counts from the latest."
    )
    claimed: int = Field(0, description="Slots of this instance the replica may use; all claims ≤ the limit.")
    claimed_at: datetime.datetime | None = Field(
        None, description="When the claim was last renewed; an older claim than the claim TTL counts for nothing."
    )
    waiting: int = Field(0, description="Requests the replica holds queued that this instance could serve.")


class InstanceStatus(_Wire):
    """The llama-server process as its node's agent reports it, plus each gateway replica's traffic."""

    phase: Phase = Field(
        Phase.PENDING,
        description="Pending, Scheduled, Downloading, Starting, Ready, Draining, Stopped or Failed; default: Pending.",
    )
    message: str = Field("", description="Progress or failure detail: download, start attempt, last log lines.")
    host: str | None = Field(None, description="Address gateways connect to for this instance's llama-server.")
    port: int | None = Field(None, description="TCP port llama-server listens on.")
    pid: int | None = Field(None, description="Process id of llama-server on its node; unset when not running.")
    started_at: datetime.datetime | None = Field(None, description="When the agent started it (download or spawn).")
    ready_at: datetime.datetime | None = Field(None, description="When llama-server first answered /health with 200.")
    stopped_at: datetime.datetime | None = Field(None, description="When the process stopped or failed.")
    n_slots: int | None = Field(None, description="Requests llama-server serves at once (its parallel slots).")
    parsed_model_params: dict[str, Any] | None = Field(
        None, description="Model parameters llama-server reported at start-up (n_ctx, n_ctx_train, n_slots, ...)."
    )
    llama_cpp_version: str | None = Field(None, description="llama.cpp version of the llama-server binary it runs.")
    spawn_attempts: int = Field(0, description="Process starts tried so far (a failed start is retried).")
    peak_sysmem_mb: int | None = Field(None, description="Highest resident system memory of the process so far, in MB.")
    peak_vram_mb: int | None = Field(None, description="Highest VRAM of the process so far, in MB (NVIDIA only).")
    kv_cache_restored: int = Field(
        0, description="Slots whose KV cache this instance restored at start from one an earlier instance saved."
    )
    kv_cache_restored_from: str | None = Field(
        None,
        description="The instance (same args hash) whose saved KV caches were restored; gateways route its "
        "conversations here.",
    )
    usage: dict[str, GatewayUsage] = Field(
        default_factory=dict, description="Per gateway replica name: its traffic here; each writes only its own."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Kubernetes-style conditions (none set today; phase tells the state)."
    )

    @property
    def in_flight(self) -> int:
        return sum(report.in_flight for report in self.usage.values())

    @property
    def last_request_at(self) -> datetime.datetime | None:
        times = [report.last_request_at for report in self.usage.values() if report.last_request_at]
        return max(times, default=None)


class LlamaInstance(Resource):
    """One llama-server process of a model profile on one node."""

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
    """The node's capacity and address, as its agent publishes them from config.yaml."""

    max_vram_mb: int = Field(0, description="VRAM in MB its instances may use together; 0 = no GPU memory to spend.")
    max_sysmem_mb: int = Field(0, description="System memory in MB its instances may use together; 0 = no limit.")
    max_instances: int = Field(
        100, description="Most instances it runs at once (max_instances_per_node); default: 100."
    )
    address: str = Field(
        "127.0.0.1", description="Where the gateway reaches this node's instances; default: 127.0.0.1."
    )
    rebuild_requests: int = Field(
        0, description="Bumped to ask the agent for a llama.cpp rebuild (done while above status.rebuildsHandled)."
    )


class Learned(_Wire):
    """What a node learned about one args hash; kept across evictions and restarts."""

    parsed_model_params: dict[str, Any] | None = Field(
        None, description="Model parameters llama-server reported; unset when another llama.cpp version produced them."
    )
    llama_cpp_version: str | None = Field(None, description="llama.cpp version that produced parsedModelParams.")
    peak_sysmem_mb: int | None = Field(
        None, description="Highest resident system memory seen with these args, in MB; used to place instances."
    )
    peak_vram_mb: int | None = Field(
        None, description="Highest VRAM seen with these args, in MB; used to place instances."
    )


class NodeStatus(_Wire):
    """What the node's agent reports about the host, refreshed with every heartbeat."""

    ready: bool = Field(False, description="A llama-server binary is in place and the agent is not shutting down.")
    draining: bool = Field(False, description="The agent is shutting down; no new instances are placed here.")
    binary_path: str | None = Field(None, description="The live llama-server binary; unset while there is none.")
    llama_cpp_version: str | None = Field(None, description="llama.cpp version of the live binary.")
    is_building: bool = Field(False, description="A llama.cpp build or rebuild is running.")
    last_build_error: str | None = Field(None, description="Why the latest build failed, if it did.")
    last_build_at: datetime.datetime | None = Field(None, description="When the latest build finished.")
    last_rollback: str | None = Field(
        None,
        description="The last automatic rollback of a new llama.cpp build that crashed its first instances: "
        "from and to which version, and why.",
    )
    last_rollback_at: datetime.datetime | None = Field(None, description="When that rollback happened.")
    gpu_telemetry_available: bool = Field(
        False, description="NVML answered, so the device VRAM figures are real (false without an NVIDIA GPU)."
    )
    device_vram_total_mb: int = Field(0, description="VRAM of the node's GPUs at the last sample, in MB.")
    device_vram_used_mb: int = Field(0, description="VRAM in use on the GPUs by anyone at the last sample, in MB.")
    llamesh_vram_mb: int = Field(
        0, description="VRAM of this agent's llama-server processes at the last sample, in MB."
    )
    llamesh_sysmem_mb: int = Field(
        0, description="Resident memory of this agent's llama-server processes at the last sample, in MB."
    )
    active_instances: int = Field(0, description="Instances the agent runs now (starting, ready or stopping).")
    rebuilds_handled: int = Field(0, description="How many of spec.rebuildRequests were carried out; never decreases.")
    wedged_instances_killed: int = Field(
        0,
        description="llama-server processes the wedge watchdog killed here (a slot held at ~0 % CPU and GPU for its "
        "window); never decreases.",
    )
    kv_cache_saves: int = Field(
        0, description="Slot KV caches saved to disk before an instance stopped; never decreases."
    )
    kv_cache_restores: int = Field(
        0, description="Saved slot KV caches loaded into a starting instance of the same args hash; never decreases."
    )
    kv_cache_restore_failures: int = Field(
        0,
        description="Saved slot KV caches not restored (llama-server refused one, restored nothing, or another "
        "llama.cpp build saved it): those conversations start from a cold prompt; never decreases.",
    )
    learned: dict[str, Learned] = Field(
        default_factory=dict, description="Keyed by args hash: peak memory and model parameters learned here."
    )
    heartbeat_at: datetime.datetime | None = Field(None, description="When the agent last wrote this status.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Kubernetes-style conditions (none set today; ready tells the state)."
    )


class LlamaNode(Resource):
    """One host whose agent runs llama-server instances."""

    kind_name = "LlamaNode"
    plural = "llamanodes"
    short_name = "ln"
    namespaced = False  # a host belongs to the cluster, like a Node

    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)


REQUESTED_BY = f"{GROUP}/requested-by"  # annotation: which gateway replica or controller asked for an instance
# annotation: the cold-start OOM recovery stage (1-3) a gateway asks for a retry of a failed cold start at
COLD_START_STAGE = f"{GROUP}/cold-start-stage"


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
