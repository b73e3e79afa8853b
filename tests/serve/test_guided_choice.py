"""guided_choice (vLLM's request extension) on the hf backend: the answer is the allowed string
the model finds most likely, through the real fleet and the official openai client."""

import asyncio

import openai
import pytest
import torch

from vicuna_sky.serve.protocol import ChatMessage, GenerateRequest

PROMPTS = ["Rate the answer.", "Which is better, A or B?", "hello", "Write a poem about GPUs"]
CHOICES = ["[[A]]", "[[B]]", "[[C]]", "yes", "no, not at all", "7"]


def full_forward_scores(backend, prompt: str, has_bos: bool, choices: list[str]) -> list[float]:
    """Each choice's log-likelihood from one plain forward pass over prompt + choice: an
    independent check of the cached scoring."""
    tok = backend.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=not has_bos)["input_ids"]
    scores = []
    for choice in choices:
        choice_ids = tok(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + choice_ids])
        with torch.no_grad():
            logp = torch.log_softmax(backend.model(input_ids=ids).logits[0].float(), -1)
        n = len(prompt_ids)
        scores.append(sum(float(logp[n - 1 + i, t]) for i, t in enumerate(choice_ids)))
    return scores


@pytest.fixture(scope="module")
def backend(tiny_chat_model):
    from vicuna_sky.serve.backends.hf import HFBackend

    return HFBackend(str(tiny_chat_model))


def answer(backend, content: str, choices: list[str], prefix: str = "") -> str:
    request = GenerateRequest(
        model="m",
        messages=[ChatMessage(role="user", content=content)],
        guided_choice=choices,
        prefix=prefix,
    )

    async def collect() -> str:
        return "".join([d async for d in backend.generate(request) if isinstance(d, str)])

    return asyncio.run(collect())


def test_the_chosen_string_is_the_most_likely_one(backend):
    from vicuna_sky.serve.backends import render_prompt

    for content in PROMPTS:
        request = GenerateRequest(model="m", messages=[ChatMessage(role="user", content=content)])
        prompt, has_bos = render_prompt(backend.template, request)
        scores = full_forward_scores(backend, prompt, has_bos, CHOICES)
        expected = CHOICES[scores.index(max(scores))]
        assert answer(backend, content, CHOICES) == expected
        # The order of the list changes nothing.
        assert answer(backend, content, CHOICES[::-1]) == expected
        # Without the winner, the runner-up wins.
        rest = [c for c in CHOICES if c != expected]
        second = max(rest, key=lambda c: scores[CHOICES.index(c)])
        assert answer(backend, content, rest) == second
    assert answer(backend, "x", ["only"]) == "only"


def test_every_pair_of_choices_in_both_orders_picks_the_full_forward_winner(backend):
    """Issue #30 row 5: each choice is scored on the prompt's cache alone (cropped back after
    the one before); a cache left with another choice's tokens in it changes the pick of some
    pair. Every pair, both orders, every prompt, against a plain forward pass."""
    from itertools import permutations

    from vicuna_sky.serve.backends import render_prompt

    for content in PROMPTS:
        request = GenerateRequest(model="m", messages=[ChatMessage(role="user", content=content)])
        prompt, has_bos = render_prompt(backend.template, request)
        scored = full_forward_scores(backend, prompt, has_bos, CHOICES)
        scores = dict(zip(CHOICES, scored, strict=True))
        for pair in permutations(CHOICES, 2):
            if abs(scores[pair[0]] - scores[pair[1]]) < 1e-4:
                continue  # a tie within float error: either pick is right
            assert backend.most_likely(prompt, has_bos, list(pair)) == max(pair, key=scores.get)


def test_a_continuation_keeps_to_the_choices_that_start_with_the_text_sent(backend):
    assert answer(backend, "hello", ["[[A]]", "[[B]]", "no"], prefix="[[") in ("A]]", "B]]")
    assert answer(backend, "hello", ["[[A]]", "no"], prefix="n") == "o"


@pytest.fixture(scope="module")
def guided_fleet(tmp_path_factory, tiny_chat_model):
    from vicuna_sky.serve.local_fleet import LocalFleet

    with LocalFleet(tmp_path_factory.mktemp("guided"), "s") as fleet:
        fleet.start_controller()
        fleet.wait_workers({fleet.start_worker("hf", str(tiny_chat_model), "tiny")})
        yield fleet


def test_guided_choice_through_the_openai_api(guided_fleet, backend):
    client = guided_fleet.client()
    question = [{"role": "user", "content": "Which is better, A or B?"}]
    expected = answer(backend, question[0]["content"], CHOICES)
    plain = client.chat.completions.create(
        model="tiny", messages=question, extra_body={"guided_choice": CHOICES}
    )
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="tiny", messages=question, stream=True, extra_body={"guided_choice": CHOICES}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    completion = client.completions.create(
        model="tiny", prompt="The verdict is", extra_body={"guided_choice": ["A", "B"]}
    )
    assert completion.choices[0].text in ("A", "B")


@pytest.mark.parametrize("choices", [[], ["a", "a"], ["a", ""], "ab", [1, 2], ["x"] * 300])
def test_an_invalid_choice_list_is_a_400_and_the_worker_stays(guided_fleet, choices):
    client = guided_fleet.client()
    question = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="guided_choice"):
        client.chat.completions.create(
            model="tiny", messages=question, extra_body={"guided_choice": choices}
        )
    ok = client.chat.completions.create(
        model="tiny", messages=question, extra_body={"guided_choice": ["fine"]}
    )
    assert ok.choices[0].message.content == "fine"
