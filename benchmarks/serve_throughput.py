"""Benchmark: requests/s and added latency through our controller vs FastChat's, same machine.

Both sides serve one worker with an instant fixed answer (ours: `--backend echo`; FastChat's:
its BaseModelWorker with the model replaced, benchmarks/fastchat_echo_worker.py), and take the
same non-streamed chat completions, `--concurrency` at a time (aiohttp). Added latency is the p50
through the OpenAI endpoint minus the p50 of calling the worker directly, one request at a time
(httpx), the two taken in turns. FastChat (fschat 0.2.36) runs from its own venv,
benchmarks/.venv-fastchat (created on first use).

    .venv/bin/python benchmarks/serve_throughput.py [--requests 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from vicuna_sky.launch.procs import free_port  # noqa: E402
from vicuna_sky.serve.local_fleet import LocalFleet  # noqa: E402

FASTCHAT_PY = HERE / ".venv-fastchat" / "bin" / "python"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


async def load(url: str, body: dict, n: int, concurrency: int) -> tuple[float, list[float]]:
    # aiohttp rather than httpx: the load generator shares the machine's cores with the servers,
    # and aiohttp's client costs a fraction of httpx's CPU per request.
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        queue = iter(range(n))

        async def runner() -> None:
            for _ in queue:
                start = time.perf_counter()
                async with client.post(url, json=body) as r:
                    r.raise_for_status()
                    await r.read()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(runner() for _ in range(concurrency)))
        return n / (time.perf_counter() - start), latencies


def serial_p50s(
    direct: tuple[str, dict, dict | None],
    via: tuple[str, dict, dict | None],
    rounds: int = 6,
    n: int = 100,
) -> tuple[float, float]:
    """p50 of one request at a time, straight to the worker and through the API: (url, body,
    headers) each. The two are taken in turns, `n` requests a turn, so that a machine that
    speeds up or slows down meanwhile (a VM's neighbours, its CPU clock) moves both alike."""
    times: dict[int, list[float]] = {0: [], 1: []}
    with httpx.Client(timeout=30) as client:
        for _ in range(rounds):
            for side, (url, body, headers) in enumerate((direct, via)):
                for _ in range(n):
                    start = time.perf_counter()
                    client.post(url, json=body, headers=headers).raise_for_status()
                    times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(name: str, rps: float, lat: list[float], serial: float, direct: float) -> None:
    lat = sorted(lat)
    p99 = lat[int(0.99 * (len(lat) - 1))]
    print(
        f"{name:<10} {rps:>9,.0f} req/s  p50 {statistics.median(lat) * 1e3:6.2f} ms  "
        f"p99 {p99 * 1e3:6.2f} ms under load;  serial p50 {serial * 1e3:5.2f} ms, "
        f"added over the worker {max(0.0, serial - direct) * 1e3:5.2f} ms"
    )


def wait(url: str, timeout: float = 60) -> None:
    LocalFleet.wait_http(url, timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if not FASTCHAT_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(HERE / ".venv-fastchat")], check=True)
    subprocess.run(
        [str(FASTCHAT_PY), "-m", "pip", "install", "-q", "fschat==0.2.36"],
        check=True,
        capture_output=True,
    )
    with tempfile.TemporaryDirectory() as tmp, LocalFleet(Path(tmp) / "ours") as fleet:
        fleet.start_controller()
        worker = fleet.start_worker("echo", "echo", "echo", "--max-concurrency", "1000")
        fleet.wait_workers({worker})
        # What the controller sends a worker for a non-streamed request.
        direct_body = {
            "model": "echo",
            "messages": BODY["messages"],
            "max_tokens": 16,
            "stream": False,
        }
        fleet_secret = {"Authorization": f"Bearer {fleet.secret}"}  # the worker's own key
        ours_direct, ours_serial = serial_p50s(
            (f"{worker}/generate", direct_body, fleet_secret),
            (f"{fleet.url}/v1/chat/completions", BODY, None),
        )
        cpu_before = cpu_seconds(fleet.controller.proc.pid)
        ours = asyncio.run(
            load(f"{fleet.url}/v1/chat/completions", BODY, args.requests, args.concurrency)
        )
        controller_cpu = (cpu_seconds(fleet.controller.proc.pid) - cpu_before) / args.requests

        ports = [free_port() for _ in range(3)]
        controller = f"http://127.0.0.1:{ports[0]}"
        logs = Path(tmp)
        procs = [
            subprocess.Popen(
                [
                    str(FASTCHAT_PY),
                    "-m",
                    "fastchat.serve.controller",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports[0]),
                ],
                cwd=tmp,
                stdout=(logs / "fc-controller.log").open("w"),
                stderr=subprocess.STDOUT,
            ),
        ]
        try:
            wait(f"{controller}/list_models")
            procs.append(
                subprocess.Popen(
                    [
                        str(FASTCHAT_PY),
                        str(HERE / "fastchat_echo_worker.py"),
                        "--controller-address",
                        controller,
                        "--port",
                        str(ports[1]),
                    ],
                    cwd=tmp,
                    stdout=(logs / "fc-worker.log").open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
            procs.append(
                subprocess.Popen(
                    [
                        str(FASTCHAT_PY),
                        "-m",
                        "fastchat.serve.openai_api_server",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(ports[2]),
                        "--controller-address",
                        controller,
                    ],
                    cwd=tmp,
                    stdout=(logs / "fc-api.log").open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
            api = f"http://127.0.0.1:{ports[2]}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{api}/v1/models", timeout=2).json().get("data"):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            fc_worker = f"http://127.0.0.1:{ports[1]}/worker_generate"
            fc_direct, fc_serial = serial_p50s(
                (fc_worker, {"model": "echo", "prompt": "hello", "max_new_tokens": 16}, None),
                (f"{api}/v1/chat/completions", BODY, None),
            )
            theirs = asyncio.run(
                load(f"{api}/v1/chat/completions", BODY, args.requests, args.concurrency)
            )
        finally:
            for p in procs:
                p.kill()
                p.wait()
    print(
        f"{args.requests} non-streamed chat completions, {args.concurrency} concurrent, "
        "instant worker, 127.0.0.1"
    )
    report("vicuna-sky", *ours, ours_serial, ours_direct)
    report("FastChat", *theirs, fc_serial, fc_direct)
    print(f"throughput: {ours[0] / theirs[0]:.1f}x FastChat's")
    # CPU, not time: the figure that moves least with what else the machine runs.
    print(f"our controller: {controller_cpu * 1e6:.0f} us of CPU (user + system) per request")


if __name__ == "__main__":
    main()
