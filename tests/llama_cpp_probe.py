"""What llama.cpp itself makes of a GGUF file, run by the python of a venv with llama-cpp-python
(`make llama-cpp` builds `.venv-llama-cpp`); tests/test_llama_cpp.py runs it and compares the
answers with transformers. It imports nothing of this project.

    python tests/llama_cpp_probe.py REQUEST.json RESULT.json [LOGITS.npy]

REQUEST: {"gguf": path, "texts": [...], "prompt_ids": [...], "greedy_tokens": N,
          "chat": [messages], "chat_max_tokens": N, "kv_cache": "f32" or "f16" (llama.cpp's
          default)}; every key but "gguf" is optional.
RESULT:  {"log_problems": [warnings and errors llama.cpp logged while loading],
          "tokens": [ids per text: no BOS, special tokens parsed],
          "greedy": [N argmax continuations of prompt_ids],
          "chat": {"format", "prompt", "prompt_ids", "text", "finish_reason", "completion_ids"}}
LOGITS:  float32 [len(prompt_ids), vocab], every position's logits for prompt_ids.
"""

from __future__ import annotations

import ctypes
import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import llama_chat_format

# ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message).
_WARN, _ERROR, _CONT = 3, 4, 5
problems: list[str] = []
_last_level = 0


@llama_cpp.llama_log_callback
def _record(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    level = _last_level if level == _CONT else level
    _last_level = level
    if level in (_WARN, _ERROR):
        problems.append(text.decode("utf-8", "replace"))


def _text(llm: llama_cpp.Llama, token: int) -> str:
    return llm._model.token_get_text(token) if token != -1 else ""


def main(request_path: str, result_path: str, logits_path: str | None = None) -> None:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    llama_cpp.llama_log_set(_record, ctypes.c_void_p(0))
    prompt = request.get("prompt_ids", [])
    llm = llama_cpp.Llama(
        request["gguf"],
        n_ctx=max(512, len(prompt) + request.get("greedy_tokens", 0) + 8),
        n_threads=1,
        logits_all=True,
        seed=0,
        # KV cache in f32 when asked, to compare weights without llama.cpp's default f16 cache.
        **({"type_k": 0, "type_v": 0} if request.get("kv_cache") == "f32" else {}),
        verbose=False,
    )
    result: dict = {"log_problems": "".join(problems).splitlines()}
    result["tokens"] = [
        llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        for text in request.get("texts", [])
    ]
    if prompt:
        llm.reset()
        llm.eval(prompt)
        if logits_path:
            np.save(logits_path, np.asarray(llm.scores[: len(prompt)], dtype=np.float32))
        greedy = []
        for _ in range(request.get("greedy_tokens", 0)):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(token)
            llm.eval([token])
        result["greedy"] = greedy
    if request.get("chat"):
        messages = request["chat"]
        template = llm.metadata.get("tokenizer.chat_template")
        rendered = None
        if template:  # rendered as llama-cpp-python's handler for the stored template does
            formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=_text(llm, llm.token_eos()),
                bos_token=_text(llm, llm.token_bos()),
            )
            rendered = formatter(messages=messages).prompt
        llm.reset()
        answer = llm.create_chat_completion(
            messages=messages, max_tokens=request.get("chat_max_tokens", 64), temperature=0.0
        )
        choice = answer["choices"][0]
        result["chat"] = {
            "format": llm.chat_format,
            "prompt": rendered,
            "prompt_ids": llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
            if rendered is not None
            else None,
            "text": choice["message"]["content"],
            "finish_reason": choice["finish_reason"],
            "completion_tokens": answer["usage"]["completion_tokens"],
        }
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
