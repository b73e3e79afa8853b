"""Which tokens carry loss: `_label_tokens` on offsets laid out by hand (each case a shape a
tokenizer's offset mapping takes), and `tokenize_messages` with the Llama-2 tokenizer where a
conversation has several answers. tests/data/test_tokenize.py holds the labels to FastChat's."""

import json
from dataclasses import dataclass

import pytest

from vicuna_sky.data.conversation import Message, Rendered, VicunaTemplate
from vicuna_sky.data.tokenize import (
    IGNORE_INDEX,
    LabelMismatch,
    Tokenized,
    _label_tokens,
    tokenize_messages,
)

TEXT = "0123456789abcdef"  # 16 characters: the offsets below index into it


def test_tokens_inside_the_span_carry_loss_from_its_first_character_to_its_last():
    offsets = [(0, 0), (0, 4), (4, 8), (8, 10), (10, 14), (14, 16)]  # a BOS covers nothing
    assert _label_tokens(offsets, [(8, 14)], TEXT) == [False, False, False, True, True, False]


def test_several_spans_and_the_tokens_after_the_last():
    offsets = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 16)]
    spans = [(2, 4), (6, 10)]
    assert _label_tokens(offsets, spans, TEXT) == [False, True, False, True, True, False, False]


def test_adjacent_spans_each_get_their_tokens():
    offsets = [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert _label_tokens(offsets, [(2, 4), (4, 6)], TEXT) == [False, True, True, False]


def test_offsets_with_gaps_between_tokens():
    """Some tokenizers leave the spaces out of their offsets: no token starts where a span ends."""
    offsets = [(0, 2), (3, 4), (5, 6), (7, 8), (9, 12), (13, 16)]
    spans = [(2, 4), (5, 8), (12, 16)]
    assert _label_tokens(offsets, spans, TEXT) == [False, True, True, True, False, True]


def test_trainable_counts_labels_by_value():
    """Labels read back from JSON are new int objects, -100 included."""
    assert Tokenized([1, 2, 3, 4], json.loads("[-100, -100, 3, 4]")).trainable == 2


def test_a_conversation_of_hundreds_of_answers():
    """300 answers of one token each, a question token before each and one after the last
    (past CPython's small ints: the span count is a new int object wherever it is computed)."""
    offsets = [(i, i + 1) for i in range(601)]
    spans = [(i, i + 1) for i in range(1, 600, 2)]
    assert _label_tokens(offsets, spans, "x" * 601) == [i % 2 == 1 for i in range(601)]


def test_a_token_covering_nothing_inside_an_answer_carries_no_loss():
    offsets = [(0, 4), (4, 6), (6, 6), (6, 8), (8, 16)]
    assert _label_tokens(offsets, [(4, 8)], TEXT) == [False, True, False, True, False]
    # Far into a text, as a tokenizer gives them: equal offsets, not the same int object.
    at = [int(str(n)) for n in (1000, 1000)]
    offsets = [(0, 998), (998, at[0]), (at[0], at[1]), (1000, 1004)]
    assert _label_tokens(offsets, [(998, 1004)], "x" * 1004) == [False, True, False, True]


@pytest.mark.parametrize(
    ("offsets", "at"),
    [
        ([(0, 6), (6, 10), (10, 14), (14, 16)], 8),  # across the start
        ([(0, 8), (8, 12), (12, 16)], 14),  # across the end
        ([(0, 8), (8, 16)], 14),  # from the start to past the end: the end is named
        ([(0, 16)], 8),  # across both: the start is named
    ],
)
def test_a_token_across_an_answer_boundary_is_a_mismatch(offsets, at):
    with pytest.raises(LabelMismatch, match=f"across an answer boundary at character {at}$"):
        _label_tokens(offsets, [(8, 14)], TEXT)


def test_the_mismatch_quotes_the_token_and_names_it():
    with pytest.raises(LabelMismatch, match=r"^token 1 covers '6789' across"):
        _label_tokens([(0, 6), (6, 10), (10, 16)], [(8, 14)], TEXT)


def test_an_answer_with_no_token_is_a_mismatch():
    with pytest.raises(LabelMismatch, match=r"^the answer at characters 16-16 has no tokens$"):
        _label_tokens([(0, 8), (8, 16)], [(0, 8), (16, 16)], TEXT)
    with pytest.raises(LabelMismatch, match=r"^the answer at characters 0-0 has no tokens$"):
        _label_tokens([(0, 8), (8, 16)], [(0, 0), (8, 16)], TEXT)


def trained(tokenizer, t: Tokenized) -> list[str]:
    """The trained stretches of `t`, decoded."""
    runs, current = [], []
    for label in [*t.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


CONVERSATION = [
    Message("user", "What is 2+2?"),
    Message("assistant", "It is 4."),
    Message("user", "And 3+3?"),
    Message("assistant", "It is 6."),
]


def test_every_answer_carries_loss_with_its_end_of_turn(llama2):
    t = tokenize_messages(CONVERSATION, VicunaTemplate(), llama2)
    assert trained(llama2, t) == ["It is 4.</s>", "It is 6.</s>"]
    assert t.trainable == sum(label != IGNORE_INDEX for label in t.labels) > 8
    assert t.input_ids.count(llama2.bos_token_id) == 1 and t.input_ids[0] == llama2.bos_token_id


def test_a_cut_answer_loses_only_its_own_end_of_turn(llama2):
    t = tokenize_messages(CONVERSATION, VicunaTemplate(), llama2, end_of_turn_on_last=False)
    assert trained(llama2, t) == ["It is 4.</s>", "It is 6."]


@dataclass(frozen=True)
class NoMarkerTemplate:
    """A template whose answers end with no stop string (a raw completion)."""

    name: str = "raw"
    stop: tuple[str, ...] = ("</s>",)

    def render(self, messages, add_generation_prompt=False) -> Rendered:
        return Rendered("Question: hi Answer: fine thanks", [(20, 32)])


def test_a_cut_answer_without_an_end_marker_keeps_all_its_tokens(llama2):
    whole = tokenize_messages([], NoMarkerTemplate(), llama2)
    cut = tokenize_messages([], NoMarkerTemplate(), llama2, end_of_turn_on_last=False)
    assert trained(llama2, whole) == trained(llama2, cut) == ["fine thanks"]


@dataclass(frozen=True)
class LongMarkerTemplate:
    """A template whose end of turn is several tokens long."""

    name: str = "long-marker"
    stop: tuple[str, ...] = (" END OF TURN",)

    def render(self, messages, add_generation_prompt=False) -> Rendered:
        return Rendered("Question: hi Answer: fine thanks END OF TURN", [(20, 44)])


def test_a_cut_answer_loses_every_token_of_its_end_of_turn(llama2):
    whole = tokenize_messages([], LongMarkerTemplate(), llama2)
    cut = tokenize_messages([], LongMarkerTemplate(), llama2, end_of_turn_on_last=False)
    assert trained(llama2, whole) == ["fine thanks END OF TURN"]
    assert trained(llama2, cut) == ["fine thanks"]


def test_max_length_cuts_ids_and_labels_alike(llama2):
    whole = tokenize_messages(CONVERSATION, VicunaTemplate(), llama2)
    cut = tokenize_messages(CONVERSATION, VicunaTemplate(), llama2, max_length=40)
    assert (cut.input_ids, cut.labels) == (whole.input_ids[:40], whole.labels[:40])
    assert len(whole.input_ids) > 40
