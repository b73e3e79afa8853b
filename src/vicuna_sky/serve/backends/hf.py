"""`hf`: a transformers causal LM on CPU or GPU, prompting through the data pipeline's templates."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from vicuna_sky.serve.backends import (
    Finish,
    Started,
    answer_limit,
    check_context_length,
    check_vocab,
    cut_at_stop,
    prompt_token_ids,
    render_prompt,
    sampling,
)
from vicuna_sky.serve.protocol import ApiError, GenerateRequest


class _Cancelled:
    """A transformers stopping criterion that ends generation once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: object, scores: object, **kwargs: object) -> bool:
        return self.event.is_set()


class HFBackend:
    """A transformers causal LM; generation runs in a thread and streams through a queue."""

    def __init__(self, model_path: str, template: str = "vicuna_v1.1") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vicuna_sky.data.conversation import get_template

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model.to(self.device).eval()
        self.template = get_template(template, self.tokenizer)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(self.model.config.vocab_size)
        self._ll_tokenizer: object | None = None
        self._ll_tokenizer_lock = threading.Lock()
        self.last_thread: threading.Thread | None = None
        """The most recent generation thread (tests check that it stops when told)."""

    def count_tokens(self, text: str, special: bool = True) -> int:
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    async def generate(self, request: GenerateRequest) -> AsyncIterator[str | Started | Finish]:
        from transformers import TextIteratorStreamer

        if request.guided_choice:
            async for piece in self._guided(request):
                yield piece
            return
        # Rendering and tokenizing a long prompt takes a while: off the event loop, which must
        # keep answering heartbeats and other requests meanwhile.
        ids = await asyncio.to_thread(prompt_token_ids, self.template, self.tokenizer, request)
        check_vocab(ids, self.vocab_size)
        n = len(ids)
        limit = answer_limit(self.context_length, n, request.max_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sample = sampling(request.temperature)
        cancel = threading.Event()
        input_ids = self.torch.tensor([ids], device=self.device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=self.torch.ones_like(input_ids),
            streamer=streamer,
            max_new_tokens=limit,
            do_sample=sample,
            pad_token_id=self.tokenizer.eos_token_id,
            stopping_criteria=[_Cancelled(cancel)],
        )
        if request.json_schema is not None:
            kwargs["logits_processor"] = await asyncio.to_thread(self._constrained, request, sample)
            kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        elif sample:
            kwargs |= {"temperature": request.temperature, "top_p": request.top_p}
        if request.ignore_eos and request.json_schema is None:
            kwargs["min_new_tokens"] = limit  # the end-of-sequence token is never chosen
        if request.seed is not None:
            self.torch.manual_seed(request.seed % 2**63)  # torch takes no negative seeds
        result: dict[str, object] = {}
        thread = threading.Thread(target=self._run, args=(kwargs, result), daemon=True)
        thread.start()
        # The template's end-of-turn strings end the answer as end-of-sequence does: not with
        # ignore_eos.
        stops = request.stop + ([] if request.ignore_eos else [s for s in self.template.stop if s])
        sent = ""
        try:
            yield Started(n)  # after the thread starts: a reader gone now still stops it
            while True:
                piece = await asyncio.to_thread(next, streamer, None)
                if piece is None:
                    break
                candidate, stopped = cut_at_stop(sent + piece, stops)
                if len(candidate) > len(sent):
                    yield candidate[len(sent) :]
                    sent = candidate
                if stopped:
                    yield Finish("stop", prompt_tokens=n)
                    return
            # The model ended the answer itself, or ran into max_tokens: its output says which.
            await asyncio.to_thread(thread.join)
            if "error" in result:
                raise result["error"]
            tokens = result.get("new_tokens", 0)
            yield Finish("length" if tokens >= limit else "stop", tokens, n)
        finally:
            # A stop string, or a client that went away: the model stops at its next token
            # instead of running on to max_tokens for nobody.
            cancel.set()
            self.last_thread = thread

    async def _guided(self, request: GenerateRequest) -> AsyncIterator[str | Started | Finish]:
        """vLLM's `guided_choice`: the allowed string the model finds most likely. A
        continuation after a failover keeps to the choices that start with the text sent."""
        choices = [c for c in request.guided_choice if c.startswith(request.prefix)]
        if not choices:
            raise ApiError(400, "no guided_choice string continues the text already sent")
        if isinstance(request.prompt, list):
            raise ApiError(400, "guided_choice takes a text prompt, not token ids")
        whole = request.model_copy(update={"prefix": ""})
        rendered = await asyncio.to_thread(render_prompt, self.template, whole)
        best = await asyncio.to_thread(self.most_likely, *rendered, choices)
        yield best[len(request.prefix) :]
        prompt, has_bos = rendered
        yield Finish("stop", len(self._choice_ids(best)), self.count_tokens(prompt, not has_bos))

    def most_likely(self, prompt: str, has_bos: bool, choices: list[str]) -> str:
        """The choice with the highest log-likelihood (summed over its tokens) after `prompt`.
        The prompt runs once; each choice is scored on its KV cache, cropped back after it."""
        torch = self.torch
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not has_bos)
        ids = ids["input_ids"].to(self.device)
        n = ids.shape[1]
        check_context_length(self.context_length, n, self._longest(choices))
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True)
            cache, first = out.past_key_values, torch.log_softmax(out.logits[0, -1].float(), -1)
            scores = []
            for choice in choices:
                tokens = self._choice_ids(choice).to(self.device)
                score = first[tokens[0]]
                if len(tokens) > 1:
                    logits = self.model(
                        input_ids=tokens[None, :-1], past_key_values=cache, use_cache=True
                    ).logits[0]
                    logp = torch.log_softmax(logits.float(), -1)
                    score = score + logp.gather(1, tokens[1:, None]).sum()
                    cache.crop(n)
                scores.append(float(score))
        return choices[max(range(len(choices)), key=scores.__getitem__)]

    def _choice_ids(self, choice: str) -> object:
        return self.tokenizer(choice, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    def _longest(self, choices: list[str]) -> int:
        return max(len(self._choice_ids(c)) for c in choices)

    def _constrained(self, request: GenerateRequest, sample: bool) -> list:
        """The schema's mask first, then temperature and top-p over what it allows (transformers
        would apply its own warpers before a custom processor, and top-p could then keep only
        tokens the schema forbids)."""
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        from vicuna_sky.serve.backends.grammar import (
            SchemaLogits,
            compile_schema,
            grammar_tokenizer,
        )

        # Built once, by the first structured request (half a second for a 49K vocabulary,
        # much of it holding the GIL): the slots' threads that come meanwhile wait for it
        # rather than each build their own.
        with self._ll_tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = grammar_tokenizer(self.tokenizer, self.vocab_size)
        matcher = compile_schema(request.json_schema or {}, self._ll_tokenizer)
        prefix = self.tokenizer(request.prefix, add_special_tokens=False)["input_ids"]
        processors: list = [
            SchemaLogits(matcher, self.vocab_size, prefix if request.prefix else None)
        ]
        if sample:
            processors.append(TemperatureLogitsWarper(request.temperature))
            if request.top_p < 1.0:
                processors.append(TopPLogitsWarper(request.top_p))
        return processors

    def _run(self, kwargs: dict, result: dict[str, object]) -> None:
        """generate() in this thread; an exception is handed to the reader, and the streamer is
        ended either way, so the reader never waits for tokens that will not come."""
        try:
            with self.torch.no_grad():
                out = self.model.generate(**kwargs)
            result["new_tokens"] = out.shape[1] - kwargs["input_ids"].shape[1]
        except Exception as e:
            result["error"] = e
            kwargs["streamer"].end()

    async def embed(self, texts: list[str | list[int]]) -> list[list[float]]:
        for x in texts:
            if isinstance(x, list):
                check_vocab(x, self.vocab_size)

        def run() -> list[list[float]]:
            out = []
            with self.torch.no_grad():
                for text in texts:
                    if isinstance(text, list):  # token ids, as given
                        ids = self.torch.tensor([text], device=self.device)
                    else:
                        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
                    hidden = self.model(
                        input_ids=ids.to(self.device), output_hidden_states=True
                    ).hidden_states[-1]
                    vector = hidden[0].mean(dim=0)
                    out.append((vector / vector.norm()).float().cpu().tolist())
            return out

        return await asyncio.to_thread(run)
