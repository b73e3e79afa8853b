"""Answer a benchmark with any OpenAI-compatible endpoint, turn after turn.

Follow-up turns see the model's own earlier answers, as in MT-bench. Sampling temperature goes
by category (MT-bench's choice: creative categories sample, factual ones are near-greedy).
Output is FastChat's model-answer JSONL, one line per finished question; a rerun skips the
questions already answered, so an interrupted run (a preempted spot VM) resumes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.client import ChatClient, Endpoint, RequestFailed
from vicuna_sky.eval.progress import run_all
from vicuna_sky.eval.questions import Question, read_answer
from vicuna_sky.eval.records import JsonlLog

TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1}
"""Per-category sampling temperature; every other category is answered greedily (0)."""


def temperature_for(category: str) -> float:
    return TEMPERATURES.get(category, 0.0)


@dataclass
class AnswerConfig:
    output: Path
    """JSONL of answers (FastChat's model-answer format); appended to, never rewritten."""
    max_tokens: int = 1024
    """Most new tokens per turn."""
    temperature: float | None = None
    """One temperature for every category instead of the per-category table."""
    concurrency: int = 8
    """Questions in flight at once."""
    system: str | None = None
    """A system message before the first turn (None: the endpoint's default)."""
    retries: int = 5
    backoff: float = 1.0
    """Seconds before the first retry; doubled on each further one."""
    progress: bool = True


@dataclass
class AnswerSummary:
    answered: int = 0
    skipped: int = 0
    """Already in the output from an earlier run."""
    failed: dict[int | str, str] = field(default_factory=dict)
    """question_id -> why; these are not written, so a rerun tries them again."""


async def _answer(client: ChatClient, question: Question, config: AnswerConfig) -> list[str]:
    temperature = temperature_for(question.category)
    if config.temperature is not None:
        temperature = config.temperature
    messages = [{"role": "system", "content": config.system}] if config.system else []
    answers = []
    for turn in question.turns:
        messages.append({"role": "user", "content": turn})
        reply = await client.chat(messages, temperature=temperature, max_tokens=config.max_tokens)
        messages.append({"role": "assistant", "content": reply})
        answers.append(reply)
    return answers


def answered_by(log: JsonlLog, model: str) -> set[str]:
    """The question ids (as text) already answered in `log`, which must be `model`'s."""
    done = set()
    for number, record in enumerate(log.records(), 1):
        author, qid, _ = read_answer(record, f"{log.path}:{number}")
        if author != model:
            raise VicunaSkyError(
                f"{log.path} holds answers of {author!r}, not {model!r}: "
                "use one output file per model"
            )
        done.add(qid)
    return done


async def answer_questions(
    questions: list[Question], endpoint: Endpoint, config: AnswerConfig
) -> AnswerSummary:
    log = JsonlLog(config.output)
    done = answered_by(log, endpoint.model)
    todo = [q for q in questions if q.key not in done]
    summary = AnswerSummary(skipped=len(questions) - len(todo))

    async with ChatClient(
        endpoint, retries=config.retries, backoff=config.backoff, concurrency=config.concurrency
    ) as client:

        async def work(question: Question) -> None:
            try:
                turns = await _answer(client, question, config)
            except RequestFailed as e:
                summary.failed[question.question_id] = str(e)
                return
            log.append(
                {
                    "question_id": question.question_id,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": endpoint.model,
                    "choices": [{"index": 0, "turns": turns}],
                    "tstamp": time.time(),
                }
            )
            summary.answered += 1

        await run_all(
            todo,
            work,
            concurrency=config.concurrency,
            description=f"answers from {endpoint.model}",
            show=config.progress,
        )
    return summary


def answer(questions: list[Question], endpoint: Endpoint, config: AnswerConfig) -> AnswerSummary:
    return asyncio.run(answer_questions(questions, endpoint, config))
