"""Rule-based rewards (R1 §2.2.2) and user reward functions, with weights.

A reward function is `fn(completion: str, example: dict) -> float | None`. `completion` is what the model wrote
after the prompt (the chat prompt of an R1 model already ends in `<think>`, so the completion starts inside the
reasoning); `example` is the data row: at least `prompt` and `answer`, usually `lang`, plus anything else the
JSONL row held, and `prompt_text` (the templated prompt).

Built in:
- `accuracy`: 1.0 when the final answer equals `answer`. The answer is the content of the \\boxed{} in the text
  after the reasoning (several boxes that disagree score 0: hedging is not rewarded), else the last number there.
  Compared after normalisation (spaces, thousands separators, full-width digits, a leading +), and as numbers
  with a tolerance (relative 1e-6) when both parse (integers, decimals, fractions a/b).
- `format`: 1.0 for exactly one `<think>` ... `</think>` block with non-empty reasoning, nothing before it, then
  a non-empty answer holding a \\boxed{} (no further think tags).
- `language`: the share of target-language words in the reasoning (R1's language-consistency reward): CJK
  characters count as Chinese words, runs of Latin letters as English words; digits and symbols are neutral.
- `digits` (opt-in): partial credit, the share of the expected integer's digits (and sign) right, from the right.

User functions come from a Python file (`load_reward_file`). A function that raises gives NaN for that
completion (as TRL does for None), is counted per function and never stops the run.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..chat import END_THINK, EOS, THINK
from .tasks import language_of, normalize

RewardFn = Callable[[str, dict], Optional[float]]


# ---- parsing --------------------------------------------------------------------------------------
def strip_eos(completion: str) -> str:
    return completion.split(EOS)[0]


def with_think(completion: str, example: dict) -> str:
    """The completion with the `<think>` that the prompt pre-filled put back in front (if it did: a completion
    that opens another one then holds nested blocks)."""
    text = strip_eos(completion)
    if example.get("prompt_text", "").rstrip().endswith(THINK):
        text = THINK + "\n" + text
    return text


def answer_part(text: str) -> str:
    """The text after the last `</think>` (all of it when there is none)."""
    return text.rsplit(END_THINK, 1)[-1]


def boxed_all(text: str) -> list[str]:
    """The contents of every \\boxed{...} (braces balanced), in order; unclosed ones are ignored."""
    out, start = [], 0
    while (start := text.find("\\boxed{", start)) >= 0:
        i = start + len("\\boxed{")
        depth = 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[i:j])
                break
        start = i
    return out


_NUMBER = re.compile(r"[-+\u2212]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def final_answer(completion: str) -> Optional[str]:
    """The answer a completion gives: its boxed value (None when several boxes disagree), else the last number
    after the reasoning, else None."""
    part = answer_part(strip_eos(completion))
    boxes = [normalize(b) for b in boxed_all(part)]
    if boxes:
        return boxes[0] if len(set(boxes)) == 1 else None
    numbers = _NUMBER.findall(part.translate(str.maketrans("０１２３４５６７８９", "0123456789")))
    return normalize(numbers[-1]) if numbers else None


def _as_number(s: str) -> Optional[Fraction]:
    try:
        return Fraction(s.replace("\\frac{", "").replace("}{", "/").rstrip("}")) if "\\frac" in s else Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


_REL_TOL, _ABS_TOL = Fraction(1, 10**6), Fraction(1, 10**12)


def answers_match(got: Optional[str], expected: str) -> bool:
    if got is None:
        return False
    want = normalize(str(expected))
    if got == want:
        return True
    a, b = _as_number(got), _as_number(want)
    if a is None or b is None:
        return False
    # math.isclose's tolerances (relative 1e-6, absolute 1e-12) in exact arithmetic: a model may write a number
    # too large for a float
    return abs(a - b) <= max(_REL_TOL * max(abs(a), abs(b)), _ABS_TOL)


# ---- the built-in rewards ---------------------------------------------------------------------------
def accuracy_reward(completion: str, example: dict) -> float:
    return float(answers_match(final_answer(completion), example["answer"]))


_ONE_BLOCK = re.compile(r"\s*<think>(?P<reason>.*?)</think>(?P<answer>.*)", re.DOTALL)


def format_reward(completion: str, example: dict) -> float:
    m = _ONE_BLOCK.fullmatch(with_think(completion, example))
    if not m:
        return 0.0
    reason, answer = m.group("reason"), m.group("answer")
    if THINK in reason or END_THINK in answer or THINK in answer or not reason.strip() or not answer.strip():
        return 0.0
    return float(bool(boxed_all(answer)))


_CJK_CHAR = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


def reasoning_part(completion: str, example: dict) -> str:
    text = with_think(completion, example)
    if END_THINK in text:
        text = text.split(END_THINK, 1)[0]
    return text.replace(THINK, "")


def language_share(text: str, lang: str) -> float:
    """Share of `lang` words among the words of `text` (0 when it has none)."""
    zh, en = len(_CJK_CHAR.findall(text)), len(_LATIN_WORD.findall(text))
    if zh + en == 0:
        return 0.0
    return (zh if lang == "zh" else en) / (zh + en)


def language_reward(completion: str, example: dict) -> float:
    lang = example.get("lang") or language_of(example.get("prompt", ""))
    return language_share(reasoning_part(completion, example), lang)


def digits_reward(completion: str, example: dict) -> float:
    """Partial credit for integer answers: the share of the expected digits (and sign) that the final answer has
    right, aligned from the right (1.0 exactly when accuracy is 1; not on by default)."""
    got, want = final_answer(completion), normalize(str(example["answer"]))
    if got is None or not re.fullmatch(r"-?\d+", got) or not re.fullmatch(r"-?\d+", want):
        return 0.0
    a, b = got[::-1], want[::-1]
    same = sum(x == y for x, y in zip(a, b))
    return same / max(len(a), len(b))


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward, "language": language_reward,
                                "digits": digits_reward}
DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.2, "language": 0.1}


# ---- user functions and the weighted set ---------------------------------------------------------------
def load_reward_file(path: str | Path) -> dict[str, RewardFn]:
    """The public functions of a Python file (names not starting with _), by name."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such reward file")
    spec = importlib.util.spec_from_file_location(f"_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fns = {k: v for k, v in vars(module).items() if callable(v) and not k.startswith("_")
           and getattr(v, "__module__", None) == module.__name__}
    if not fns:
        raise ValueError(f"{path}: defines no reward function (fn(completion, example) -> float)")
    return fns


