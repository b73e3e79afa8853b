"""The backend a worker's `--backend` names, imported only when chosen (vllm and transformers
are heavy, and a machine has only the one it serves with)."""

from __future__ import annotations

from vicuna_sky.serve.backends import Backend
from vicuna_sky.serve.protocol import ApiError


def load_backend(kind: str, model_path: str, template: str) -> Backend:
    if kind == "echo":
        from vicuna_sky.serve.backends.echo import EchoBackend

        return EchoBackend()
    if kind == "hf":
        from vicuna_sky.serve.backends.hf import HFBackend

        return HFBackend(model_path, template)
    if kind == "vllm":
        from vicuna_sky.serve.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, template)
    raise ApiError(400, f"unknown backend {kind!r}: hf, vllm or echo")
