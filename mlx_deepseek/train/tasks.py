"""Synthetic reasoning tasks with step-by-step `<think>` traces (the nano-r1 curriculum).

Five kinds of problem, each solved the way a person would write it out:

- `add`: multi-digit addition, column by column from the right, with carries;
- `sub`: multi-digit subtraction, column by column with borrows (a negative result when a < b);
- `mul`: small multiplication, an n-digit number times a one-digit number, with carries;
- `cmp`: which of two numbers is larger (digit counts, then digits from the left);
- `count`: how often a letter occurs in a word, or how many items a list holds.

A problem's difficulty `level` is its number of digits (for counting, the word or list grows with it).
Prompts are English or Chinese, and the trace and answer are in the prompt's language. Everything is a
deterministic function of the seed.

Splits: a hash of a problem's canonical, language-free key puts it on the train side or the held-out side
(HELDOUT_PERCENT), whatever the seed or language, so no evaluated problem is ever trained on. `train` and
`heldout` draw at the training levels (TRAIN_LEVELS), `hard` draws held-out-side problems at the HARD_EXTRA
levels beyond them.

Pretraining may draw a share of its examples `beyond` the training levels (train-side problems at the hard
split's lengths); SFT stays at the training levels, so the hard split has more digits than SFT ever showed
and no problem the model ever saw.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..chat import ASSISTANT, BOS, END_THINK, EOS, THINK, USER

KINDS = ("add", "sub", "mul", "cmp", "count")
LANGS = ("en", "zh")
SPLITS = ("train", "heldout", "hard")
TRAIN_LEVELS = {"add": (1, 4), "sub": (1, 4), "mul": (1, 3), "cmp": (1, 5), "count": (1, 4)}
HARD_EXTRA = 2  # `hard` uses levels max+1 .. max+HARD_EXTRA
HELDOUT_PERCENT = 10

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ITEMS_EN = ("apple", "pear", "plum", "fig", "lemon", "grape", "mango", "peach", "cherry", "melon")
ITEMS_ZH = ("苹果", "梨", "李子", "无花果", "柠檬", "葡萄", "芒果", "桃子", "樱桃", "西瓜")


@dataclass(frozen=True)
class Problem:
    """A problem without its wording: `kind`, integer operands, and a level."""

    kind: str
    operands: tuple
    level: int

    @property
    def key(self) -> str:
        """Canonical, language-free spelling; the split is a function of it."""
        return f"{self.kind}:" + ",".join(map(str, self.operands))

    @property
    def answer(self) -> str:
        k, o = self.kind, self.operands
        if k == "add":
            return str(o[0] + o[1])
        if k == "sub":
            return str(o[0] - o[1])
        if k == "mul":
            return str(o[0] * o[1])
        if k == "cmp":
            return str(max(o[0], o[1]))
        if k == "count_letter":
            word, letter = _word(o), LETTERS[o[0]]
            return str(word.count(letter))
        if k == "count_items":
            return str(len(o))
        raise ValueError(f"unknown problem kind {k!r}")


@dataclass
class Example:
    problem: Problem
    lang: str
    prompt: str
    trace: str
    answer: str  # the final answer text, holding \boxed{value}
    value: str = field(default="")  # the true value

    @property
    def completion(self) -> str:
        """What the assistant writes: the R1 reasoning block, then the answer, then EOS."""
        return f"{THINK}\n{self.trace}\n{END_THINK}\n\n{self.answer}{EOS}"

    @property
    def prompt_text(self) -> str:
        """The chat prefix up to and including the Assistant tag (the part SFT does not learn)."""
        return f"{BOS}{USER}{self.prompt}{ASSISTANT}"

    @property
    def text(self) -> str:
        """The whole R1-format conversation."""
        return self.prompt_text + self.completion


# ---- splits ------------------------------------------------------------------------------------
def problem_hash(problem: Problem) -> int:
    return int.from_bytes(hashlib.sha256(problem.key.encode()).digest()[:8], "big")


def is_heldout(problem: Problem) -> bool:
    return problem_hash(problem) % 100 < HELDOUT_PERCENT


def split_of(problem: Problem) -> str:
    """`train` on the train side (at any level: pretraining may go beyond the training levels), else
    `heldout` or, beyond the training levels, `hard`."""
    if not is_heldout(problem):
        return "train"
    return "hard" if problem.level > TRAIN_LEVELS[_family(problem.kind)][1] else "heldout"


def _family(kind: str) -> str:
    return "count" if kind.startswith("count") else kind


def levels_for(kind: str, split: str, beyond: bool = False) -> tuple[int, int]:
    """The levels a split draws from; `beyond`: the hard levels (for train-side pretraining examples)."""
    lo, hi = TRAIN_LEVELS[kind]
    if split == "hard" or beyond:
        return hi + 1, hi + HARD_EXTRA
    if split in ("train", "heldout"):
        return lo, hi
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")


# ---- sampling problems ------------------------------------------------------------------------
def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _word(operands: tuple) -> str:
    return "".join(LETTERS[i] for i in operands[1:])


def sample_problem(rng: random.Random, kind: str, level: int) -> Problem:
    if kind in ("add", "sub"):
        a = _number(rng, level)
        b = _number(rng, rng.randint(1, level))
        ops = (a, b) if rng.random() < 0.5 else (b, a)
        if kind == "sub" and rng.random() < 0.8:  # mostly non-negative results
            ops = (max(ops), min(ops))
        return Problem(kind, ops, level)
    if kind == "mul":
        return Problem(kind, (_number(rng, level), rng.randint(2, 9)), level)
    if kind == "cmp":
        a = _number(rng, level)
        if rng.random() < 0.5:  # same length, differing late: the interesting case
            keep = rng.randint(0, level - 1)
            b = int(str(a)[:keep] + str(_number(rng, level - keep)).rjust(level - keep, "0")) if keep else _number(rng, level)
        else:
            b = _number(rng, rng.randint(1, level))
        while b == a:
            b = _number(rng, level)
        return Problem(kind, (a, b), level)
    if kind == "count":
        size = 2 + 2 * level + rng.randint(0, 1)  # 4-5 letters at level 1 ... 10-11 at level 4
        if rng.random() < 0.5:
            letter = rng.randrange(26)
            pool = [letter] * 3 + [rng.randrange(26) for _ in range(5)]  # the letter is common
            return Problem("count_letter", (letter, *[rng.choice(pool) for _ in range(size)]), level)
        return Problem("count_items", tuple(rng.randrange(len(ITEMS_EN)) for _ in range(size - 2)), level)
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")


# ---- wording and traces ------------------------------------------------------------------------
def _boxed(value: str, lang: str) -> str:
    return f"答案是 \\boxed{{{value}}}。" if lang == "zh" else f"The answer is \\boxed{{{value}}}."


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    sa, sb = str(a)[::-1], str(b)[::-1]
    n = max(len(sa), len(sb))
    return [(int(sa[i]) if i < len(sa) else 0, int(sb[i]) if i < len(sb) else 0) for i in range(n)]


def _add_trace(a: int, b: int, zh: bool) -> list[str]:
    lines, carry = [], 0
    for x, y in _columns(a, b):
        s = x + y + carry
        lines.append(
            f"{x} + {y} + {carry} = {s}，写 {s % 10}，进 {s // 10}" if zh else f"{x} + {y} + {carry} = {s}, write {s % 10}, carry {s // 10}"
        )
        carry = s // 10
    if carry:
        lines.append(f"最后写下进位 {carry}" if zh else f"write the final carry {carry}")
    return lines


def _sub_trace(a: int, b: int, zh: bool) -> list[str]:
    """a >= b: column subtraction with borrows."""
    lines, borrow = [], 0
    for x, y in _columns(a, b):
        d = x - y - borrow
        if d < 0:
            lines.append(
                f"{x} - {y} - {borrow} + 10 = {d + 10}，写 {d + 10}，借 1" if zh
                else f"{x} - {y} - {borrow} + 10 = {d + 10}, write {d + 10}, borrow 1"
            )
            borrow = 1
        else:
            lines.append(f"{x} - {y} - {borrow} = {d}，写 {d}，借 0" if zh else f"{x} - {y} - {borrow} = {d}, write {d}, borrow 0")
            borrow = 0
    return lines


def _mul_trace(a: int, b: int, zh: bool) -> list[str]:
    lines, carry = [], 0
    for x in map(int, str(a)[::-1]):
        p = x * b + carry
        lines.append(f"{x} × {b} + {carry} = {p}，写 {p % 10}，进 {p // 10}" if zh else f"{x} × {b} + {carry} = {p}, write {p % 10}, carry {p // 10}")
        carry = p // 10
    if carry:
        lines.append(f"最后写下进位 {carry}" if zh else f"write the final carry {carry}")
    return lines


def render(problem: Problem, lang: str) -> Example:
    """The problem worded in `lang`, with its trace and boxed answer."""
    if lang not in LANGS:
        raise ValueError(f"lang={lang!r}: expected one of {LANGS}")
    zh = lang == "zh"
    k, o, value = problem.kind, problem.operands, problem.answer
    if k == "add":
        a, b = o
        prompt = f"计算 {a} + {b}。" if zh else f"What is {a} + {b}?"
        lines = ["从右往左逐位相加。" if zh else "Add the digits column by column, from the right."]
        lines += _add_trace(a, b, zh)
        lines.append(f"所以 {a} + {b} = {value}。" if zh else f"So {a} + {b} = {value}.")
    elif k == "sub":
        a, b = o
        prompt = f"计算 {a} - {b}。" if zh else f"What is {a} - {b}?"
        if a >= b:
            lines = ["从右往左逐位相减。" if zh else "Subtract column by column, from the right."]
            lines += _sub_trace(a, b, zh)
        else:
            lines = [
                f"{a} 小于 {b}，所以先算 {b} - {a}，结果取负。" if zh
                else f"{a} is less than {b}, so compute {b} - {a} and make it negative."
            ]
            lines += _sub_trace(b, a, zh)
            lines.append(f"{b} - {a} = {b - a}。" if zh else f"{b} - {a} = {b - a}.")
        lines.append(f"所以 {a} - {b} = {value}。" if zh else f"So {a} - {b} = {value}.")
    elif k == "mul":
        a, b = o
        prompt = f"计算 {a} × {b}。" if zh else f"What is {a} × {b}?"
        lines = ["从右往左逐位相乘。" if zh else "Multiply digit by digit, from the right."]
        lines += _mul_trace(a, b, zh)
        lines.append(f"所以 {a} × {b} = {value}。" if zh else f"So {a} × {b} = {value}.")
    elif k == "cmp":
        a, b = o
        prompt = f"{a} 和 {b} 哪个更大？" if zh else f"Which is larger, {a} or {b}?"
        la, lb = len(str(a)), len(str(b))
        if la != lb:
            lines = [
                f"{a} 有 {la} 位，{b} 有 {lb} 位。" if zh else f"{a} has {la} digits, {b} has {lb} digits.",
                f"位数多的更大，所以 {value} 更大。" if zh else f"More digits means larger, so {value} is larger.",
            ]
        else:
            lines = [f"两个数都有 {la} 位，从左往右比较。" if zh else f"Both have {la} digit{'s' if la > 1 else ''}; compare from the left."]
            for x, y in zip(str(a), str(b)):
                if x == y:
                    lines.append(f"{x} = {y}")
                else:
                    lines.append(f"{x} {'>' if x > y else '<'} {y}")
                    break
            lines.append(f"所以 {value} 更大。" if zh else f"So {value} is larger.")
    elif k == "count_letter":
        word, letter = _word(o), LETTERS[o[0]]
        prompt = f"单词 {word} 中有几个字母 {letter}？" if zh else f"How many times does the letter {letter} appear in {word}?"
        lines = ["逐个字母检查：" if zh else "Check each letter:"]
        n = 0
        for c in word:
            if c == letter:
                n += 1
                lines.append(f"{c} 是 {letter}，计数 {n}" if zh else f"{c} is {letter}, count {n}")
            else:
                lines.append(f"{c} 不是" if zh else f"{c} no")
        lines.append(f"所以共有 {value} 个 {letter}。" if zh else f"So {letter} appears {value} times.")
    elif k == "count_items":
        names = ITEMS_ZH if zh else ITEMS_EN
        items = [names[i] for i in o]
        prompt = ("列表 [" + "、".join(items) + "] 中有几项？") if zh else ("How many items are in the list [" + ", ".join(items) + "]?")
        lines = ["逐项计数：" if zh else "Count the items one by one:"]
        lines += [f"{item} {i}" for i, item in enumerate(items, 1)]
        lines.append(f"所以列表中有 {value} 项。" if zh else f"So the list has {value} items.")
    else:
        raise ValueError(f"unknown problem kind {k!r}")
    return Example(problem, lang, prompt, "\n".join(lines), _boxed(value, lang), value)


# ---- the generator -----------------------------------------------------------------------------
def mixed_example_at(index: int, split: str = "train", seed: int = 0, share: float = 0.0, **options) -> Example:
    """Example `index` of a stream that draws a `share` of its positions beyond the training levels (`example_at`
    with beyond=True) and the others as usual. The coin has a seed of its own: the beyond example's stream is
    seeded "beyond:{seed}:{index}", and the same seed would tie its first draw (the kind) to the coin, so only
    some kinds would go beyond."""
    beyond = share > 0 and random.Random(f"beyond-share:{seed}:{index}").random() < share
    return example_at(index, split, seed, beyond=beyond, **options)


def example_at(
    index: int,
    split: str = "train",
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    langs: tuple[str, ...] = LANGS,
    levels: Optional[tuple[int, int]] = None,
    beyond: bool = False,
) -> Example:
    """Example number `index` of the stream (split, seed): random access, so a data position is one integer.

    Drawn uniformly over kind, then level, then language and operands; a problem of the wrong split is
    redrawn. `beyond`: a train-side example at the hard levels, from a stream of its own."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if beyond and split != "train":
        raise ValueError(f"beyond with split={split!r}: only train-side problems are drawn beyond the training levels")
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kind={k!r}: expected some of {KINDS}")
    rng = random.Random(f"{'beyond' if beyond else split}:{seed}:{index}")
    for _ in range(100):
        kind = rng.choice(kinds)
        lo, hi = levels if levels is not None else levels_for(kind, split, beyond)
        level = rng.randint(lo, hi)
        lang = rng.choice(langs)
        for _ in range(400):
            problem = sample_problem(rng, kind, level)
            if split_of(problem) == split:
                return render(problem, lang)
    raise ValueError(f"no {split} problem found for kinds={kinds}, levels={levels}")


