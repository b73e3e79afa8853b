import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vicuna_sky.tiny import build_tiny_llama, demo_conversations


def test_tiny_llama_round_trips_and_generates(tmp_path):
    path = build_tiny_llama(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = "What is the capital of France?"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    # Same seed, same weights: the demo and tests are reproducible.
    again = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "again"))
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_demo_conversations_are_sharegpt():
    convs = demo_conversations()
    assert all({"id", "conversations"} <= set(c) for c in convs)
    roles = {t["from"] for c in convs for t in c["conversations"]}
    assert roles == {"human", "gpt", "system"}
