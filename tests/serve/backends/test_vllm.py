"""What the vLLM backend makes of the engine's own words, without an engine: its finish reasons.
The engine itself runs in tests/serve/test_vllm_cpu.py (a venv with vLLM)."""

import pytest

from vicuna_sky.serve.backends.vllm import finish_reason


def test_finish_reasons_are_mapped_one_to_one_and_a_failed_request_is_no_stop():
    assert finish_reason("stop") == "stop"
    assert finish_reason("length") == "length"
    assert finish_reason("repetition") == "stop"  # the engine's detector ended the answer
    for failed in ("abort", "error", None, "something new"):
        with pytest.raises(RuntimeError, match="the engine ended the request"):
            finish_reason(failed)
