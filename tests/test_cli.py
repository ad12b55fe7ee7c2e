"""The `llamesh` command as a user runs it (a real child process): `validate` accepts the examples and
rejects broken files with file/field/fix messages and a non-zero exit; `build-llama` reuses the cached
real build; import direction between the
packages holds (import-linter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


def llamesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamesh_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_validate_accepts_the_examples() -> None:
    result = llamesh(
        "validate", "--config", str(EXAMPLES / "config.yaml"), "--cookbook", str(EXAMPLES / "cookbook.yaml")
    )
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_validate_reports_every_problem_with_file_field_and_fix(tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text("default_model: missing\nhttp:\n  request_body_limit_byte: 5\n")
    cookbook_path = tmp_path / "cookbook.yaml"
    cookbook_path.write_text("models:\n- name: 'a:b'\n  profiles: [{id: d, model_path: m}]\n")
    result = llamesh("validate", "--config", str(config_path), "--cookbook", str(cookbook_path))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any(
        str(config_path) in line and "http.request_body_limit_byte" in line and "request_body_limit_bytes" in line
        for line in lines
    ), result.stderr
    assert any(str(cookbook_path) in line and "models[0](name=a:b).name" in line for line in lines), result.stderr


def test_validate_checks_default_model_against_the_cookbook(tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text("default_model: nope\n")
    result = llamesh("validate", "--config", str(config_path), "--cookbook", str(EXAMPLES / "cookbook.yaml"))
    assert result.returncode == 1
    assert "default_model" in result.stderr


def test_validate_names_a_bad_environment_override() -> None:
    import os

    env = dict(os.environ, LLAMESH_MODEL_DEFAULTS__MAX_WAIT_IN_QUEUE_MS="soon")
    result = llamesh(
        "validate",
        "--config",
        str(EXAMPLES / "config.yaml"),
        "--cookbook",
        str(EXAMPLES / "cookbook.yaml"),
        env=env,
    )
    assert result.returncode == 1
    assert "LLAMESH_MODEL_DEFAULTS__MAX_WAIT_IN_QUEUE_MS" in result.stderr
    assert "whole number" in result.stderr


def test_validate_reports_broken_yaml(tmp_path: Path) -> None:
    cookbook_path = tmp_path / "cookbook.yaml"
    cookbook_path.write_text("models:\n  - name: a\n    profiles: [\n")
    result = llamesh("validate", "--cookbook", str(cookbook_path))
    assert result.returncode == 1
    assert str(cookbook_path) in result.stderr
    assert "YAML" in result.stderr


def test_import_direction_holds() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_build_llama_reuses_the_cached_build(llama_server_binary: Path) -> None:
    result = llamesh("build-llama", "--config", str(EXAMPLES / "config.yaml"))
    assert result.returncode == 0, result.stderr
    assert "llama-server reused" in result.stdout
    assert str(llama_server_binary) in result.stdout
    live = Path("~/.cache/llamesh/bin/llama-server").expanduser()
    assert live.resolve() == llama_server_binary.resolve()
