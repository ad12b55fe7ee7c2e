"""The node config (config.yaml) and secrets (secrets.yaml): fields, defaults and cross-field checks.

Field names and defaults follow the seed's SPEC "Node Config" section. Where the seed requires a field
without a default, a sensible default is embedded here so that `llamesh serve` runs with no config at
all; every such default is the value the seed's own example uses.

This module only describes and validates; reading files and environment overrides live in `loading`.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr


class _Section(BaseModel):
    """A config section: unknown keys are typos, so they are refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class Routing(enum.StrEnum):
    AFFINITY = "affinity"
    LEAST_LOADED = "least_loaded"


class ModelDefaults(_Section):
    max_concurrent_requests_per_instance: int = Field(
        0, ge=0, description="Requests one instance serves at once before others queue; 0 = unlimited."
    )
    max_queue_size_per_model: int = Field(0, ge=0, description="Queue length per model:profile; 0 = unlimited.")
    max_instances_per_model: int = Field(4, ge=0, description="Instances per model:profile unless overridden.")
    max_wait_in_queue_ms: int = Field(60000, ge=0, description="Longest wait in a queue; 0 = forever.")
    max_request_duration_ms: int = Field(0, ge=0, description="Longest request; 0 = unlimited.")
    min_eviction_tenure_secs: int = Field(
        15, ge=0, description="Serve time before a busy instance may be drained for a competing model."
    )
    routing: Routing = Field(
        Routing.AFFINITY,
        description="How a request picks among a profile's ready instances: affinity (the instance that likely "
        "holds its prompt's KV cache, within a load bound) or least_loaded (fewest requests in flight).",
    )


class PortRange(_Section):
    start: int = Field(ge=1, le=65535)
    end: int = Field(ge=1, le=65535)

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.start > self.end:
            raise ValueError(
                f"range start {self.start} is greater than end {self.end}; ranges are inclusive, so set start <= end"
            )
        return self


class LlamaCppPorts(_Section):
    ports: list[Annotated[int, Field(ge=1, le=65535)]] | None = None
    ranges: list[PortRange] | None = None

    @pydantic.model_validator(mode="after")
    def _not_empty(self) -> LlamaCppPorts:
        if not self.ports and not self.ranges:
            raise ValueError(
                "llama_cpp_ports provides no usable ports; give a non-empty `ports` list or at least one "
                "`ranges` entry, or remove llama_cpp_ports to use OS-assigned ephemeral ports"
            )
        return self

    def candidates(self) -> list[int]:
        """Every configured port, explicit ones first, without duplicates."""
        seen: dict[int, None] = {}
        for port in self.ports or []:
            seen.setdefault(port, None)
        for port_range in self.ranges or []:
            for port in range(port_range.start, port_range.end + 1):
                seen.setdefault(port, None)
        return list(seen)


class BuildSource(enum.StrEnum):
    """Where llama.cpp's source comes from."""

    GIT = "git"  # clone `repo_url` at `branch` (the seed's default)
    PYPI = "pypi"  # the llama.cpp tree vendored in a PyPI sdist (works with only a package index)
    LOCAL = "local"  # an existing source folder at `source_path`


class LlamaCppConfig(_Section):
    source: BuildSource = Field(BuildSource.GIT, description="git | pypi | local.")
    repo_url: str = "https://github.com/ggml-org/llama.cpp.git"
    repo_path: str = "./llama.cpp"
    build_path: str = "./llama.cpp/build"
    binary_path: str = "./llama.cpp/bin/llama-server"
    branch: str = Field("master", description="Branch or tag; a release tag (e.g. b6115) pins the version.")
    pypi_package: str = Field(
        "llama-cpp-python==0.3.36", description="Requirement whose sdist vendors llama.cpp (source: pypi)."
    )
    pypi_subdir: str = Field("vendor/llama.cpp", description="llama.cpp's folder inside that sdist.")
    source_path: str | None = Field(None, description="llama.cpp source folder (source: local).")
    cache_dir: str = Field(
        "~/.cache/llamesh", description="Downloads, sources, per-revision builds and ccache live here."
    )
    build_args: list[str] = Field(default_factory=lambda: ["-DGGML_CUDA=ON", "-DGGML_CUDA_FA_ALL_QUANTS=ON"])
    build_command_args: list[str] = Field(default_factory=list)
    auto_update_interval_seconds: int = Field(86400, ge=0)
    enabled: bool = True
    keep_builds: int = Field(3, ge=0)

    @pydantic.model_validator(mode="after")
    def _source_complete(self) -> LlamaCppConfig:
        if self.source is BuildSource.LOCAL and not self.source_path:
            raise ValueError("source is 'local' but source_path is not set; set source_path to the llama.cpp folder")
        return self


