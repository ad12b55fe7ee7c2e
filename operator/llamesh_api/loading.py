"""Reading config.yaml, secrets.yaml, cookbook.yaml and `LLAMESH_*` overrides into validated models.

Every refusal is a `ConfigError` whose problems each name the file (or environment variable), the field
path and the fix, because the person reading it is editing that file. A refusal never replaces what a
running service already loaded: callers keep their last good value.

This module reads files once; watching them for changes is the bare-metal driver's job.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from llamesh_api import config, cookbook

ENV_PREFIX = "LLAMESH_"
ENV_NESTED_DELIMITER = "__"
_OVERRIDES: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("llamesh_env_overrides")


@dataclasses.dataclass(frozen=True)
class Problem:
    source: str  # a file path or an environment variable
    field: str  # dotted path, e.g. models[0](name=x).profiles[1](id=y).max_instances
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.field}" if self.field else self.source
        return f"{where}: {self.message}" + (f" — fix: {self.fix}" if self.fix else "")


class ConfigError(Exception):
    """A config, secrets or cookbook file (or an override) that llamesh refuses, with every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`; an empty file is an empty mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [Problem(str(path), "", f"cannot read the file ({exc.strerror})", "check the path and permissions")]
        ) from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            [Problem(str(path), where, f"not valid YAML: {reason}", "fix the YAML syntax at that position")]
        ) from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(
            [
                Problem(
                    str(path),
                    "",
                    f"the top level is a {type(document).__name__}, not a mapping",
                    "use key: value",
                )
            ]
        )
    return document


class _EnvOverrides(BaseSettings, config.NodeConfig):
    """NodeConfig with `LLAMESH_*` variables applied over the file's values (env wins, nested merge)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="forbid", case_sensitive=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if isinstance(env_settings, EnvSettingsSource):
            # The overrides come from the caller's mapping (tests pass their own), not os.environ.
            env_settings.env_vars = {name.lower(): value for name, value in _OVERRIDES.get().items()}
        return (env_settings, init_settings)


def load_node_config(
    path: Path | None,
    *,
    secrets_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> config.NodeConfig:
    """config.yaml (embedded defaults without one), secrets.yaml over it, `LLAMESH_*` over both."""
    environ = os.environ if environ is None else environ
    values = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if secrets_path is not None:
        secrets = read_yaml(secrets_path)
        _validate(config.SecretsConfig, secrets, source=str(secrets_path))
        values.update({key: value for key, value in secrets.items() if value is not None})
    overrides = {key: value for key, value in environ.items() if key.upper().startswith(ENV_PREFIX)}
    _check_env_names(overrides)
    token = _OVERRIDES.set(overrides)
    try:
        settings = _EnvOverrides(**values)
    except pydantic.ValidationError as exc:
        raise ConfigError(_problems(exc, root=config.NodeConfig, source=source, env=overrides)) from None
    finally:
        _OVERRIDES.reset(token)
    return config.NodeConfig.model_validate(settings.model_dump())


def load_cookbook(path: Path) -> cookbook.Cookbook:
    """cookbook.yaml as a validated Cookbook."""
    values = read_yaml(path)
    return _validate(cookbook.Cookbook, values, source=str(path))


def parse_cookbook(values: Mapping[str, Any], *, source: str) -> cookbook.Cookbook:
    """An already-read cookbook mapping (tests, the API server's objects) as a validated Cookbook."""
    return _validate(cookbook.Cookbook, dict(values), source=source)


def cross_check(
    node_config: config.NodeConfig, book: cookbook.Cookbook, *, config_source: str, cookbook_source: str
) -> list[Problem]:
    """Problems only visible with both files: `default_model` must name an enabled model:profile."""
    if not node_config.default_model:
        return []
    model_name, profile_id = cookbook.split_key(node_config.default_model)
    for model in book.models:
        if model.name.lower() == model_name.lower():
            profile = model.profile(profile_id)
            if profile is not None and profile.enabled and model.enabled:
                return []
    return [
        Problem(
            config_source,
            "default_model",
            f"'{node_config.default_model}' is not an enabled model:profile in {cookbook_source}",
            "name an existing model (and profile), or remove default_model",
        )
    ]


_M = typing.TypeVar("_M", bound=pydantic.BaseModel)


def _validate(model: type[_M], values: dict[str, Any], *, source: str) -> _M:
    try:
        return model.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ConfigError(_problems(exc, root=model, source=source, env={}, document=values)) from None


def _env_names(model: type[pydantic.BaseModel], prefix: str = ENV_PREFIX) -> set[str]:
    """Every environment variable name that maps to a config field (sections and leaves)."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        env_name = prefix + name.upper()
        names.add(env_name)
        nested = _model_in(field.annotation)
        if nested is not None:
            names |= _env_names(nested, env_name + ENV_NESTED_DELIMITER)
    return names


def _check_env_names(overrides: Mapping[str, str]) -> None:
    known = _env_names(config.NodeConfig)
    problems = []
    for name in overrides:
        if name.upper() in known:
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f"did you mean {close[0]}?" if close else "unset it, or use __ between nested fields"
        problems.append(Problem(f"environment variable {name}", "", "no config field has this name", hint))
    if problems:
        raise ConfigError(problems)


def _model_in(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The pydantic model inside `annotation` (through Optional/list), if any."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _problems(
    exc: pydantic.ValidationError,
    *,
    root: type[pydantic.BaseModel],
    source: str,
    env: Mapping[str, str],
    document: Mapping[str, Any] | None = None,
) -> list[Problem]:
    problems = []
    env_upper = {name.upper(): name for name in env}
    for error in exc.errors():
        loc = tuple(error["loc"])
        env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(part).upper() for part in loc)
        where = f"environment variable {env_upper[env_name]}" if env_name in env_upper else source
        problems.append(
            Problem(
                where,
                _field_path(loc, document),
                _message(error),
                _fix(error, root=root, loc=loc),
            )
        )
    return problems


def _field_path(loc: tuple[Any, ...], document: Mapping[str, Any] | None) -> str:
    """`models[0](name=x).profiles[1](id=y).field`: indices with the entry's name, so a person finds it."""
    path = ""
    node: Any = document
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict):
                for label in ("name", "id"):
                    if isinstance(node.get(label), str):
                        path += f"({label}={node[label]})"
                        break
        else:
            path += f".{part}" if path else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return path


def _message(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in {"extra_forbidden"}:
        return "unknown field"
    if error["type"] not in {"value_error", "missing"} and "input" in error:
        shown = repr(error["input"])
        message += f" (got {shown[:60]})"
    return message


_FIXES = {
    "missing": "add this field",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number",
    "int_from_float": "use a whole number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "use a quoted string",
    "list_type": "use a YAML list",
    "model_type": "use a mapping (key: value lines)",
    "dict_type": "use a mapping (key: value lines)",
    "string_too_short": "use a non-empty value",
    "too_short": "add at least one entry",
}


def _fix(error: Any, *, root: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _known_fields(root, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return f"did you mean '{close[0]}'?" if close else "remove it or fix its spelling"
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        bound = next(iter(ctx.values()), "")
        return {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[
            kind
        ] + f" {bound}"
    if kind == "literal_error" or kind == "enum":
        return f"use one of {ctx.get('expected', '')}"
    return _FIXES.get(kind, "")


def _known_fields(root: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: type[pydantic.BaseModel] | None = root
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []
