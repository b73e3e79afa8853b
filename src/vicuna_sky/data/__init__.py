"""The data pipeline: clean ShareGPT, split to the context, render templates, label tokens."""
