"""The cookbook: snake_case and camelCase both parse, profile defaults and overrides, endpoint kinds,
the effective launch args and the seed-compatible args hash, and the refusals (':' in names, duplicates,
no model source, two sources, unknown fields, unparseable llama_server_args) naming file, field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamesh_api import config, cookbook, launch_args, loading, resources


def parse(text: str, tmp_path: Path) -> cookbook.Cookbook:
    path = tmp_path / "cookbook.yaml"
    path.write_text(text)
    return loading.load_cookbook(path)


def refusal(text: str, tmp_path: Path) -> loading.Problem:
    with pytest.raises(loading.ConfigError) as exc:
        parse(text, tmp_path)
    assert len(exc.value.problems) == 1, exc.value.problems
    problem = exc.value.problems[0]
    assert problem.source == str(tmp_path / "cookbook.yaml")
    return problem


def test_snake_and_camel_case_are_the_same_cookbook(tmp_path: Path) -> None:
    snake = parse(
        "models:\n- name: m\n  profiles:\n  - id: default\n    model_path: /m.gguf\n"
        "    llama_server_args: '-c 512 -np 2'\n    max_wait_in_queue_ms: 5\n    idle_timeout_seconds: 9\n",
        tmp_path,
    )
    camel = parse(
        "models:\n- name: m\n  profiles:\n  - id: default\n    modelPath: /m.gguf\n"
        "    llamaServerArgs: ['-c', '512', '-np', '2']\n    maxWaitInQueueMs: 5\n    idleTimeoutSeconds: 9\n",
        tmp_path,
    )
    assert snake == camel
    profile = snake.models[0].profiles[0]
    assert profile.llama_server_args == ["-c", "512", "-np", "2"]
    assert snake.models[0].spec().dump_camel()["profiles"][0]["maxWaitInQueueMs"] == 5


def test_profile_defaults_and_overrides() -> None:
    defaults = config.ModelDefaults(max_instances_per_model=0, max_queue_size_per_model=7)
    profile = cookbook.Profile(id="p", model_path="/m.gguf")
    assert profile.idle_timeout_seconds == 300
    assert profile.startup_timeout() == 60
    assert profile.max_instances_or(defaults) == 1  # never below one unless the profile says 0
    assert profile.max_queue_size_or(defaults) == 7
    assert profile.max_wait_in_queue_ms_or(defaults) == 60000
    tuned = cookbook.Profile(id="p", model_path="/m.gguf", max_instances=0, max_queue_size=2, max_wait_in_queue_ms=0)
    assert tuned.max_instances_or(defaults) == 0
    assert tuned.max_queue_size_or(defaults) == 2
    assert tuned.max_wait_in_queue_ms_or(defaults) == 0
    hf = cookbook.Profile(id="p", hf_repo="org/repo", hf_file="f.gguf")
    assert hf.startup_timeout() == 3600


def test_endpoint_kind_comes_from_the_flags() -> None:
    chat = cookbook.Profile(id="c", model_path="/m.gguf", llama_server_args=["-c", "512"])
    embed = cookbook.Profile(id="e", model_path="/m.gguf", llama_server_args=["--embeddings"])
    rerank = cookbook.Profile(id="r", model_path="/m.gguf", llama_server_args=["--reranking"])
    assert (chat.is_text, chat.is_embedding, chat.is_rerank) == (True, False, False)
    assert (embed.is_text, embed.is_embedding) == (False, True)
    assert (rerank.is_text, rerank.is_rerank) == (False, True)


def test_effective_args_add_source_context_and_fit_unless_given() -> None:
    plain = cookbook.Profile(id="p", model_path="/m.gguf", llama_server_args=["--alias=x"])
    assert plain.effective_args() == ["--alias", "x", "-m", "/m.gguf", "-c", "0", "--fit", "off"]
    explicit = cookbook.Profile(id="p", model_path="/m.gguf", llama_server_args=["--ctx-size=512", "--fit", "on"])
    assert explicit.effective_args() == ["--ctx-size", "512", "--fit", "on", "-m", "/m.gguf"]
    hf = cookbook.Profile(id="p", hf_repo="org/r", hf_file="f.gguf")
    assert hf.effective_args()[:4] == ["-hfr", "org/r", "-hff", "f.gguf"]


def test_args_hash_ignores_host_port_and_order_but_not_flags() -> None:
    base = launch_args.args_hash(["-m", "/m.gguf", "-c", "0"])
    assert len(base) == 16
    assert launch_args.args_hash(["-c", "0", "-m", "/m.gguf", "--host", "127.0.0.1", "--port=8200"]) == base
    assert launch_args.args_hash(["-m", "/m.gguf", "-c", "512"]) != base
    profile = cookbook.Profile(id="p", model_path="/m.gguf")
    renamed = cookbook.Profile(id="q", model_path="/m.gguf", description="other")
    assert profile.args_hash() == renamed.args_hash()


def test_args_hash_matches_the_seed_format() -> None:
    # sha256 over sorted words each followed by NUL, first 8 bytes as hex (the seed's compute_args_hash).
    import hashlib

    words = sorted(["-m", "/m.gguf", "-c", "0"])
    expected = hashlib.sha256(b"".join(word.encode() + b"\0" for word in words)).hexdigest()[:16]
    assert launch_args.args_hash(["-m", "/m.gguf", "-c", "0"]) == expected


def test_flag_value_reads_both_forms() -> None:
    assert launch_args.flag_value(["-np", "4"], ("-np", "--parallel")) == "4"
    assert launch_args.flag_value(["--parallel=3"], ("-np", "--parallel")) == "3"
    assert launch_args.flag_value(["-c", "1"], ("-np",)) is None


@pytest.mark.parametrize(
    ("text", "field", "needle"),
    [
        (
            "models:\n- name: 'a:b'\n  profiles: [{id: default, model_path: m}]\n",
            "models[0](name=a:b).name",
            "remove the colon",
        ),
        (
            "models:\n- name: a\n  profiles: [{id: 'x:y', model_path: m}]\n",
            "models[0](name=a).profiles[0](id=x:y)",
            "remove the colon",
        ),
        (
            "models:\n- name: a\n  profiles: [{id: d, model_path: m}, {id: D, model_path: m}]\n",
            "models[0](name=a)",
            "appears twice",
        ),
        (
            "models:\n- name: a\n  profiles: [{id: d, model_path: m}]\n"
            "- name: A\n  profiles: [{id: d, model_path: m}]\n",
            "models",
            "appears twice",
        ),
        (
            "models:\n- name: a\n  profiles: [{id: d}]\n",
            "models[0](name=a).profiles[0](id=d)",
            "no model source",
        ),
        (
            "models:\n- name: a\n  profiles: [{id: d, model_path: m, hf_repo: o/r}]\n",
            "models[0](name=a).profiles[0](id=d)",
            "keep only one",
        ),
        (
            "models:\n- name: a\n  profiles: [{id: d, model_path: m, idle_timout_seconds: 4}]\n",
            "models[0](name=a).profiles[0](id=d).idle_timout_seconds",
            "idle_timeout_seconds",
        ),
        (
            'models:\n- name: a\n  profiles: [{id: d, model_path: m, llama_server_args: "--alias \'x"}]\n',
            "models[0](name=a).profiles[0](id=d).llama_server_args",
            "quotes",
        ),
        ("models:\n- name: a\n  profiles: []\n", "models[0](name=a).profiles", "at least one"),
        (
            "models:\n- name: a\n  profiles: [{id: d, model_path: m, max_instances: -1}]\n",
            "models[0](name=a).profiles[0](id=d).max_instances",
            ">= 0",
        ),
    ],
)
def test_refusals_name_file_field_and_fix(tmp_path: Path, text: str, field: str, needle: str) -> None:
    problem = refusal(text, tmp_path)
    assert problem.field == field
    assert needle in f"{problem.message} {problem.fix}"


def test_model_args_may_carry_the_source(tmp_path: Path) -> None:
    book = parse("models:\n- name: a\n  profiles: [{id: d, llama_server_args: '-m /x.gguf'}]\n", tmp_path)
    assert book.models[0].profiles[0].effective_args()[:2] == ["-m", "/x.gguf"]


def test_default_model_must_name_an_enabled_profile(tmp_path: Path) -> None:
    book = parse(
        "models:\n- name: a\n  profiles: [{id: default, model_path: m}, {id: spare, model_path: m, enabled: false}]\n",
        tmp_path,
    )
    ok = config.NodeConfig(default_model="a")
    assert loading.cross_check(ok, book, config_source="c", cookbook_source="k") == []
    for name in ("b", "a:spare", "a:nope"):
        problems = loading.cross_check(
            config.NodeConfig(default_model=name), book, config_source="c", cookbook_source="k"
        )
        assert [p.field for p in problems] == ["default_model"]


def test_key_splitting_and_display_names() -> None:
    assert cookbook.split_key("m") == ("m", "default")
    assert cookbook.split_key("m:fast") == ("m", "fast")
    assert cookbook.display_name("m", "default") == "m"
    assert cookbook.display_name("m", "fast") == "m:fast"


def test_llama_model_resource_wraps_a_cookbook_model() -> None:
    model = cookbook.Model(name="m", profiles=[cookbook.Profile(id="default", model_path="/m.gguf")])
    resource = resources.LlamaModel.from_cookbook(model)
    wire = resource.to_wire()
    assert wire["apiVersion"] == "llamesh.dev/v1alpha1"
    assert wire["kind"] == "LlamaModel"
    assert wire["metadata"]["name"] == "m"
    assert wire["spec"]["profiles"][0]["modelPath"] == "/m.gguf"
    assert resources.LlamaModel.model_validate(wire) == resource
