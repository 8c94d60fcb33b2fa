"""Chat templates (golden strings per family) and the streaming reasoning parser."""

import pytest

from mlx_deepseek.chat import ReasoningParser, apply_chat_template, render, strip_reasoning

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "<think>\none plus one\n</think>\n\n2"},
    {"role": "user", "content": "2+2?"},
]

GOLDEN = {
    "r1": "<｜begin▁of▁sentence｜>Be brief.<｜User｜>1+1?<｜Assistant｜>2<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n",
    "v3": "<｜begin▁of▁sentence｜>Be brief.<｜User｜>1+1?<｜Assistant｜>2<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>",
    "v2": "<｜begin▁of▁sentence｜>Be brief.\n\nUser: 1+1?\n\nAssistant: 2<｜end▁of▁sentence｜>User: 2+2?\n\nAssistant:",
    "v1": "<｜begin▁of▁sentence｜>Be brief.\n\nUser: 1+1?\n\nAssistant: 2<｜end▁of▁sentence｜>User: 2+2?\n\nAssistant:",
}


@pytest.mark.parametrize("template", sorted(GOLDEN))
def test_golden_templates_drop_old_reasoning(template):
    assert render(CONVERSATION, template) == GOLDEN[template]


def test_family_defaults_and_the_tokenizers_own_template():
    class NoTemplate:
        chat_template = None

    assert apply_chat_template(NoTemplate(), CONVERSATION, "deepseek_v3") == GOLDEN["r1"]
    assert apply_chat_template(NoTemplate(), CONVERSATION, "qwen2") == GOLDEN["r1"]  # R1 distills
    assert apply_chat_template(NoTemplate(), CONVERSATION, "deepseek_v2") == GOLDEN["v2"]

    class OwnTemplate:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in messages)

    assert apply_chat_template(OwnTemplate(), CONVERSATION) == "Be brief.|1+1?|2|2+2?"


def test_strip_reasoning():
    assert strip_reasoning("<think>a</think>\n\nb") == "b"
    assert strip_reasoning("plain") == "plain"


def _run(pieces, prefilled):
    parser = ReasoningParser(prompt_ends_in_think=prefilled)
    streamed_r = streamed_a = ""
    for p in pieces:
        d = parser.feed(p)
        streamed_r, streamed_a = streamed_r + d.reasoning, streamed_a + d.answer
    d = parser.finish()
    streamed_r, streamed_a = streamed_r + d.reasoning, streamed_a + d.answer
    assert (streamed_r, streamed_a) == (parser.reasoning, parser.answer)
    return parser.reasoning, parser.answer


@pytest.mark.parametrize("split", [1, 2, 3, 100])
def test_parser_cases(split):
    def chunks(text):
        return [text[i : i + split] for i in range(0, len(text), split)]

    # the template pre-filled <think>: the output holds only </think>
    assert _run(chunks("step 1\nstep 2\n</think>\n\nThe answer is 4."), True) == ("step 1\nstep 2\n", "The answer is 4.")
    # the model writes both tags
    assert _run(chunks("<think>\nhmm</think>\n\n4"), False) == ("\nhmm", "4")
    # no tags at all
    assert _run(chunks("just 4, <thin not a tag"), False) == ("", "just 4, <thin not a tag")
    # pre-filled but the model repeats <think>
    assert _run(chunks("<think>x</think>y"), True) == ("x", "y")
    # reasoning that never closes stays reasoning
    assert _run(chunks("still thinking </thi"), True) == ("still thinking </thi", "")
    # a lone '<' at the start of an untagged answer
    assert _run(chunks("<3 you"), False) == ("", "<3 you")
