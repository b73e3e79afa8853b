"""Judge prompts: our own wording, FastChat's names, placeholders and verdict formats.

Keeping FastChat's names and placeholders means `--judge-prompts judge_prompts.jsonl` (FastChat's
file) drops in for these, for results comparable with published MT-bench numbers. A single grade
is "[[N]]" (1-10); a pairwise verdict is "[[A]]", "[[B]]" or "[[C]]" (tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.questions import read_jsonl


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    kind: str
    """"single" or "pairwise"."""
    system: str
    template: str

    def render(self, values: dict[str, str]) -> list[dict[str, str]]:
        try:
            user = self.template.format_map(values)
        except KeyError as e:
            raise VicunaSkyError(f"judge prompt {self.name!r}: unknown placeholder {e}") from None
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


_SINGLE_VERDICT = (
    "First explain your assessment briefly. Then give a grade from 1 to 10 in exactly this "
    'form: "[[grade]]", for example "Grade: [[6]]".'
)
_PAIR_VERDICT = (
    "First compare the two briefly. Then give your verdict in exactly this form: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie.'
)
_FAIRNESS = (
    "Judge only what was asked; ignore the length of the answers, the order in which they "
    "appear and any names."
)
_GENERAL = "Weigh helpfulness, relevance, accuracy, depth, creativity and level of detail."
_MATH = (
    "Correctness comes first: compare with the reference answer and point out any mistake "
    "before anything else."
)
_LAST_TURN = "Grade the reply to the user's second message; the first exchange is context."


def _system(subject: str, *parts: str) -> str:
    return " ".join([f"You are an impartial judge of {subject}.", *parts])


def _block(title: str, body: str) -> str:
    return f"<<{title}>>\n{body}\n<<end of {title}>>"


def _dialogue(who: str, suffix: str) -> str:
    return (
        f"### User\n{{question_1}}\n\n### {who}\n{{answer{suffix}_1}}\n\n"
        f"### User\n{{question_2}}\n\n### {who}\n{{answer{suffix}_2}}"
    )


_REFERENCE_1 = _block("reference answer", "{ref_answer_1}")
_REFERENCE_2 = _block(
    "reference conversation",
    "### User\n{question_1}\n\n### Reference\n{ref_answer_1}\n\n"
    "### User\n{question_2}\n\n### Reference\n{ref_answer_2}",
)


def _builtin() -> dict[str, JudgePrompt]:
    one, two = "the answer of an AI assistant", "the answers of two AI assistants"
    single_1 = _block("question", "{question}") + "\n\n" + _block("answer", "{answer}")
    single_2 = _block("conversation", _dialogue("Assistant", ""))
    pair_1 = "\n\n".join(
        [
            _block("question", "{question}"),
            _block("assistant A", "{answer_a}"),
            _block("assistant B", "{answer_b}"),
        ]
    )
    pair_2 = "\n\n".join(
        [
            _block("conversation with assistant A", _dialogue("Assistant A", "_a")),
            _block("conversation with assistant B", _dialogue("Assistant B", "_b")),
        ]
    )
    prompts = [
        JudgePrompt("single-v1", "single", _system(one, _GENERAL, _SINGLE_VERDICT), single_1),
        JudgePrompt(
            "single-math-v1",
            "single",
            _system(one, _MATH, _SINGLE_VERDICT),
            _REFERENCE_1 + "\n\n" + single_1,
        ),
        JudgePrompt(
            "single-v1-multi-turn",
            "single",
            _system(one, _GENERAL, _LAST_TURN, _SINGLE_VERDICT),
            single_2,
        ),
        JudgePrompt(
            "single-math-v1-multi-turn",
            "single",
            _system(one, _MATH, _LAST_TURN, _SINGLE_VERDICT),
            _REFERENCE_2 + "\n\n" + single_2,
        ),
        JudgePrompt(
            "pair-v2", "pairwise", _system(two, _GENERAL, _FAIRNESS, _PAIR_VERDICT), pair_1
        ),
        JudgePrompt(
            "pair-math-v1",
            "pairwise",
            _system(two, _MATH, _FAIRNESS, _PAIR_VERDICT),
            _REFERENCE_1 + "\n\n" + pair_1,
        ),
        JudgePrompt(
            "pair-v2-multi-turn",
            "pairwise",
            _system(two, _GENERAL, _LAST_TURN, _FAIRNESS, _PAIR_VERDICT),
            pair_2,
        ),
        JudgePrompt(
            "pair-math-v1-multi-turn",
            "pairwise",
            _system(two, _MATH, _LAST_TURN, _FAIRNESS, _PAIR_VERDICT),
            _REFERENCE_2 + "\n\n" + pair_2,
        ),
    ]
    return {p.name: p for p in prompts}


BUILTIN = _builtin()


def load_prompts(path: Path | None) -> dict[str, JudgePrompt]:
    """The built-in prompts, with those named in `path` (FastChat's JSONL format) replacing them."""
    prompts = dict(BUILTIN)
    if path is None:
        return prompts
    for number, record in enumerate(read_jsonl(path), 1):
        try:
            prompt = JudgePrompt(
                record["name"], record["type"], record["system_prompt"], record["prompt_template"]
            )
        except KeyError as e:
            raise VicunaSkyError(f"{path}:{number}: judge prompt without {e}") from None
        if prompt.kind not in ("single", "pairwise"):
            raise VicunaSkyError(f"{path}:{number}: type must be single or pairwise")
        prompts[prompt.name] = prompt
    return prompts


def prompt_name(kind: str, turn: int, with_reference: bool) -> str:
    """Which prompt grades `turn` (1 or 2) of a question, as MT-bench chooses."""
    base = {
        ("single", False): "single-v1",
        ("single", True): "single-math-v1",
        ("pairwise", False): "pair-v2",
        ("pairwise", True): "pair-math-v1",
    }[kind, with_reference]
    return base + ("-multi-turn" if turn == 2 else "")
