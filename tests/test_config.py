"""Node config loading: embedded defaults, the seed's field names and defaults, secrets.yaml,
`LLAMESH_*` overrides (nesting, precedence, bad values, unknown names), and every refusal naming the
file, the field path and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamesh_api import config, loading


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def only_problem(exc: pytest.ExceptionInfo[loading.ConfigError]) -> loading.Problem:
    assert len(exc.value.problems) == 1, exc.value.problems
    return exc.value.problems[0]


def test_no_file_gives_the_seed_defaults() -> None:
    node = loading.load_node_config(None, environ={})
    assert node.max_instances_per_node == 100
    assert node.shutdown_grace_period_seconds == 30
    assert node.max_hops == 10
    assert node.metrics_path == "./node-metrics.json"
    assert node.max_total_queue_entries == 0
    assert node.model_defaults.max_wait_in_queue_ms == 60000
    assert node.model_defaults.min_eviction_tenure_secs == 15
    assert node.llama_cpp.keep_builds == 3
    assert node.llama_cpp.binary_path == "./llama.cpp/bin/llama-server"
    assert node.llama_cpp.source is config.BuildSource.GIT
    assert node.cluster.discovery.service_name == "_llama-mesh._tcp.local"
    assert node.cluster.circuit_breaker.failure_threshold == 5
    assert node.cluster.noise.session_ttl_seconds == 3600
    assert node.http.body_read_timeout_ms == 30000
    assert node.http.request_body_limit_bytes == 1048576
    assert node.wedge_detector.window_ms == 600000
    assert node.logging.filename == "proxy.log"
    assert node.auth.required_header == "x-api-key"


def test_empty_file_is_valid(tmp_path: Path) -> None:
    node = loading.load_node_config(write(tmp_path, "config.yaml", ""), environ={})
    assert node.listen_port == 8080


def test_the_example_config_loads() -> None:
    examples = Path(__file__).parent.parent / "examples"
    node = loading.load_node_config(examples / "config.yaml", environ={})
    assert node.llama_cpp.source is config.BuildSource.PYPI


def test_env_overrides_file_values_and_nests(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "node_id: from-file\ncluster:\n  peers: ['a:1']\n  enabled: false\n")
    node = loading.load_node_config(
        path,
        environ={
            "LLAMESH_NODE_ID": "from-env",
            "LLAMESH_CLUSTER__ENABLED": "true",
            "LLAMESH_HTTP__IDLE_TIMEOUT_SECONDS": "77",
            "UNRELATED": "x",
        },
    )
    assert node.node_id == "from-env"
    assert node.cluster.enabled is True
    assert node.cluster.peers == ["a:1"]  # nested merge keeps the file's sibling values
    assert node.http.idle_timeout_seconds == 77


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(loading.ConfigError) as exc:
        loading.load_node_config(None, environ={"LLAMESH_MAX_VRAM_MB": "lots"})
    problem = only_problem(exc)
    assert problem.source == "environment variable LLAMESH_MAX_VRAM_MB"
    assert problem.field == "max_vram_mb"
    assert problem.fix == "use a whole number"


def test_unknown_env_name_is_refused_with_a_suggestion() -> None:
    with pytest.raises(loading.ConfigError) as exc:
        loading.load_node_config(None, environ={"LLAMESH_CLUSTR__ENABLED": "true"})
    problem = only_problem(exc)
    assert "LLAMESH_CLUSTR__ENABLED" in problem.source
    assert "LLAMESH_CLUSTER__ENABLED" in problem.fix


def test_unknown_field_is_a_typo_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "model_defaults:\n  max_wait_in_queu_ms: 5\n")
    with pytest.raises(loading.ConfigError) as exc:
        loading.load_node_config(path, environ={})
    problem = only_problem(exc)
    assert problem.source == str(path)
    assert problem.field == "model_defaults.max_wait_in_queu_ms"
    assert "max_wait_in_queue_ms" in problem.fix
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("text", "field", "needle"),
    [
        (
            "llama_cpp_ports:\n  ranges: [{start: 9000, end: 8000}]\n",
            "llama_cpp_ports.ranges[0]",
            "start <= end",
        ),
        ("llama_cpp_ports: {}\n", "llama_cpp_ports", "no usable ports"),
        ("llama_cpp_ports:\n  ports: [70000]\n", "llama_cpp_ports.ports[0]", "<= 65535"),
        ("auth:\n  enabled: true\n", "auth", "allowed_keys is empty"),
        ("auth:\n  enabled: true\n  allowed_keys: [k]\n  required_header: ' '\n", "auth", "required_header"),
        ("listen_addr: localhost\n", "listen_addr", "HOST:PORT"),
        ("max_instances_per_node: 0\n", "max_instances_per_node", ">= 1"),
        ("http:\n  body_read_timeout_ms: 0\n", "http.body_read_timeout_ms", ">= 1"),
        ("cluster:\n  version_mismatch_action: strict\n", "cluster.version_mismatch_action", "reject_major"),
        (
            "cluster:\n  circuit_breaker: {open_duration_base_ms: 9000, open_duration_max_ms: 10}\n",
            "cluster.circuit_breaker",
            "base <= max",
        ),
        ("llama_cpp:\n  source: local\n", "llama_cpp", "source_path"),
        ("max_vram_mb: [1]\n", "max_vram_mb", "whole number"),
    ],
)
def test_silently_breaking_configs_are_refused(tmp_path: Path, text: str, field: str, needle: str) -> None:
    path = write(tmp_path, "config.yaml", text)
    with pytest.raises(loading.ConfigError) as exc:
        loading.load_node_config(path, environ={})
    problem = only_problem(exc)
    assert problem.field == field
    assert needle in f"{problem.message} {problem.fix}"


def test_broken_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "node_id: a\nhttp: [\n")
    with pytest.raises(loading.ConfigError) as exc:
        loading.load_node_config(path, environ={})
    problem = only_problem(exc)
    assert problem.field.startswith("line ")
    assert "YAML" in problem.message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(loading.ConfigError) as exc:
        loading.load_node_config(tmp_path / "nope.yaml", environ={})
    assert "cannot read" in only_problem(exc).message


def test_secrets_replace_config_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "auth:\n  enabled: false\n")
    secrets = write(tmp_path, "secrets.yaml", "auth:\n  enabled: true\n  allowed_keys: [s3cret]\n")
    node = loading.load_node_config(path, secrets_path=secrets, environ={})
    assert node.auth.enabled
    assert node.auth.accepts("s3cret")
    assert not node.auth.accepts("other")
    assert "s3cret" not in repr(node.auth)


def test_secrets_with_unknown_section_are_refused(tmp_path: Path) -> None:
    secrets = write(tmp_path, "secrets.yaml", "node_id: x\n")
    with pytest.raises(loading.ConfigError) as exc:
        loading.load_node_config(None, secrets_path=secrets, environ={})
    problem = only_problem(exc)
    assert problem.source == str(secrets)
    assert problem.field == "node_id"


def test_port_candidates_merge_ports_and_ranges() -> None:
    ports = config.LlamaCppPorts(ports=[8300, 8200], ranges=[config.PortRange(start=8200, end=8202)])
    assert ports.candidates() == [8300, 8200, 8201, 8202]