class DiscoveryConfig(_Section):
    mdns: bool = True
    service_name: str = "_llama-mesh._tcp.local"


class NoiseConfig(_Section):
    enabled: bool = True
    tofu: bool = True
    config_dir: str | None = None
    private_key_path: str | None = None
    previous_key_path: str | None = None
    known_peers_path: str | None = None
    allowed_keys: list[str] = Field(default_factory=list)
    session_ttl_seconds: int = Field(3600, ge=0)


class CircuitBreakerConfig(_Section):
    enabled: bool = True
    failure_threshold: int = Field(5, ge=1)
    success_threshold: int = Field(2, ge=1)
    open_duration_base_ms: int = Field(5000, ge=1)
    open_duration_max_ms: int = Field(60000, ge=1)
    half_open_probe_interval_ms: int = Field(1000, ge=0)

    @pydantic.model_validator(mode="after")
    def _base_below_max(self) -> CircuitBreakerConfig:
        if self.open_duration_base_ms > self.open_duration_max_ms:
            raise ValueError(
                f"open_duration_base_ms ({self.open_duration_base_ms}) is greater than open_duration_max_ms "
                f"({self.open_duration_max_ms}); the backoff would never grow. Set base <= max"
            )
        return self


class ClusterConfig(_Section):
    enabled: bool = False
    peers: list[str] = Field(default_factory=list)
    gossip_interval_seconds: int = Field(5, ge=1)
    max_concurrent_gossip: int = Field(16, ge=1)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    version_mismatch_action: Literal["warn", "reject_major", "reject_any"] = "warn"


class HttpConfig(_Section):
    """The gateway's HTTP server: what one client may send, and how long and how many it may hold open."""

    request_body_limit_bytes: int = Field(1048576, ge=1, description="Largest request body in bytes (413 above).")
    idle_timeout_seconds: int = Field(
        120, ge=1, description="A kept-alive client connection with no request for this long is closed."
    )
    body_read_timeout_ms: int = Field(30000, ge=1, description="Longest time to read a request body (408 after).")
    protocol_detect_timeout_ms: int = Field(
        10000,
        ge=1,
        description="A new client connection that sends no byte for this long is closed (the seed's wait for "
        "the bytes that tell its protocol).",
    )
    header_read_timeout_ms: int = Field(
        10000,
        ge=1,
        description="A request's line and headers must be complete this long after its first byte, or the "
        "connection is closed without an answer (a slow or stalled client).",
    )
    max_connections: int = Field(
        10000,
        ge=1,
        description="Client connections open at once; more are closed as soon as they are accepted. Lowered at "
        "start to what the open-file limit (RLIMIT_NOFILE) allows.",
    )


class WedgeDetectorConfig(_Section):
    enabled: bool = False
    window_ms: int = Field(600000, ge=1)
    sample_interval_ms: int = Field(5000, ge=1)
    cpu_only: bool = False


class KvCacheConfig(_Section):
    """Slot KV caches saved to disk before an idle or evicted instance stops, restored by the next one."""

    enabled: bool = Field(False, description="Save and restore slot KV caches (adds --slot-save-path to instances).")
    directory: str = Field(
        "./kv-cache", description="Folder of the saved caches, one subfolder per args hash; relative to the config."
    )
    max_disk_mb: int = Field(
        2048, ge=1, description="Disk the saved caches may use on this node; least recently saved files go first."
    )
    min_cached_tokens: int = Field(
        256, ge=1, description="A slot is saved only when its cached prompt holds at least this many tokens."
    )


