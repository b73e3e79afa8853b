"""Benchmark: requests/s and added latency through our controller vs FastChat's, and the cost of
each proxy layer over its backend, ours and SkyServe's load balancer, TLS off and on; same
machine, same run.

Every side serves one backend with an instant fixed answer (ours: `--backend echo`; FastChat's:
its BaseModelWorker with the model replaced, benchmarks/fastchat_echo_worker.py; SkyServe's: an
OpenAI-speaking echo replica, benchmarks/skyserve_lb.py), and takes the same non-streamed chat
completions, `--concurrency` at a time (aiohttp). Added latency is the p50 through the proxy
minus the p50 of calling its backend directly, one request at a time (httpx), the two taken in
turns. FastChat (fschat 0.2.36) runs from its own venv, benchmarks/.venv-fastchat (created on
first use); SkyServe's load balancer is skypilot's own (0.14.1, in .venv).

Proxy layers, "TLS on": clients reach the proxy over https (ours: the client port with a
certificate, the workers over https as on a cloud; SkyServe: its load balancer with service.tls,
which reaches replicas over http only). The ratio is the proxy's requests/s over its backend's.

    .venv/bin/python benchmarks/serve_throughput.py [--requests 2000] [--concurrency 16]
                                                    [--layers-only]
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
sys.path.insert(0, str(HERE))
from vicuna_sky.ports import free_port  # noqa: E402
from vicuna_sky.serve.local_fleet import LocalFleet  # noqa: E402

FASTCHAT_PY = HERE / ".venv-fastchat" / "bin" / "python"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


async def load(
    url: str, body: dict, n: int, concurrency: int, headers: dict | None = None
) -> tuple[float, list[float]]:
    # aiohttp rather than httpx: the load generator shares the machine's cores with the servers,
    # and aiohttp's client costs a fraction of httpx's CPU per request. Certificates are not
    # checked: the load generator measures, it trusts nothing it is sent.
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        queue = iter(range(n))

        async def runner() -> None:
            for _ in queue:
                start = time.perf_counter()
                async with client.post(url, json=body, headers=headers) as r:
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
    with httpx.Client(timeout=30, verify=False) as client:
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


Side = tuple[str, dict, dict | None]
"""(url, body, headers) of one side of a comparison."""


def layer(name: str, direct: Side, via: Side, args: argparse.Namespace) -> tuple[str, float, float]:
    """One proxy over its backend: requests/s of each at the same concurrency, and the serial
    p50 the proxy adds; printed, and (name, ratio, added) returned."""
    direct_p50, via_p50 = serial_p50s(direct, via)
    backend = asyncio.run(load(direct[0], direct[1], args.requests, args.concurrency, direct[2]))
    proxy = asyncio.run(load(via[0], via[1], args.requests, args.concurrency, via[2]))
    ratio = proxy[0] / backend[0]
    added = max(0.0, via_p50 - direct_p50)
    print(
        f"{name:<26} backend {backend[0]:>7,.0f} req/s, through it {proxy[0]:>7,.0f} req/s "
        f"({ratio:6.1%});  serial p50 {direct_p50 * 1e3:5.2f} -> {via_p50 * 1e3:5.2f} ms "
        f"(+{added * 1e3:.2f} ms)",
        flush=True,
    )
    return name, ratio, added


def proxy_layers(args: argparse.Namespace, tmp: Path) -> None:
    """Our controller over its echo worker, and SkyServe's load balancer over its echo replica,
    TLS off and on."""
    from skyserve_lb import SkyServeLB

    from vicuna_sky.serve.tls import make_certificate

    direct_body = {"model": "echo", "messages": BODY["messages"], "max_tokens": 16}
    direct_body["stream"] = False  # what the controller sends a worker for such a request
    results = []
    for tls in (False, True):
        how = "TLS on" if tls else "TLS off"
        with LocalFleet(tmp / f"layer-{tls}", tls=tls, client_tls=tls) as fleet:
            fleet.start_controller()
            worker = fleet.start_worker("echo", "echo", "echo", "--max-concurrency", "1000")
            fleet.wait_workers({worker})
            fleet_secret = {"Authorization": f"Bearer {fleet.secret}"}
            results.append(
                layer(
                    f"vicuna-sky controller, {how}",
                    (f"{worker}/generate", direct_body, fleet_secret),
                    (f"{fleet.url}/v1/chat/completions", BODY, None),
                    args,
                )
            )
        pem = None
        if tls:
            pem = tmp / "lb.pem"
            pem.write_text(make_certificate("load balancer"))
        with SkyServeLB(tmp, free_port, pem) as lb:
            results.append(
                layer(
                    f"SkyServe LB, {how}",
                    (f"{lb.replica}/v1/chat/completions", BODY, None),
                    (f"{lb.url}/v1/chat/completions", BODY, None),
                    args,
                )
            )
    for tls in ("TLS off", "TLS on"):
        ours = next(r for r in results if r[0].startswith("vicuna-sky") and r[0].endswith(tls))
        theirs = next(r for r in results if r[0].startswith("SkyServe") and r[0].endswith(tls))
        print(
            f"{tls}: our controller keeps {ours[1]:.1%} of its backend's throughput, SkyServe's "
            f"load balancer {theirs[1]:.1%}; added p50 {ours[2] * 1e3:.2f} ms against "
            f"{theirs[2] * 1e3:.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--layers-only", action="store_true", help="skip the FastChat comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proxy_layers(args, Path(tmp))
    if args.layers_only:
        return
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
