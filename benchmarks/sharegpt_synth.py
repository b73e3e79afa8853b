"""Synthetic ShareGPT HTML conversations shaped like ChatGPT page exports (seeded).

Answers are rendered HTML as the 2023 pages held them: prose paragraphs, code blocks inside the
header-with-Copy-button wrapper, lists, tables, headings, regenerate counters and "CopyN chars"
widgets; questions are plain text. A few samples repeat or mention blocked words, as real dumps do.
"""

from __future__ import annotations

import html
import random

WORDS = (
    "spot",
    "instance",
    "checkpoint",
    "bucket",
    "region",
    "zone",
    "preempted",
    "resume",
    "model",
    "token",
    "batch",
    "gradient",
    "learning",
    "rate",
    "schedule",
    "warmup",
    "cluster",
    "node",
    "accelerator",
    "price",
    "budget",
    "latency",
    "throughput",
    "request",
    "worker",
    "controller",
    "stream",
    "answer",
    "question",
    "python",
    "function",
    "list",
    "value",
    "config",
)
LANGS = ["python", "bash", "javascript", "yaml", "sql", "rust"]
CODE = {
    "python": "def {a}({b}):\n    return [{b} * 2 for {b} in range(10)]\n\n\nprint({a}(3))\n",
    "bash": "pip install -U {a}\nexport {b}=1\npython -m {a} --{b}\n",
    "javascript": "const {a} = ({b}) => {{\n  return {b}.map((x) => x * 2);\n}};\n",
    "yaml": "resources:\n  accelerators: A100:8\n  use_spot: true\n{a}: {b}\n",
    "sql": "SELECT {a}, COUNT(*)\nFROM {b}\nGROUP BY {a};\n",
    "rust": "fn {a}({b}: u32) -> u32 {{\n    {b} * 2\n}}\n",
}


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def code_block(rng: random.Random) -> str:
    lang = rng.choice(LANGS)
    body = CODE[lang].format(a=rng.choice(WORDS), b=rng.choice(WORDS))
    spans = html.escape(body)
    return (
        '<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative '
        'text-gray-200 bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">'
        f'{lang}</span><button class="flex ml-auto gap-2"><svg stroke="currentColor" fill="none" '
        'height="1em" width="1em"><path d="M16 4h2a2 2 0 0 1 2 2v14"></path></svg>Copy code'
        '</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs '
        f'language-{lang}">{spans}</code></div></div></pre>'
    )


def answer(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(2, 7)):
        kind = rng.random()
        if kind < 0.45:
            parts.append(f"<p>{sentence(rng, rng.randint(8, 30))}</p>")
        elif kind < 0.65:
            parts.append(code_block(rng))
        elif kind < 0.8:
            tag = rng.choice(["ol", "ul"])
            items = "".join(f"<li>{sentence(rng, rng.randint(3, 10))}</li>" for _ in range(4))
            parts.append(f"<{tag}>{items}</{tag}>")
        elif kind < 0.9:
            rows = "".join(
                f"<tr><td>{rng.choice(WORDS)}</td><td>{rng.randint(1, 99)}</td></tr>"
                for _ in range(3)
            )
            parts.append(
                "<table><thead><tr><th>Name</th><th>Value</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>"
            )
        else:
            parts.append(f"<h3>{sentence(rng, 3)}</h3>")
    body = "".join(parts)
    if rng.random() < 0.1:
        body += f"<p>Copy{rng.randint(10, 999)} chars / {rng.randint(2, 99)} words</p>"
    prefix = f"{rng.randint(1, 3)} / {rng.randint(1, 3)}" if rng.random() < 0.3 else ""
    return (
        prefix
        + f'<div class="markdown prose w-full break-words dark:prose-invert light">{body}</div>'
    )


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            question = sentence(rng, rng.randint(5, 25))
            if rng.random() < 0.02:
                question += " Is this how ChatGPT works?"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer(rng)}]
        out.append({"id": f"synth-{i}", "conversations": turns})
        if rng.random() < 0.02:
            out.append({"id": f"synth-{i}-copy", "conversations": turns})
    return out