class LoggingConfig(_Section):
    enabled: bool = Field(False, description="Also write the JSON log lines to a file (stderr always gets them).")
    directory: str = Field("./logs", description="Folder of the log file; relative to the config file's folder.")
    filename: str = Field("proxy.log", description="The live file; rotated files get .YYYY-MM-DD (UTC) appended.")
    max_keep_files: int = Field(7, ge=0, description="Rotated files kept (compressed or not); 0 = keep them all.")
    compression: bool = Field(True, description="gzip each file as it is rotated (.gz after the date).")


class AuthConfig(_Section):
    enabled: bool = False
    required_header: str = "x-api-key"
    allowed_keys: list[SecretStr] = Field(default_factory=list)

    @pydantic.model_validator(mode="after")
    def _usable(self) -> AuthConfig:
        if self.enabled and not self.allowed_keys:
            raise ValueError(
                "auth.enabled is true but allowed_keys is empty, so every request would get 401; "
                "add at least one key (in secrets.yaml) or set enabled: false"
            )
        if self.enabled and not self.required_header.strip():
            raise ValueError("auth.enabled is true but required_header is empty; set it, e.g. 'x-api-key'")
        return self

    def accepts(self, key: str) -> bool:
        return any(key == allowed.get_secret_value() for allowed in self.allowed_keys)


class ServerTlsConfig(_Section):
    enabled: bool = False
    cert_path: str = ""
    key_path: str = ""


class ClusterTlsConfig(_Section):
    enabled: bool = False
    ca_cert_path: str = ""
    client_cert_path: str = ""
    client_key_path: str = ""


class NodeConfig(_Section):
    """config.yaml. Every field has a default, so an empty file (or none) is a valid single-node config."""

    node_id: str = Field(default_factory=lambda: os.uname().nodename, min_length=1)
    listen_addr: str = "127.0.0.1:8080"
    public_url: str | None = None
    max_vram_mb: int = Field(0, ge=0, description="VRAM guardrail in MB; 0 = no GPU memory to spend.")
    max_sysmem_mb: int = Field(0, ge=0, description="System memory guardrail in MB; 0 = no limit.")
    max_instances_per_node: int = Field(100, ge=1)
    shutdown_grace_period_seconds: int = Field(30, ge=0)
    max_hops: int = Field(10, ge=0)
    metrics_path: str = "./node-metrics.json"
    max_total_queue_entries: int = Field(0, ge=0)
    upstream_read_timeout_ms: int = Field(0, ge=0)
    default_model: str | None = None
    model_defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    llama_cpp_ports: LlamaCppPorts | None = None
    llama_cpp: LlamaCppConfig = Field(default_factory=LlamaCppConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    wedge_detector: WedgeDetectorConfig = Field(default_factory=WedgeDetectorConfig)
    kv_cache: KvCacheConfig = Field(default_factory=KvCacheConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    server_tls: ServerTlsConfig = Field(default_factory=ServerTlsConfig)
    cluster_tls: ClusterTlsConfig = Field(default_factory=ClusterTlsConfig)

    @pydantic.field_validator("listen_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not HOST:PORT; write it like '0.0.0.0:8080'")
        return value

    @pydantic.model_validator(mode="after")
    def _tls_consistent(self) -> NodeConfig:
        if self.cluster_tls.enabled and not self.server_tls.enabled:
            raise ValueError("cluster_tls is enabled but server_tls is not; mTLS needs server_tls.enabled: true")
        return self

    @property
    def listen_host(self) -> str:
        return self.listen_addr.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen_addr.rpartition(":")[2])


class SecretsConfig(_Section):
    """secrets.yaml: sections that replace the same sections of config.yaml."""

    auth: AuthConfig | None = None
    server_tls: ServerTlsConfig | None = None
    cluster_tls: ClusterTlsConfig | None = None


def resolve_path(value: str, *, base_dir: Path) -> Path:
    """A config path: `~` expanded, relative paths taken from the config file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)
