"""Task examples, tokenized and packed into fixed-length rows.

Examples are concatenated (each is a whole R1 conversation, BOS to EOS; with `beyond` > 0 that share of them
drawn beyond the training levels) and cut into rows of seq_len + 1
tokens (inputs are row[:-1], targets row[1:]). Every token carries a loss mask: 1 everywhere for
pretraining; for SFT 1 on the assistant's tokens only (`<think>` ... EOS) and 0 on the prompt. The
stream's state is small (the index of the next example and the tokens left over from the last one), so a
checkpoint can store it and a resumed run reads exactly the same rows.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import tasks


def encode_example(tokenizer, example: tasks.Example, mask_prompt: bool) -> tuple[list[int], list[int]]:
    """(ids, mask) of one conversation; the prompt (BOS ... Assistant tag) gets mask 0 if mask_prompt.

    The prompt and the completion are encoded apart: they meet at the `<｜Assistant｜>` special token,
    which the tokenizer never merges, so this equals encoding the whole text."""
    prompt = tokenizer.encode(example.prompt_text, add_special_tokens=False)
    completion = tokenizer.encode(example.completion, add_special_tokens=False)
    return prompt + completion, [0 if mask_prompt else 1] * len(prompt) + [1] * len(completion)


class PackedBatches:
    """Endless [batch, seq_len + 1] (ids, mask) int32 arrays from the task stream (split, seed)."""

    def __init__(
        self,
        tokenizer,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        seed: int = 0,
        mask_prompt: bool = False,
        task_options: Optional[dict] = None,
        state: Optional[dict] = None,
        beyond: float = 0.0,
    ):
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.split, self.seed, self.mask_prompt = split, seed, mask_prompt
        self.task_options = dict(task_options or {})
        self.beyond = beyond
        self.position = 0  # index of the next example to read
        self.ids: list[int] = []  # tokens read but not yet in a row
        self.mask: list[int] = []
        if state:
            self.load_state(state)

    def state(self) -> dict:
        return {"position": self.position, "ids": list(self.ids), "mask": list(self.mask)}

    def load_state(self, state: dict) -> None:
        self.position, self.ids, self.mask = int(state["position"]), list(state["ids"]), list(state["mask"])

    def example(self, position: int):
        """The conversation at `position` (anything with prompt_text and completion; subclasses read files)."""
        return tasks.mixed_example_at(position, self.split, self.seed, self.beyond, **self.task_options)

    def _row(self) -> tuple[list[int], list[int]]:
        n = self.seq_len + 1
        while len(self.ids) < n:
            ids, mask = encode_example(self.tokenizer, self.example(self.position), self.mask_prompt)
            self.ids += ids
            self.mask += mask
            self.position += 1
        row, self.ids = self.ids[:n], self.ids[n:]
        mask, self.mask = self.mask[:n], self.mask[n:]
        return row, mask

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        rows = [self._row() for _ in range(self.batch_size)]
        return (
            np.array([r for r, _ in rows], dtype=np.int32),
            np.array([m for _, m in rows], dtype=np.int32),
        )