def parse_weights(specs: list[str]) -> dict[str, float]:
    """["accuracy=1", "format=0.2", "mine"] -> {name: weight} (weight 1 when left out)."""
    out = {}
    for s in specs:
        name, _, w = s.partition("=")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--reward {s!r}: expected NAME or NAME=WEIGHT") from None
    return out


@dataclass
class RewardSet:
    """Named reward functions with weights; `score` gives the [N, F] table (NaN where one raised)."""

    functions: dict[str, RewardFn]
    weights: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, weights: Optional[dict[str, float]] = None, reward_file: Optional[str | Path] = None) -> "RewardSet":
        weights = dict(weights or DEFAULT_WEIGHTS)
        available = dict(BUILTIN)
        if reward_file:
            available.update(load_reward_file(reward_file))
        unknown = [n for n in weights if n not in available]
        if unknown:
            raise ValueError(f"unknown reward function(s) {unknown}; available: {sorted(available)}")
        return cls({n: available[n] for n in weights}, weights)

    @property
    def names(self) -> list[str]:
        return list(self.functions)

    @property
    def weight_vector(self) -> np.ndarray:
        return np.array([self.weights[n] for n in self.names], dtype=np.float32)

    def score(self, completions: list[str], examples: list[dict]) -> np.ndarray:
        table = np.full((len(completions), len(self.functions)), np.nan, dtype=np.float32)
        for j, (name, fn) in enumerate(self.functions.items()):
            for i, (c, ex) in enumerate(zip(completions, examples)):
                try:
                    r = fn(c, ex)
                    table[i, j] = np.nan if r is None else float(r)
                except Exception as e:  # a user reward's bug costs that completion its reward, not the run
                    self.errors[name] = self.errors.get(name, 0) + 1
                    if name not in self.last_error:
                        print(f"reward {name!r} raised {type(e).__name__}: {e} (NaN for that completion; counted)",
                              file=sys.stderr)
                    self.last_error[name] = f"{type(e).__name__}: {e}"
        return table
