"""LLM-as-judge evaluation: questions, answers from any OpenAI-compatible endpoint, judgments,
reports with plots. Answers and judgments are JSONL, one record per line, appended as they come
so an interrupted run resumes where it stopped."""
