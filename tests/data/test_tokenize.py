import copy
from dataclasses import dataclass

import pytest
import torch
from fastchat.train.train import preprocess

from vicuna_sky.data.conversation import Message, Rendered, VicunaTemplate, get_template
from vicuna_sky.data.tokenize import (
    IGNORE_INDEX,
    LabelMismatch,
    Tokenized,
    block_causal_mask,
    pack,
    tokenize_messages,
    tokenize_sample,
)


@pytest.mark.parametrize("mode", ["legacy", "nonlegacy"])
def test_labels_equal_fastchat_preprocess(mode, request, dummy_conversations):
    """Parity with FastChat's own `preprocess` on its dummy data, sample by sample."""
    tok = request.getfixturevalue("llama2" if mode == "legacy" else "llama2_nonlegacy")
    assert tok.legacy is (mode == "legacy")
    template = get_template("vicuna_v1.1", tok)
    fully_masked = 0
    for sample in dummy_conversations:
        ref = preprocess([copy.deepcopy(sample["conversations"])], tok)
        n = int(ref["attention_mask"][0].sum())
        ref_ids, ref_labels = ref["input_ids"][0][:n].tolist(), ref["labels"][0][:n].tolist()
        fully_masked += all(x == IGNORE_INDEX for x in ref_labels)
        ours = tokenize_sample(sample, template, tok, max_length=2048)
        assert ours.input_ids == ref_ids, sample["id"]
        assert ours.labels == ref_labels, sample["id"]
    # FastChat silently masks a whole sample on a mismatch; none may hide in the comparison.
    assert fully_masked == 0
    assert len(dummy_conversations) == 500


def test_only_answers_carry_loss(llama2):
    msgs = [Message("user", "What is 2+2?"), Message("assistant", "It is 4.")]
    t = tokenize_messages(msgs, VicunaTemplate(), llama2)
    trained = llama2.decode([lab for lab in t.labels if lab != IGNORE_INDEX])
    assert trained == "It is 4.</s>"
    # Changing the question changes no answer label.
    other = tokenize_messages(
        [Message("user", "Say something long and different please"), msgs[1]],
        VicunaTemplate(),
        llama2,
    )
    assert [x for x in other.labels if x != IGNORE_INDEX] == [
        x for x in t.labels if x != IGNORE_INDEX
    ]


def test_truncated_segment_gets_no_end_of_turn_loss(llama2):
    sample = {
        "id": "x",
        "conversations": [
            {"from": "human", "value": "Tell me"},
            {"from": "gpt", "value": "Once upon a"},
        ],
    }
    whole = tokenize_sample(sample, VicunaTemplate(), llama2)
    cut = tokenize_sample({**sample, "truncated": True}, VicunaTemplate(), llama2)
    assert whole.labels[-1] == llama2.eos_token_id
    assert cut.labels[-1] == IGNORE_INDEX
    assert cut.labels[:-1] == whole.labels[:-1]


def test_max_length_truncates(llama2):
    msgs = [Message("user", "hi " * 50), Message("assistant", "ok " * 50)]
    assert len(tokenize_messages(msgs, VicunaTemplate(), llama2, max_length=32).input_ids) == 32


@dataclass(frozen=True)
class MidWordTemplate:
    """A broken template: its answer span starts in the middle of a word."""

    name: str = "broken"
    stop: tuple[str, ...] = ()

    def render(self, messages, add_generation_prompt=False) -> Rendered:
        return Rendered("Question: unbelievable", [(13, 22)])


def test_mismatch_is_loud(llama2):
    with pytest.raises(LabelMismatch, match="across an answer boundary"):
        tokenize_messages([], MidWordTemplate(), llama2)


def test_chat_template_labels(llama2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2.name_or_path)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    msgs = [Message("user", "Hi there"), Message("assistant", "Hello friend")]
    t = tokenize_messages(msgs, get_template("chat_template", tok), tok)
    assert t.input_ids.count(tok.bos_token_id) == 1  # the template's BOS, none added
    trained = tok.decode([lab for lab in t.labels if lab != IGNORE_INDEX])
    assert trained.strip() == "Hello friend</s>"


def test_pack_restarts_positions_and_respects_length():
    a = Tokenized([1, 5, 6], [IGNORE_INDEX, 5, 6])
    b = Tokenized([1, 7], [IGNORE_INDEX, 7])
    c = Tokenized([1, 8, 9, 10], [IGNORE_INDEX, 8, 9, 10])
    packs = pack([a, b, c], max_length=6)
    assert [p.input_ids for p in packs] == [[1, 5, 6, 1, 7], [1, 8, 9, 10]]
    assert packs[0].position_ids == [0, 1, 2, 0, 1]
    with pytest.raises(LabelMismatch):
        pack([Tokenized([5], [5])], max_length=4)


def test_packed_forward_equals_separate_forwards(tmp_path, llama2):
    """The block mask and reset positions make a packed row compute what separate rows do."""
    from transformers import AutoModelForCausalLM

    from vicuna_sky.tiny import build_tiny_llama

    model = AutoModelForCausalLM.from_pretrained(
        build_tiny_llama(tmp_path / "m"), attn_implementation="sdpa"
    ).eval()
    samples = [Tokenized([1, 20, 30, 40], [IGNORE_INDEX] * 4), Tokenized([1, 50, 60], [-100] * 3)]
    [packed] = pack(samples, max_length=16)
    ids = torch.tensor([packed.input_ids])
    pos = torch.tensor([packed.position_ids])
    mask = block_causal_mask(pos)
    with torch.no_grad():
        together = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits[0]
        apart = torch.cat([model(input_ids=torch.tensor([s.input_ids])).logits[0] for s in samples])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-4)
