"""A FastChat model worker with an instant fixed answer, run inside the FastChat venv by
serve_throughput.py: the peer of our `--backend echo` worker. Uses FastChat's own
BaseModelWorker app; only the model is replaced."""

import argparse
import json
import uuid
from collections.abc import Iterator

import uvicorn
from fastchat.conversation import get_conv_template
from fastchat.serve import base_model_worker as bmw

USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


class EchoWorker(bmw.BaseModelWorker):
    def make_conv_template(
        self, conv_template: str | None = None, model_path: str | None = None
    ) -> object:
        return get_conv_template("vicuna_v1.1")  # no torch/transformers needed

    def count_token(self, params: dict) -> dict:
        return {"count": len(params["prompt"].split()), "error_code": 0}

    def generate_stream_gate(self, params: dict) -> Iterator[bytes]:
        out = {"text": "echo", "error_code": 0, "usage": USAGE, "finish_reason": "stop"}
        yield json.dumps(out).encode() + b"\0"

    def generate_gate(self, params: dict) -> dict:
        return {"text": "echo", "error_code": 0, "usage": USAGE, "finish_reason": "stop"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--controller-address", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    address = f"http://127.0.0.1:{args.port}"
    worker = EchoWorker(
        args.controller_address,
        address,
        uuid.uuid4().hex[:8],
        "echo",
        ["echo"],
        limit_worker_concurrency=1000,
        conv_template="vicuna_v1.1",
    )
    bmw.worker = worker
    worker.context_len = 4096
    worker.init_heart_beat()
    uvicorn.run(bmw.app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
