"""Synthetic reasoning tasks: determinism, correct answers and traces, splits, checker, R1 chat format."""

import re

import pytest

from mlx_deepseek.chat import ASSISTANT, BOS, END_THINK, EOS, THINK, USER
from mlx_deepseek.train import tasks


def true_value(p: tasks.Problem) -> int:
    """The answer computed independently of Problem.answer."""
    o = p.operands
    if p.kind == "add":
        return o[0] + o[1]
    if p.kind == "sub":
        return o[0] - o[1]
    if p.kind == "mul":
        return o[0] * o[1]
    if p.kind == "cmp":
        return o[0] if o[0] > o[1] else o[1]
    if p.kind == "count_letter":
        return sum(1 for i in o[1:] if i == o[0])
    return len(o)


def test_deterministic_by_seed_and_random_access():
    a = [e.text for e in tasks.generate(60, seed=3)]
    assert a == [e.text for e in tasks.generate(60, seed=3)]
    assert a != [e.text for e in tasks.generate(60, seed=4)]
    assert tasks.example_at(17, seed=3).text == a[17]
    assert [e.text for e in tasks.generate(5, seed=3, start=10)] == a[10:15]


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_every_answer_is_true_and_parsed(split):
    seen = set()
    for ex in tasks.generate(600, split, seed=1):
        value = true_value(ex.problem)
        seen.add(ex.problem.kind)
        assert ex.value == str(value)
        assert tasks.extract_boxed(ex.answer) == str(value)
        assert tasks.check_answer(ex.completion, str(value))
        assert not tasks.check_answer(ex.completion, str(value + 1))
        assert tasks.score(ex, ex.completion) == {"correct": True, "format": True, "language": True}
        assert str(value) in ex.trace.splitlines()[-1]  # the trace ends by stating the result
    assert seen == {"add", "sub", "mul", "cmp", "count_letter", "count_items"}


def test_column_traces_are_right_digit_by_digit():
    """Each column line is true arithmetic, and the written digits (then the final carry) spell the result."""
    line = re.compile(r"^(\d) ([-+×]) (\d) ([-+]) (\d)(?: \+ 10)? = (\d+)[,，] ?(?:write|写) (\d)[,，] ?(?:carry|borrow|进|借) (\d)$")
    for ex in tasks.generate(400, "train", seed=2, kinds=("add", "sub", "mul")):
        a, b = ex.problem.operands
        digits, final_carry = [], ""
        for text in ex.trace.splitlines():
            m = line.match(text)
            if m:
                x, op, y, _, c, s, w, out = m.groups()
                x, y, c, s, w = map(int, (x, y, c, s, w))
                if op == "+":
                    assert x + y + c == s and w == s % 10 and int(out) == s // 10
                elif op == "×":
                    assert x * y + c == s and w == s % 10 and int(out) == s // 10
                else:
                    d = x - y - c
                    assert s == (d + 10 if d < 0 else d) == w and int(out) == (d < 0)
                digits.append(str(w))
            elif re.search(r"(final carry|最后写下进位) (\d)", text):
                final_carry = text.split()[-1]
        result = int(final_carry + "".join(reversed(digits)))
        expect = abs(a - b) if ex.problem.kind == "sub" else true_value(ex.problem)
        assert result == expect, ex.text


def test_heldout_and_train_share_no_problem():
    train = {e.problem.key for e in tasks.generate(3000, "train", seed=0)}
    heldout = {e.problem.key for e in tasks.generate(800, "heldout", seed=0)}
    other_seed = {e.problem.key for e in tasks.generate(800, "heldout", seed=9)}
    assert heldout and not train & heldout and not train & other_seed
    for e in tasks.generate(200, "heldout", seed=0):
        assert tasks.split_of(e.problem) == "heldout" and tasks.is_heldout(e.problem)


