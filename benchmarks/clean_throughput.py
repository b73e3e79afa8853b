"""Benchmark: cleaning throughput of `vicuna-sky data clean` vs FastChat's `clean_sharegpt.py`.

Both run as command-line tools on the same synthetic ShareGPT HTML file, on the same machine,
one after the other, each with its default parallelism (all cores). FastChat runs from its own
venv (fschat 0.2.36 with markdownify 0.11.6, the version its script names), created on first use
under benchmarks/.venv-fastchat from the package index. Afterwards the outputs are compared
conversation by conversation.

    .venv/bin/python benchmarks/clean_throughput.py [--conversations 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sharegpt_synth import conversations

HERE = Path(__file__).resolve().parent
FASTCHAT_VENV = HERE / ".venv-fastchat"
FASTCHAT_PACKAGES = ["fschat==0.2.36", "markdownify==0.11.6", "beautifulsoup4", "tqdm"]


def fastchat_python() -> Path:
    python = FASTCHAT_VENV / "bin" / "python"
    if not python.exists():
        print("creating the FastChat venv (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(FASTCHAT_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--no-deps", FASTCHAT_PACKAGES[0]], check=True)
        subprocess.run([*pip, *FASTCHAT_PACKAGES[1:]], check=True)
    return python


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def normalize(text: str) -> str:
    """FastChat's known defects undone: escaped _ and *, blank lines collapsed by its
    "\\n\\n\\n" -> "\\n" replacement (which also glues fences to the paragraphs around them)."""
    text = re.sub(r"\\([_*])", r"\1", text)
    return re.sub(r"\n\s*\n", "\n", text).strip()


COUNTER_BUG = "FastChat's counter regex ate the first list number"


def ate_list_number(text: str) -> str:
    """What FastChat makes of an answer that opens with a list after a "2 / 2" counter: its
    regex reads "2 / 21" and removes the list's number with the counter."""
    return re.sub(r"^\d+\. ", ". ", text)


def first_difference(a: list[str], b: list[str]) -> None:
    for x, y in zip(a, b, strict=False):
        if normalize(x) != normalize(y):
            x, y = normalize(x), normalize(y)
            at = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), 0)
            print(f"  first difference: FastChat {x[max(0, at - 60) : at + 60]!r}")
            print(f"                    ours     {y[max(0, at - 60) : at + 60]!r}")
            return


def compare(theirs: list[dict], ours: list[dict]) -> dict[str, int]:
    """How the outputs differ, per conversation both kept."""
    mine = {s["id"]: s for s in ours}
    kinds = {
        "both kept": 0,
        "identical": 0,
        "equal up to FastChat's escapes and blank lines": 0,
        COUNTER_BUG: 0,
        "different": 0,
    }
    kinds["kept only by FastChat"] = len({s["id"] for s in theirs} - set(mine))
    kinds["kept only by us"] = len(set(mine) - {s["id"] for s in theirs})
    for sample in theirs:
        other = mine.get(sample["id"])
        if other is None:
            continue
        kinds["both kept"] += 1
        a = [t["value"] for t in sample["conversations"]]
        b = [t["value"] for t in other["conversations"]]
        if a == b:
            kinds["identical"] += 1
        elif [normalize(x) for x in a] == [normalize(x) for x in b]:
            kinds["equal up to FastChat's escapes and blank lines"] += 1
        elif all(
            normalize(x) in (normalize(y), ate_list_number(normalize(y)))
            for x, y in zip(a, b, strict=True)
        ):
            kinds[COUNTER_BUG] += 1
        else:
            kinds["different"] += 1
            if kinds["different"] == 1:
                first_difference(a, b)
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fastchat = fastchat_python()
    ours_cli = Path(sys.executable).parent / "vicuna-sky"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "sharegpt_html.json"
        data = conversations(args.conversations, args.seed)
        src.write_text(json.dumps(data))
        t_theirs = timed(
            [
                str(fastchat),
                "-m",
                "fastchat.data.clean_sharegpt",
                "--in-file",
                str(src),
                "--out-file",
                str(tmp / "theirs.json"),
            ]
        )
        t_ours = timed([str(ours_cli), "data", "clean", str(src), "-o", str(tmp / "ours.json")])
        theirs = json.loads((tmp / "theirs.json").read_text())
        ours = json.loads((tmp / "ours.json").read_text())
    n = len(data)
    print(f"input: {n} synthetic HTML conversations (seed {args.seed}), {os.cpu_count()} cores")
    print(f"FastChat clean_sharegpt: {t_theirs:6.2f} s  {n / t_theirs:8.0f} conversations/s")
    print(f"vicuna-sky data clean:   {t_ours:6.2f} s  {n / t_ours:8.0f} conversations/s")
    print(f"speed-up: {t_theirs / t_ours:.2f}x")
    for kind, count in compare(theirs, ours).items():
        print(f"  {kind}: {count}")


if __name__ == "__main__":
    main()
