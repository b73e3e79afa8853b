import pytest
from fastchat.model.model_adapter import get_conversation_template

from vicuna_sky.data.conversation import (
    VICUNA_SYSTEM,
    ChatTemplate,
    Message,
    VicunaTemplate,
    from_sharegpt,
    get_template,
)
from vicuna_sky.errors import VicunaSkyError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def fastchat_prompt(turns: list[dict], generation: bool = False) -> str:
    conv = get_conversation_template("vicuna_v1.1")
    for t in turns:
        conv.append_message(conv.roles[0] if t["from"] == "human" else conv.roles[1], t["value"])
    if generation:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def test_vicuna_renders_exactly_as_fastchat(dummy_conversations):
    template = VicunaTemplate()
    for sample in dummy_conversations[:100]:
        ours = template.render(from_sharegpt(sample["conversations"])).text
        assert ours == fastchat_prompt(sample["conversations"])


def test_vicuna_generation_prompt_matches_fastchat():
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    turns.append({"from": "human", "value": "Name a prime."})
    ours = VicunaTemplate().render(from_sharegpt(turns), add_generation_prompt=True).text
    assert ours == fastchat_prompt(turns, generation=True)
    assert ours.startswith(VICUNA_SYSTEM + " USER: Hi ASSISTANT: Hello!</s>USER: Name a prime.")
    assert ours.endswith("ASSISTANT:")


def test_vicuna_spans_cover_answers_and_end_of_turn():
    msgs = [Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2")]
    msgs.append(Message("assistant", "A2"))
    rendered = VicunaTemplate().render(msgs)
    assert [rendered.text[a:b] for a, b in rendered.spans] == [" A1</s>", " A2</s>"]


def test_system_message_replaces_the_default():
    msgs = [Message("system", "Be terse."), Message("user", "Hi"), Message("assistant", "Yo")]
    assert VicunaTemplate().render(msgs).text == "Be terse. USER: Hi ASSISTANT: Yo</s>"


def test_roles_must_alternate():
    with pytest.raises(VicunaSkyError, match="alternate"):
        VicunaTemplate().render([Message("user", "a"), Message("user", "b")])


def test_chat_template_spans(llama2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_path)
    tok.chat_template = CHATML
    template = get_template("chat_template", tok)
    msgs = [Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye")]
    msgs.append(Message("assistant", "Ciao"))
    rendered = template.render(msgs)
    assert rendered.text == tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in msgs], tokenize=False
    )
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Hello<|im_end|>", "Ciao<|im_end|>"]
    assert template.render(msgs[:1], add_generation_prompt=True).text.endswith(
        "<|im_start|>assistant\n"
    )


def test_chat_template_that_is_not_incremental_is_refused(llama2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_path)
    # Renders the number of messages first: earlier renderings are not prefixes of later ones.
    tok.chat_template = (
        "{{ messages|length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}"
    )
    msgs = [Message("user", "Hi"), Message("assistant", "Hello")]
    with pytest.raises(VicunaSkyError, match="cannot be located"):
        ChatTemplate(tok).render(msgs)


def test_template_errors(llama2_path):
    from transformers import AutoTokenizer

    with pytest.raises(VicunaSkyError, match="unknown template 'alpaca'"):
        get_template("alpaca")
    with pytest.raises(VicunaSkyError, match="no chat template"):
        get_template("chat_template", AutoTokenizer.from_pretrained(llama2_path))


def test_vicuna_jinja_template_renders_like_the_template(llama2_path):
    """Exported tokenizers carry VICUNA_CHAT_TEMPLATE: apply_chat_template (and vLLM) must
    prompt exactly as training rendered."""
    from transformers import AutoTokenizer

    from vicuna_sky.data.conversation import VICUNA_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(llama2_path)
    tok.chat_template = VICUNA_CHAT_TEMPLATE
    for msgs, generation in [
        ([Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye")], True),
        ([Message("system", "Be terse."), Message("user", "Q"), Message("assistant", "A")], False),
    ]:
        ours = VicunaTemplate().render(msgs, add_generation_prompt=generation).text
        theirs = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in msgs],
            tokenize=False,
            add_generation_prompt=generation,
        )
        assert theirs == tok.bos_token + ours
