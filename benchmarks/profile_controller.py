"""Profile: where the controller's CPU goes per request, on the hop to an instant (echo) worker.

The controller runs in this process under cProfile (its event loop in the main thread), the echo
worker as its own process, and a load thread sends non-streamed chat completions, `--concurrency`
at a time. Prints the functions with the most cumulative and own time, per request.

    .venv/bin/python benchmarks/profile_controller.py [--requests 3000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from serve_throughput import BODY, load  # noqa: E402

from vicuna_sky.ports import free_port  # noqa: E402
from vicuna_sky.serve.auth import MAX_BODY_BYTES  # noqa: E402
from vicuna_sky.serve.controller import Controller, create_app  # noqa: E402
from vicuna_sky.serve.http_server import server_config  # noqa: E402
from vicuna_sky.serve.local_fleet import LocalFleet  # noqa: E402
from vicuna_sky.serve.registry import Registry  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--save", default=None, help="write the raw profile (pstats) here")
    args = p.parse_args()
    import uvicorn

    with tempfile.TemporaryDirectory() as tmp, LocalFleet(Path(tmp)) as fleet:
        port = free_port()
        fleet.url = fleet.worker_url = f"http://127.0.0.1:{port}"  # workers register here
        controller = Controller(Registry(None), fleet.secret, [])
        app = create_app(controller, MAX_BODY_BYTES)
        server = uvicorn.Server(server_config(app, "127.0.0.1", port))
        result: dict = {}

        def drive() -> None:
            worker = fleet.start_worker("echo", "echo", "echo", "--max-concurrency", "1000")
            fleet.wait_workers({worker})
            url = f"{fleet.url}/v1/chat/completions"
            asyncio.run(load(url, BODY, 200, args.concurrency))  # warm-up
            result["load"] = asyncio.run(load(url, BODY, args.requests, args.concurrency))
            server.should_exit = True

        profile = cProfile.Profile()
        threading.Thread(target=drive, daemon=True).start()
        profile.enable()
        server.run()
        profile.disable()
    rps, _ = result["load"]
    print(f"{args.requests} requests at c={args.concurrency}: {rps:,.0f} req/s (under cProfile)")
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    if args.save:
        stats.dump_stats(args.save)  # for snakeviz, or pstats in an interpreter


if __name__ == "__main__":
    main()
