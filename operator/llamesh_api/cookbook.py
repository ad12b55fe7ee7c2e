"""The cookbook: models and their profiles, as cookbook.yaml writes them and as `LlamaModel.spec` holds them.

Fields are the seed's cookbook fields. Both spellings parse (snake_case in cookbook.yaml, camelCase in
Kubernetes); `dump_camel` gives the Kubernetes form. Checks that span profiles (duplicate ids, ':' in
names) live here so the bare-metal loader and the Kubernetes driver refuse the same things.

Nothing here starts or routes anything; resolution of `model[:profile]` requests is `resolve_key` plus
the gateway's own rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from llamesh_api import config, launch_args

DEFAULT_PROFILE = "default"
DEFAULT_IDLE_TIMEOUT_SECONDS = 300
DEFAULT_STARTUP_TIMEOUT_SECONDS = 60
DEFAULT_DOWNLOAD_TIMEOUT_SECONDS = 3600


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        frozen=True,
    )

    def dump_camel(self) -> dict[str, Any]:
        """The Kubernetes (camelCase) form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Profile(_Spec):
    """One profile: a llama-server command line for the model, with its own limits and timeouts."""

    id: str = Field(
        min_length=1,
        description=(
            "Profile id; clients ask for it as `model:id` (the bare model name means `default`). "
            "Unique per model, case-insensitive, no ':'."
        ),
    )
    description: str | None = Field(None, description="Free text about the profile, shown in /v1/models metadata.")
    enabled: bool = Field(
        True, description="Serve this profile; false drains its instances and hides it from /v1/models. Default: true."
    )
    model_path: str | None = Field(
        None, description="Local GGUF file on the node (one model source: this, hfRepo, or -m/-hfr in the args)."
    )
    hf_repo: str | None = Field(
        None, description="Hugging Face repository to download the GGUF from when an instance starts."
    )
    hf_file: str | None = Field(
        None, description="File inside hfRepo; unset = llama-server picks the repository's default."
    )
    llama_server_args: list[Annotated[str, Field(description="One word of the llama-server command line.")]] = Field(
        default_factory=list,
        description=(
            "Extra llama-server flags as a list of words (cookbook.yaml also takes one shell-style string); "
            "--host, --port, -c 0 and --fit off are added unless given here."
        ),
    )
    idle_timeout_seconds: int = Field(
        DEFAULT_IDLE_TIMEOUT_SECONDS,
        ge=0,
        description=(
            "Seconds an idle instance (nothing in flight) keeps running before it drains (minInstances stay); "
            "default: 300."
        ),
    )
    startup_timeout_seconds: int | None = Field(
        None,
        ge=1,
        description="Seconds a local model (modelPath) may take to load and answer /health; unset = 60.",
    )
    download_timeout_seconds: int | None = Field(
        None,
        ge=1,
        description="Seconds a Hugging Face model may take to download and load (hfRepo, -hfr); unset = 3600.",
    )
    max_instances: int | None = Field(
        None,
        ge=0,
        description=(
            "Most instances of this profile at once; 0 = never run here; "
            "unset = model_defaults.max_instances_per_model (4)."
        ),
    )
    max_wait_in_queue_ms: int | None = Field(
        None,
        ge=0,
        description=(
            "Milliseconds a request may wait in the queue for a slot before it fails; 0 = forever; "
            "unset = model_defaults.max_wait_in_queue_ms (60000)."
        ),
    )
    max_request_duration_ms: int | None = Field(
        None,
        ge=0,
        description=(
            "Milliseconds one request may run before it is cut off; 0 = unlimited; "
            "unset = model_defaults.max_request_duration_ms (0)."
        ),
    )
    max_queue_size: int | None = Field(
        None,
        ge=0,
        description=(
            "Requests a gateway replica queues for this profile before refusing more; 0 = unlimited; "
            "unset = model_defaults.max_queue_size_per_model (0)."
        ),
    )
    estimated_vram_mb: int | None = Field(
        None,
        ge=0,
        description="VRAM (MB) one instance needs, used for placement until its peak is learned; unset = 0.",
    )
    estimated_sysmem_mb: int | None = Field(
        None,
        ge=0,
        description="System memory (MB) one instance needs, used for placement until its peak is learned; unset = 0.",
    )
    min_eviction_tenure_secs: int | None = Field(
        None,
        ge=0,
        description=(
            "Seconds a busy instance serves before it may be drained for another model; "
            "unset = model_defaults.min_eviction_tenure_secs (15)."
        ),
    )
    min_instances: int = Field(
        0, ge=0, description="Instances kept running even when idle (capped by maxInstances); default: 0."
    )

    @pydantic.field_validator("llama_server_args", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if value is None:
            return []
        if isinstance(value, str | list | tuple):
            try:
                return launch_args.split_args(value)
            except launch_args.ArgsError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> Self:
        in_args_model = launch_args.has_flag(self.llama_server_args, launch_args.MODEL_FLAGS)
        in_args_hf = launch_args.has_flag(self.llama_server_args, launch_args.HF_REPO_FLAGS)
        if not (self.model_path or self.hf_repo or in_args_model or in_args_hf):
            raise ValueError(
                f"profile '{self.id}' has no model source; set model_path, or hf_repo (+ hf_file), "
                "or put -m/--model or -hfr/--hf-repo in llama_server_args"
            )
        if self.model_path and self.hf_repo:
            raise ValueError(f"profile '{self.id}' sets both model_path and hf_repo; keep only one model source")
        if ":" in self.id:
            raise ValueError(
                f"profile id '{self.id}' contains ':', which separates model and profile in requests; remove the colon"
            )
        if launch_args.has_flag(self.llama_server_args, launch_args.EMBEDDING_FLAGS) and launch_args.has_flag(
            self.llama_server_args, launch_args.RERANK_FLAGS
        ):
            raise ValueError(f"profile '{self.id}' sets both --embedding and --reranking; choose one per profile")
        return self

    @property
    def source(self) -> launch_args.ModelSource:
        return launch_args.ModelSource(model_path=self.model_path, hf_repo=self.hf_repo, hf_file=self.hf_file)

    @property
    def uses_hf(self) -> bool:
        return bool(self.hf_repo) or launch_args.has_flag(self.llama_server_args, launch_args.HF_REPO_FLAGS)

    @property
    def is_embedding(self) -> bool:
        return launch_args.has_flag(self.llama_server_args, launch_args.EMBEDDING_FLAGS)

    @property
    def is_rerank(self) -> bool:
        return launch_args.has_flag(self.llama_server_args, launch_args.RERANK_FLAGS)

    @property
    def is_text(self) -> bool:
        return not self.is_embedding and not self.is_rerank

    def effective_args(self) -> list[str]:
        return launch_args.effective_args(self.llama_server_args, source=self.source)

    def args_hash(self) -> str:
        return launch_args.args_hash(self.effective_args())

    def startup_timeout(self) -> int:
        """Seconds an instance may take to become healthy (downloads get the longer budget)."""
        if self.uses_hf:
            return self.download_timeout_seconds or DEFAULT_DOWNLOAD_TIMEOUT_SECONDS
        return self.startup_timeout_seconds or DEFAULT_STARTUP_TIMEOUT_SECONDS

    def max_instances_or(self, defaults: config.ModelDefaults) -> int:
        return self.max_instances if self.max_instances is not None else max(defaults.max_instances_per_model, 1)

    def max_queue_size_or(self, defaults: config.ModelDefaults) -> int:
        return self.max_queue_size if self.max_queue_size is not None else defaults.max_queue_size_per_model

    def max_wait_in_queue_ms_or(self, defaults: config.ModelDefaults) -> int:
        return self.max_wait_in_queue_ms if self.max_wait_in_queue_ms is not None else defaults.max_wait_in_queue_ms

    def max_request_duration_ms_or(self, defaults: config.ModelDefaults) -> int:
        if self.max_request_duration_ms is not None:
            return self.max_request_duration_ms
        return defaults.max_request_duration_ms

    def min_eviction_tenure_or(self, defaults: config.ModelDefaults) -> int:
        if self.min_eviction_tenure_secs is not None:
            return self.min_eviction_tenure_secs
        return defaults.min_eviction_tenure_secs


class ModelSpec(_Spec):
    """`LlamaModel.spec`: one cookbook model without its name (the name is the resource's)."""

    description: str | None = Field(None, description="Free text about the model, shown in /v1/models metadata.")
    enabled: bool = Field(
        True, description="Serve this model; false drains the instances of all its profiles. Default: true."
    )
    profiles: list[Profile] = Field(
        min_length=1,
        description="Ways to run the model (at least one; ids unique, case-insensitive); clients ask for `model:id`.",
    )

    @pydantic.model_validator(mode="after")
    def _unique_profiles(self) -> Self:
        seen: set[str] = set()
        for profile in self.profiles:
            key = profile.id.lower()
            if key in seen:
                raise ValueError(
                    f"profile id '{profile.id}' appears twice (ids are case-insensitive); give each profile its own id"
                )
            seen.add(key)
        return self

    def profile(self, profile_id: str) -> Profile | None:
        wanted = profile_id.lower()
        return next((p for p in self.profiles if p.id.lower() == wanted), None)


class Model(ModelSpec):
    """One cookbook.yaml entry."""

    name: str = Field(min_length=1)

    @pydantic.field_validator("name")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value:
            raise ValueError(
                f"model name '{value}' contains ':', which separates model and profile in requests; remove the colon"
            )
        return value

    def spec(self) -> ModelSpec:
        return ModelSpec.model_validate(self.model_dump(exclude={"name"}))


class Cookbook(_Spec):
    models: list[Model] = Field(default_factory=list)

    @pydantic.field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[Model]) -> list[Model]:
        seen: set[str] = set()
        for model in models:
            key = model.name.lower()
            if key in seen:
                raise ValueError(
                    f"model name '{model.name}' appears twice (names are case-insensitive); merge them or rename one"
                )
            seen.add(key)
        return models


def split_key(requested: str) -> tuple[str, str]:
    """`model[:profile]` as (model, profile); the profile defaults to `default`."""
    model, sep, profile = requested.partition(":")
    return model, (profile if sep else DEFAULT_PROFILE)


def display_name(model: str, profile: str) -> str:
    """The id clients see: the bare model name for the default profile, `model:profile` otherwise."""
    return model if profile == DEFAULT_PROFILE else f"{model}:{profile}"
