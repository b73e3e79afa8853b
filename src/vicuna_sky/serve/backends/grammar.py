"""Constrained decoding for the `hf` backend: a JSON schema the answer must follow, token by token.

The grammar library is llguidance (guidance-ai; one of vLLM's structured-output backends). Of the
three candidates it is the one that installs as a small self-contained wheel with no torch
dependency and computes a token mask in microseconds on a CPU: xgrammar's wheel pulls triton and
apache-tvm-ffi (hundreds of MB, for GPU kernels a CPU worker never runs), and outlines builds an
index per schema up front, which costs seconds for the schemas tools produce. The mask is applied
here from llguidance's bitmask (its own torch helper is a torch.compile kernel, minutes of warm-up
on a CPU for nothing).

Whitespace inside the JSON is compact: a model, a small one above all, free to write whitespace
can fill its whole token budget with it and never close the object.
"""

from __future__ import annotations

from typing import Any

from vicuna_sky.serve.protocol import ApiError


def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """The model's tokenizer as llguidance reads it (made once per backend: about a second for a
    large vocabulary)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)


def compile_schema(schema: dict, ll_tokenizer: Any) -> Any:
    """An llguidance matcher for `schema`; a schema it cannot compile is the client's 400."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False}
        )
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"the JSON schema cannot be used: {e}", code="invalid_schema") from None
    if matcher.is_error():
        raise ApiError(
            400, f"the JSON schema cannot be used: {matcher.get_error()}", code="invalid_schema"
        )
    return matcher


class SchemaLogits:
    """A transformers logits processor that allows only the tokens that keep the answer valid
    JSON for the schema (and end-of-sequence once it is whole). Place it before temperature and
    top-p: they then choose among allowed tokens only."""

    def __init__(self, matcher: Any, vocab_size: int, prefix_ids: list[int] | None = None) -> None:
        import torch

        self.torch, self.matcher, self.vocab_size = torch, matcher, vocab_size
        self.bits = torch.arange(32, dtype=torch.int32)
        self.started = False
        if prefix_ids and not matcher.consume_tokens(prefix_ids):
            raise ApiError(500, "the text already sent does not follow the schema", "server_error")

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self.torch
        if self.started:  # the token chosen at the previous step
            self.matcher.consume_token(int(input_ids[0, -1]))
        self.started = True
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        allowed = ((words[:, None] >> self.bits) & 1).flatten().bool()
        width = scores.shape[-1]
        allowed = allowed[:width]
        if allowed.shape[0] < width:
            allowed = torch.cat([allowed, allowed.new_zeros(width - allowed.shape[0])])
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))