def generate(
    n: Optional[int] = None, split: str = "train", seed: int = 0, start: int = 0, **kw
) -> Iterator[Example]:
    """Examples start, start+1, ... of the stream (split, seed); endless when n is None. Keyword arguments
    (kinds, langs, levels) as for `example_at`."""
    i = start
    while n is None or i < start + n:
        yield example_at(i, split, seed, **kw)
        i += 1


def chat_texts(n: Optional[int] = None, split: str = "train", seed: int = 0, **kw) -> Iterator[str]:
    """R1-format training text: BOS User prompt Assistant <think> trace </think> answer EOS."""
    for ex in generate(n, split, seed, **kw):
        yield ex.text


# ---- checking answers --------------------------------------------------------------------------
_FULLWIDTH = str.maketrans("０１２３４５６７８９－＋，", "0123456789-+,")


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def normalize(answer: str) -> str:
    """Compare answers as written loosely: spaces, thousands separators, a leading +, trailing dots."""
    s = answer.translate(_FULLWIDTH).strip().strip("$").strip()
    s = s.replace("\\,", "").replace(",", "").replace(" ", "").replace("\u2212", "-").rstrip(".。")
    s = s.lstrip("+")
    if re.fullmatch(r"-?\d+", s):
        s = str(int(s))
    return s


def check_answer(text: str, expected: str) -> bool:
    """Whether the last \\boxed{} of `text` holds `expected`."""
    got = extract_boxed(text)
    return got is not None and normalize(got) == normalize(expected)


_CJK = re.compile(r"[\u3400-\u9fff]")


def language_of(text: str) -> str:
    """'zh' when the text holds CJK ideographs, else 'en'."""
    return "zh" if _CJK.search(text) else "en"


def score(example: Example, completion: str) -> dict:
    """Rule-based checks of a model's completion (the text after the prompt, `<think>` included or
    pre-filled): correct answer, R1 format (one think block then a boxed answer), language consistency."""
    body = completion.split(EOS)[0]
    if body.lstrip().startswith(THINK):
        body = body.lstrip()[len(THINK):]
    fmt = body.count(END_THINK) == 1 and THINK not in body and extract_boxed(body.split(END_THINK)[-1]) is not None
    thought, _, final = body.partition(END_THINK)
    lang_ok = language_of(body) == example.lang
    return {"correct": check_answer(final if fmt else body, example.value), "format": fmt, "language": lang_ok}