def test_hard_split_has_more_digits_than_train():
    for kind in tasks.KINDS:
        train_max = max(e.problem.level for e in tasks.generate(300, "train", seed=0, kinds=(kind,)))
        hard_min = min(e.problem.level for e in tasks.generate(100, "hard", seed=0, kinds=(kind,)))
        assert hard_min > train_max
    add_train = max(max(e.problem.operands) for e in tasks.generate(300, "train", kinds=("add",)))
    add_hard = min(max(e.problem.operands) for e in tasks.generate(100, "hard", kinds=("add",)))
    assert len(str(add_hard)) > len(str(add_train))


def test_pretraining_beyond_the_training_levels_stays_on_the_train_side():
    """`beyond` examples: train-side problems at exactly the hard levels, never a problem of the heldout or hard
    split; the hard split is held-out-side only."""
    beyond = [tasks.example_at(i, "train", 0, beyond=True) for i in range(400)]
    hard = list(tasks.generate(300, "hard", seed=0))
    assert all(tasks.is_heldout(e.problem) and tasks.split_of(e.problem) == "hard" for e in hard)
    assert all(tasks.split_of(e.problem) == "train" for e in beyond)
    for kind in tasks.KINDS:
        hi = tasks.TRAIN_LEVELS[kind][1]
        levels = {e.problem.level for e in beyond if e.problem.kind.startswith(kind)}
        assert levels == set(range(hi + 1, hi + tasks.HARD_EXTRA + 1)), (kind, levels)
    # a stream of its own: the example beyond at a position is not the ordinary one at it
    assert beyond[0].problem != tasks.example_at(0, "train", 0).problem
    with pytest.raises(ValueError, match="only train-side"):
        tasks.example_at(0, "heldout", 0, beyond=True)


def test_languages_and_trace_in_prompt_language():
    cjk = re.compile(r"[\u4e00-\u9fff]")
    langs = set()
    for ex in tasks.generate(300, seed=5):
        langs.add(ex.lang)
        has = bool(cjk.search(ex.prompt)), bool(cjk.search(ex.trace)), bool(cjk.search(ex.answer))
        assert has == ((True,) * 3 if ex.lang == "zh" else (False,) * 3), ex.text
    assert langs == {"en", "zh"}
    only_en = {e.lang for e in tasks.generate(50, langs=("en",))}
    assert only_en == {"en"}


def test_r1_chat_format():
    ex = tasks.example_at(0, seed=0)
    assert ex.text == f"{BOS}{USER}{ex.prompt}{ASSISTANT}{THINK}\n{ex.trace}\n{END_THINK}\n\n{ex.answer}{EOS}"
    assert ex.text == ex.prompt_text + ex.completion
    assert list(tasks.chat_texts(3, seed=0)) == [e.text for e in tasks.generate(3, seed=0)]


def test_checker():
    assert tasks.extract_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert tasks.extract_boxed("no box") is None and tasks.extract_boxed(r"\boxed{12") is None
    assert tasks.check_answer(r"The answer is \boxed{1,234}.", "1234")
    assert tasks.check_answer(r"\boxed{ +0042 }", "42")
    assert tasks.check_answer(r"答案是 \boxed{１２}。", "12")
    assert tasks.check_answer(r"\boxed{-7}", "-7") and not tasks.check_answer(r"\boxed{7}", "-7")
    assert not tasks.check_answer(r"\boxed{1} then \boxed{2}", "1")  # the last box counts
    ex = next(e for e in tasks.generate(20, seed=0) if e.lang == "en")
    assert tasks.score(ex, "no think block, " + ex.answer)["format"] is False
    assert tasks.score(ex, ex.completion.replace(ex.trace, "这是中文"))["language"] is False
    assert tasks.score(ex, ex.completion.replace(ex.value + "}", "0}"))["correct"] is (ex.value == "0")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        next(tasks.generate(1, "test"))
    with pytest.raises(ValueError, match="kind"):
        next(tasks.generate(1, kinds=("division",)))
