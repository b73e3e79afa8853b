"""Data that ships with the package: the demo's ShareGPT sample, the original Vicuna evaluation."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
# FastChat's question.jsonl and GPT-4 reviews from the Vicuna blog (see eval_table/README.md).
EVAL_TABLE = ASSETS / "eval_table"
BLOG_REVIEWS = EVAL_TABLE / "review" / "vicuna-13b_20230322-clean-lang"
