"""Chat templates and the streaming reasoning parser.

The tokenizer's own `chat_template` is used when it has one; otherwise a built-in template for the
family (DeepSeek-R1 and its distills, V3, V2, V1). Earlier assistant turns lose their reasoning
(`<think>...</think>`), as R1 requires.
"""

from __future__ import annotations

from dataclasses import dataclass

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"

TEMPLATES = ("r1", "v3", "v2", "v1")
# The built-in template a family gets when its tokenizer brings none.
DEFAULT_TEMPLATE = {"deepseek_v3": "r1", "qwen2": "r1", "llama": "r1", "deepseek_v2": "v2", "deepseek": "v1"}


def strip_reasoning(content: str) -> str:
    """An assistant turn as it is fed back: only what follows the last </think>."""
    return content.split(END_THINK)[-1].lstrip("\n") if END_THINK in content else content


def _history(messages: list[dict]) -> list[dict]:
    return [
        {**m, "content": strip_reasoning(m["content"])} if m["role"] == "assistant" else m for m in messages
    ]


def render(messages: list[dict], template: str, add_generation_prompt: bool = True) -> str:
    """A built-in DeepSeek chat template, as text (special tokens spelled out)."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}: expected one of {TEMPLATES}")
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in _history(messages) if m["role"] != "system"]
    for m in turns:
        if m["role"] not in ("user", "assistant"):
            raise ValueError(f"message role {m['role']!r}: expected system, user or assistant")
    if template in ("r1", "v3"):
        out = BOS + system
        for m in turns:
            out += USER + m["content"] if m["role"] == "user" else ASSISTANT + m["content"] + EOS
        if add_generation_prompt:
            out += ASSISTANT + (THINK + "\n" if template == "r1" else "")
        return out
    # V2 and V1 (DeepSeek-LLM chat): plain-text roles
    out = BOS + (system + "\n\n" if system else "")
    for m in turns:
        out += f"User: {m['content']}\n\n" if m["role"] == "user" else f"Assistant: {m['content']}{EOS}"
    if add_generation_prompt:
        out += "Assistant:"
    return out


def apply_chat_template(tokenizer, messages: list[dict], model_type: str = "deepseek_v3", template: str | None = None) -> str:
    """The prompt text for `messages`: the tokenizer's template unless `template` names a built-in one."""
    own = getattr(tokenizer, "chat_template", None)
    if template is None and own:
        return tokenizer.apply_chat_template(_history(messages), tokenize=False, add_generation_prompt=True)
    return render(messages, template or DEFAULT_TEMPLATE.get(model_type, "r1"))


@dataclass
class Delta:
    reasoning: str = ""
    answer: str = ""


class ReasoningParser:
    """Splits streamed model output into reasoning and answer.

    Handles a template that pre-fills `<think>` (the output then holds only `</think>`), a model that
    writes both tags, and one that writes none (all answer). Tags split across tokens are held back
    until they are complete.
    """

    def __init__(self, prompt_ends_in_think: bool = False):
        # "start": may open with <think>, else it is all answer; "prefilled": the template opened <think>
        # (a repeated opening tag is dropped)
        self.state = "prefilled" if prompt_ends_in_think else "start"
        self.buffer = ""
        self.reasoning = ""
        self.answer = ""

    def feed(self, text: str) -> Delta:
        self.buffer += text
        delta = Delta()
        while True:
            if self.state in ("start", "prefilled"):
                stripped = self.buffer.lstrip()
                if stripped.startswith(THINK):
                    self.buffer = stripped[len(THINK):]
                    self.state = "reasoning"
                elif THINK.startswith(stripped):  # could still become <think>
                    return delta
                else:
                    self.state = "reasoning" if self.state == "prefilled" else "answer"
            elif self.state == "reasoning":
                if END_THINK in self.buffer:
                    before, self.buffer = self.buffer.split(END_THINK, 1)
                    self._add(delta, reasoning=before)
                    self.buffer = self.buffer.lstrip("\n")
                    self.state = "answer_start"
                    continue
                keep = _partial_suffix(self.buffer, END_THINK)
                self._add(delta, reasoning=self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return delta
            elif self.state == "answer_start":  # drop the blank lines after </think>
                self.buffer = self.buffer.lstrip("\n")
                if not self.buffer:
                    return delta
                self.state = "answer"
            else:
                self._add(delta, answer=self.buffer)
                self.buffer = ""
                return delta

    def finish(self) -> Delta:
        """Flush what was held back (an unfinished tag is text after all)."""
        delta = Delta()
        if self.state in ("reasoning", "prefilled"):
            self._add(delta, reasoning=self.buffer)
        elif self.state in ("start", "answer"):
            self._add(delta, answer=self.buffer)
        self.buffer = ""
        return delta

    def _add(self, delta: Delta, reasoning: str = "", answer: str = "") -> None:
        delta.reasoning += reasoning
        delta.answer += answer
        self.reasoning += reasoning
        self.answer += answer


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
