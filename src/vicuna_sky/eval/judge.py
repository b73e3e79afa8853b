"""LLM-as-judge: single-answer grading and pairwise comparison, never interactive.

Any OpenAI-compatible model can judge. Pairwise comparisons are asked in both orders and the
verdicts combined; when the two orders disagree the pair is recorded as "inconsistent" (the
judge's position bias, counted by the report). Math, reasoning and coding questions are judged
against a reference answer when one is available. A judgment whose verdict cannot be parsed is
recorded with its `error` and text; a request that keeps failing is not recorded, so a rerun
(which skips everything already judged) tries it again.

Record formats (one JSON object per line):
- single: question_id, category, turn, model, judge, prompt, score (1-10 or null), judgment, error
- pairwise: question_id, category, turn, model_a, model_b, judge, prompt, g1_winner, g2_winner,
  winner (a model name, "tie", "inconsistent" or null), g1_judgment, g2_judgment, error.
  Game 1 shows model_a as assistant A, game 2 swaps them; winners are model names or "tie".
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.client import ChatClient, Endpoint, RequestFailed
from vicuna_sky.eval.progress import run_all
from vicuna_sky.eval.prompts import JudgePrompt, prompt_name
from vicuna_sky.eval.questions import Question, read_answer, read_jsonl
from vicuna_sky.eval.records import JsonlLog

MODES = ("single", "pairwise")
_GRADE = [re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]"), re.compile(r"\[(\d+(?:\.\d+)?)\]")]
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
# What a judge may answer when its endpoint supports guided_choice: exactly the strings the
# parsers below read, so every verdict is readable (FastChat's prompts ask for these forms).
GRADE_CHOICES = [f"[[{n}]]" for n in range(1, 11)]
VERDICT_CHOICES = ["[[A]]", "[[B]]", "[[C]]"]


@dataclass
class JudgeConfig:
    mode: str
    output: Path
    """JSONL of judgments; appended to, never rewritten."""
    baseline: str | None = None
    """pairwise: compare every model with this one (default: every pair of models)."""
    max_tokens: int = 2048
    concurrency: int = 8
    retries: int = 5
    backoff: float = 1.0
    """Seconds before the first retry; doubled on each further one."""
    judge_label: str | None = None
    """How records name the judge (default: its model name), e.g. to say it was a local model."""
    redo_failed: bool = False
    """Judge again what was recorded with an unparseable verdict."""
    guided_choice: bool = False
    """Constrain the verdict to GRADE_CHOICES / VERDICT_CHOICES (vLLM's request extension,
    which our fleet's workers honour): for judges that cannot follow the format on their own."""
    progress: bool = True


@dataclass
class JudgeSummary:
    judged: int = 0
    skipped: int = 0
    unparsed: int = 0
    """Recorded with an `error`: the judge answered without a readable verdict."""
    failed: dict[str, str] = field(default_factory=dict)
    """Requests that kept failing: not recorded, a rerun tries them again."""
    requests: int = 0


@dataclass(frozen=True)
class Job:
    question: Question
    turn: int
    models: tuple[str, ...]
    """One model (single) or (model_a, model_b) (pairwise)."""


Answers = dict[str, dict[str, list[str]]]
"""model -> question_id (as text) -> answer turns."""


def load_answers(paths: list[Path]) -> Answers:
    """Every answer in model-answer JSONL files, by model and question."""
    answers: Answers = {}
    for path in paths:
        for number, record in enumerate(read_jsonl(Path(path)), 1):
            model, qid, turns = read_answer(record, f"{path}:{number}")
            answers.setdefault(model, {})[qid] = turns
    if not answers:
        raise VicunaSkyError("no answers to judge")
    return answers


def parse_grade(text: str) -> float:
    for pattern in _GRADE:
        found = pattern.findall(text)
        if found:
            grade = float(found[-1])
            if not 1 <= grade <= 10:
                raise ValueError(f"grade {grade:g} is outside 1-10")
            return grade
    raise ValueError("no [[grade]] in the judgment")


def parse_verdict(text: str) -> str:
    found = _VERDICT.findall(text)
    if not found:
        raise ValueError("no [[A]], [[B]] or [[C]] verdict in the judgment")
    return found[-1]


def plan_jobs(
    questions: list[Question],
    answers: Answers,
    models: list[str],
    mode: str,
    baseline: str | None,
) -> list[Job]:
    for model in [*models, *([baseline] if baseline else [])]:
        if model not in answers:
            known = ", ".join(sorted(answers))
            raise VicunaSkyError(f"no answers from {model!r} (answers are from: {known})")
    if mode == "single":
        groups = [(m,) for m in models]
    elif baseline:
        groups = [(m, baseline) for m in models if m != baseline]
    else:
        groups = list(itertools.combinations(models, 2))
    if not groups:
        raise VicunaSkyError(f"nothing to compare in {mode} mode: name two models or a baseline")
    jobs = []
    for question in questions:
        for group in groups:
            if all(question.key in answers[m] for m in group):
                for turn in range(1, min(2, len(question.turns)) + 1):
                    jobs.append(Job(question, turn, group))
    if not jobs:
        raise VicunaSkyError("no question has answers from the models to judge (question_ids?)")
    return jobs


def _values(question: Question, turn: int, answer_sets: dict[str, list[str]]) -> dict[str, str]:
    q, ref = question.turns, question.reference or []
    values = {f"ref_answer_{i + 1}": r for i, r in enumerate(ref[:2])}
    if turn == 1:
        values["question"] = q[0]
    else:
        values |= {"question_1": q[0], "question_2": q[1]}
    for suffix, turns in answer_sets.items():
        padded = [*turns, "", ""]
        if turn == 1:
            values[f"answer{suffix}"] = padded[0]
        else:
            values |= {f"answer{suffix}_1": padded[0], f"answer{suffix}_2": padded[1]}
    return values


class Judge:
    def __init__(
        self,
        client: ChatClient,
        prompts: dict[str, JudgePrompt],
        answers: Answers,
        config: JudgeConfig,
    ) -> None:
        self.client, self.prompts, self.answers, self.config = client, prompts, answers, config
        self.judge = config.judge_label or client.endpoint.model

    def key(self, record: dict) -> Hashable:
        """What a record judged; a pair is the same comparison in either order."""
        try:
            if record.get("mode") != self.config.mode:
                raise KeyError("mode")
            names = ("model",) if self.config.mode == "single" else ("model_a", "model_b")
            models = tuple(sorted(str(record[n]) for n in names))
            return (str(record["question_id"]), record["turn"], models, record["judge"])
        except KeyError:
            raise VicunaSkyError(
                f"{self.config.output} holds records that are not {self.config.mode} judgments"
            ) from None

    def job_key(self, job: Job) -> Hashable:
        return (job.question.key, job.turn, tuple(sorted(job.models)), self.judge)

    def _prompt(self, job: Job) -> JudgePrompt:
        name = prompt_name(self.config.mode, job.turn, job.question.reference_for(job.turn))
        if name not in self.prompts:
            raise VicunaSkyError(f"no judge prompt named {name!r}")
        return self.prompts[name]

    async def _ask(self, prompt: JudgePrompt, values: dict[str, str]) -> str:
        extra = None
        if self.config.guided_choice:
            choices = GRADE_CHOICES if self.config.mode == "single" else VERDICT_CHOICES
            extra = {"guided_choice": choices}
        return await self.client.chat(
            prompt.render(values), temperature=0.0, max_tokens=self.config.max_tokens, extra=extra
        )

    async def single(self, job: Job) -> dict:
        (model,) = job.models
        prompt = self._prompt(job)
        answer = self.answers[model][job.question.key]
        judgment = await self._ask(prompt, _values(job.question, job.turn, {"": answer}))
        record = {"model": model, "prompt": prompt.name, "score": None, "judgment": judgment}
        try:
            record["score"] = parse_grade(judgment)
        except ValueError as e:
            record["error"] = str(e)
        return record

    async def pairwise(self, job: Job) -> dict:
        a, b = job.models
        prompt, qid = self._prompt(job), job.question.key
        first, second = self.answers[a][qid], self.answers[b][qid]
        g1, g2 = await asyncio.gather(
            self._ask(prompt, _values(job.question, job.turn, {"_a": first, "_b": second})),
            self._ask(prompt, _values(job.question, job.turn, {"_a": second, "_b": first})),
        )
        record = {"model_a": a, "model_b": b, "prompt": prompt.name}
        errors, winners = [], []
        for judgment, names in ((g1, {"A": a, "B": b}), (g2, {"A": b, "B": a})):
            try:
                winners.append(names.get(parse_verdict(judgment), "tie"))
            except ValueError as e:
                errors.append(str(e))
                winners.append(None)
        if None in winners:
            winner = None
        else:
            winner = winners[0] if winners[0] == winners[1] else "inconsistent"
        record |= {"g1_winner": winners[0], "g2_winner": winners[1], "winner": winner}
        record |= {"g1_judgment": g1, "g2_judgment": g2}
        if errors:
            record["error"] = "; ".join(dict.fromkeys(errors))
        return record

    async def run(self, jobs: list[Job]) -> JudgeSummary:
        log = JsonlLog(self.config.output)
        last = {self.key(r): r for r in log.records()}
        done = {k for k, r in last.items() if not (self.config.redo_failed and r.get("error"))}
        todo = [job for job in jobs if self.job_key(job) not in done]
        summary = JudgeSummary(skipped=len(jobs) - len(todo))
        grade = self.single if self.config.mode == "single" else self.pairwise

        async def work(job: Job) -> None:
            try:
                record = await grade(job)
            except RequestFailed as e:
                what = f"question {job.question.question_id} turn {job.turn} {'/'.join(job.models)}"
                summary.failed[what] = str(e)
                return
            log.append(
                {
                    "mode": self.config.mode,
                    "question_id": job.question.question_id,
                    "category": job.question.category,
                    "turn": job.turn,
                    **record,
                    "judge": self.judge,
                    "error": record.get("error"),
                    "tstamp": time.time(),
                }
            )
            summary.judged += 1
            summary.unparsed += bool(record.get("error"))

        await run_all(
            todo,
            work,
            concurrency=self.config.concurrency,
            description=f"{self.config.mode} judgments by {self.judge}",
            show=self.config.progress,
        )
        summary.requests = self.client.attempts
        return summary


def judge(
    questions: list[Question],
    answers: Answers,
    models: list[str],
    endpoint: Endpoint,
    prompts: dict[str, JudgePrompt],
    config: JudgeConfig,
) -> JudgeSummary:
    if config.mode not in MODES:
        raise VicunaSkyError(f"mode must be single or pairwise, not {config.mode!r}")
    jobs = plan_jobs(questions, answers, models, config.mode, config.baseline)

    async def go() -> JudgeSummary:
        async with ChatClient(
            endpoint,
            retries=config.retries,
            backoff=config.backoff,
            concurrency=2 * config.concurrency,
        ) as client:
            return await Judge(client, prompts, answers, config).run(jobs)

    return asyncio.run(go())
