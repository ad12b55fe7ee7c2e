"""Where the gateway's time goes: py-spy samples `llamesh serve` under one of the benchmark's loads.

    .venv/bin/python bench/hotspots.py [--mode throughput|stream] [--seconds 8] [--top 30] [--raw out.txt]

Starts `llamesh serve` in front of the fake upstream exactly as run.py does (pinned to the server CPUs, the
load generator to the first CPU), warms it up, then runs py-spy (`record --format raw`, 200 Hz, the dev
extra `py-spy`) on the gateway while load.py drives `--mode` with 32 connections. Prints the frames with
the most samples (self, and including callees), the gateway's CPU ms per 1,000 requests or per 100,000
tokens over the same window, and the raw profile's path. py-spy counts a thread that is runnable but not
running (preempted by the upstream on the same core) as busy: the psutil CPU figure is the ground truth,
the profile only says where within it the time goes; `--apart` moves the upstream to the load generator's
CPU, so that the gateway's samples are its own work. Needs ptrace rights over the child (root, or
kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

import run
import servers

_LINE = re.compile(r":\d+\)$")


def top_frames(raw: str, count: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, the `count` frames with the most self samples, the `count` with the most inclusive samples)
    from py-spy's raw output: one `frame;frame;...;frame N` line per distinct stack, the leaf last."""
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, number = line.rstrip().rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        frames = [_LINE.sub(")", frame.strip()) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            within[frame] += samples

    def ranked(counter: collections.Counter[str]) -> list[tuple[str, int]]:
        return sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:count]  # ties by name

    return total, ranked(own), ranked(within)


async def profile(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], float, Path]:
    """(the load's result, the gateway's CPU seconds over the measured window, the raw profile's path)"""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    load_cpus, server_cpus = run.cpu_split(True)
    port = servers.free_port()
    config_path, cookbook_path = servers.write_llamesh_files(workdir / "llamesh", port=port, cold_profiles=[])
    gateway = await servers.start(
        "gateway",
        servers.llamesh_argv(config_path, cookbook_path),
        url=f"http://{servers.HOST}:{port}",
        log_dir=workdir,
        env={"FAKE_UPSTREAM_TOKENS": "64"},
        cpus=server_cpus,
    )
    raw_path = args.raw or Path(tempfile.mkstemp(prefix="llamesh-hotspots-", suffix=".txt")[1])
    try:
        await servers.wait_answering(gateway, "/healthz", deadline_s=60)
        await servers.wait_answering(gateway, "/v1/chat/completions", deadline_s=120, method="POST")
        if args.apart and load_cpus is not None:  # the upstream it spawned goes to the load generator's CPU
            for child in psutil.Process(gateway.pid).children(recursive=True):
                servers.pin(child.pid, load_cpus)
        record = [spy, "record", "--pid", str(gateway.pid), "--rate", "200", "--duration", str(int(args.seconds) + 1)]
        sampler = await asyncio.create_subprocess_exec(
            *record, "--format", "raw", "--output", str(raw_path), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        window = servers.CpuWindow(gateway, lambda: [])
        load = run.LoadRunner(load_cpus)
        options = ["--model", servers.MODEL, "--concurrency", "32", "--duration", str(args.seconds), "--warmup-s", "0"]
        result = await load.run(gateway.url, args.mode, *options, window=window)
        _out, err = await sampler.communicate()
        if sampler.returncode != 0:
            raise servers.ServerError(f"py-spy failed ({sampler.returncode}): {err.decode()[-2000:]}")
    finally:
        await servers.stop(gateway)
    return result, window.server_s or 0.0, Path(raw_path)


def report(args: argparse.Namespace, result: dict[str, Any], cpu_s: float, raw_path: Path) -> None:
    total, own, within = top_frames(raw_path.read_text(), args.top)
    if args.mode == "throughput":
        print(f"{result['requests_per_s']:,.0f} req/s; gateway CPU {cpu_s * 1e6 / result['requests']:,.1f} ms/1,000")
    else:
        print(f"{result['tokens_per_s']:,.0f} tokens/s; gateway CPU {cpu_s * 1e8 / result['tokens']:,.0f} ms/100,000")
    print(f"{total} samples; self:")
    for frame, samples in own:
        print(f"{100 * samples / total:6.1f}%  {frame}")
    print("including callees:")
    for frame, samples in within:
        print(f"{100 * samples / total:6.1f}%  {frame}")
    print(f"raw profile: {raw_path}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=("throughput", "stream"), default="throughput")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--raw", type=Path, default=None, help="where py-spy's raw profile goes")
    parser.add_argument(
        "--apart",
        action="store_true",
        help="the gateway alone on its CPU (its upstream with the load generator): no sample is the gateway "
        "waiting for a core its upstream holds",
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="llamesh-profile-"))
    try:
        result, cpu_s, raw_path = asyncio.run(profile(args, workdir))
    except servers.ServerError as exc:
        print(f"error: {exc}\n(work folder kept: {workdir})", file=sys.stderr)
        return 2
    report(args, result, cpu_s, raw_path)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
