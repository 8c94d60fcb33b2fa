"""Rule-based rewards on adversarial strings (nested tags, no box, several boxes, mixed scripts), numeric
tolerance, the pre-filled `<think>`, user reward files (a raising reward is NaN and counted), weights."""

import math

import numpy as np
import pytest

from mlx_deepseek.chat import EOS
from mlx_deepseek.train.rewards import (
    RewardSet, accuracy_reward, final_answer, format_reward, language_reward, language_share, parse_weights,
)

PREFILLED = {"prompt": "What is 2 + 3?", "answer": "5", "lang": "en", "prompt_text": "<｜Assistant｜><think>\n"}
PLAIN = {**PREFILLED, "prompt_text": "<｜Assistant｜>"}


@pytest.mark.parametrize("completion, expected", [
    ("2 + 3 = 5\n</think>\n\nThe answer is \\boxed{5}.", 1.0),
    ("</think>\\boxed{ 5 }", 1.0),  # spaces
    ("</think>\\boxed{+5.}", 1.0),  # a leading + and a trailing dot
    ("</think>\\boxed{６}", 0.0),
    ("</think>\\boxed{５}", 1.0),  # full-width digits
    ("</think>\\boxed{4} or maybe \\boxed{5}", 0.0),  # several boxes that disagree: hedging scores nothing
    ("</think>\\boxed{5} so \\boxed{5}", 1.0),  # several boxes that agree
    ("\\boxed{5}</think> no idea", 0.0),  # a box inside the reasoning is not the answer
    ("</think>The answer is 5.", 1.0),  # no box: the last number after the reasoning
    ("</think>The answer is 4, not 5, I mean 4", 0.0),
    ("</think>no number at all", 0.0),
    ("<think>a<think>b</think>c</think>\\boxed{5}", 1.0),  # nested tags: the answer follows the last </think>
    ("</think>\\boxed{5" + "}" * 0, 1.0),  # an unclosed box: falls back to the last number
    ("</think>\\boxed{5}" + EOS + "\\boxed{4}", 1.0),  # nothing after EOS counts
    ("</think>\\boxed{}", 0.0),
])
def test_accuracy(completion, expected):
    assert accuracy_reward(completion, PREFILLED) == expected


@pytest.mark.parametrize("got, want, ok", [
    ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("1,000", "1000", True), ("1000.0000001", "1000", True),
    ("1000.01", "1000", False), ("−7", "-7", True), ("abc", "abc", True), ("abc", "abd", False),
    pytest.param("9" * 400, "5", False, id="huge-vs-5"),  # beyond a float's range: compared exactly
    pytest.param("9" * 400 + "/3", "3" * 400, True, id="huge-fraction"),
    ("0.0000000000001", "0", True), ("0.00001", "0", False),  # the absolute tolerance near zero
])
def test_normalised_and_numeric_comparison(got, want, ok):
    assert accuracy_reward(f"</think>\\boxed{{{got}}}", {**PREFILLED, "answer": want}) == float(ok)


def test_nested_braces_in_a_box():
    assert final_answer("</think>\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


@pytest.mark.parametrize("completion, example, expected", [
    ("2 + 3 = 5\n</think>\n\n\\boxed{5}", PREFILLED, 1.0),  # the prompt pre-filled <think>
    ("<think>\n2 + 3 = 5\n</think>\n\n\\boxed{5}", PLAIN, 1.0),
    ("2 + 3 = 5\n</think>\n\n\\boxed{5}", PLAIN, 0.0),  # no <think> at all
    ("<think>\n2 + 3 = 5\n</think>\n\n\\boxed{5}", PREFILLED, 0.0),  # a second <think> (nested)
    ("a<think>b</think>c</think>\\boxed{5}", PREFILLED, 0.0),  # nested tags
    ("2 + 3 = 5\n</think>\n\nfive", PREFILLED, 0.0),  # no box
    ("2 + 3 = 5\n</think>\n\n", PREFILLED, 0.0),  # no answer
    ("\n</think>\\boxed{5}", PREFILLED, 0.0),  # empty reasoning
    ("2 + 3 = 5 \\boxed{5}", PREFILLED, 0.0),  # never closed
    ("x</think>\\boxed{5}</think>", PREFILLED, 0.0),  # a second </think>
    ("2 + 3 = 5\n</think>\n\n\\boxed{5}" + EOS, PREFILLED, 1.0),
    ("x</think>\\boxed{4} \\boxed{5}", PREFILLED, 1.0),  # format only: several boxes are still the format
])
def test_format(completion, example, expected):
    assert format_reward(completion, example) == expected


def test_language_share_of_words_in_the_reasoning():
    zh = {**PREFILLED, "lang": "zh"}
    assert language_reward("先算 3 + 4 = 7，写 7\n</think>\\boxed{7}", zh) == 1.0
    assert language_reward("先算 3 + 4 = 7, write 7\n</think>\\boxed{7}", zh) == pytest.approx(2 / 3)
    assert language_reward("先算 3 + 4 = 7, write 7\n</think>\\boxed{7}", PREFILLED) == pytest.approx(1 / 3)
    assert language_reward("Add 3 and 4</think>答案是 \\boxed{7}", PREFILLED) == 1.0  # the answer is not reasoning
    assert language_reward("3 + 4 = 7</think>", PREFILLED) == 0.0  # no words
    assert language_share("mixed 中文 and English", "en") == pytest.approx(3 / 5)
    # the target language comes from the prompt when the row has no `lang`
    assert language_reward("计算</think>", {"prompt": "计算 3 + 4。", "answer": "7", "prompt_text": "<think>"}) == 1.0


def test_reward_file_weights_and_a_reward_that_raises(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(
        "def length_penalty(completion, example):\n    return -len(completion) / 100\n\n"
        "def fragile(completion, example):\n    if 'boom' in completion:\n        raise RuntimeError('boom')\n"
        "    return 1.0\n\n"
        "def abstain(completion, example):\n    return None\n\n"
        "def _helper():\n    pass\n"
    )
    rs = RewardSet.build(parse_weights(["accuracy=1", "fragile=0.5", "length_penalty=0.1", "abstain"]), path)
    assert rs.names == ["accuracy", "fragile", "length_penalty", "abstain"]
    np.testing.assert_allclose(rs.weight_vector, [1.0, 0.5, 0.1, 1.0])
    table = rs.score(["</think>\\boxed{5}", "</think>boom"], [PREFILLED, PREFILLED])
    assert table.shape == (2, 4)
    assert table[0, 0] == 1.0 and table[0, 1] == 1.0 and table[1, 0] == 0.0
    assert math.isnan(table[1, 1]) and np.isnan(table[:, 3]).all()  # raised / returned None: NaN
    assert rs.errors == {"fragile": 1} and "boom" in rs.last_error["fragile"]
    assert "fragile" in capsys.readouterr().err
    rs.score(["boom", "boom"], [PREFILLED, PREFILLED])
    assert rs.errors == {"fragile": 3}


def test_reward_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown reward"):
        RewardSet.build({"nope": 1.0})
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_weights(["accuracy=high"])
    with pytest.raises(FileNotFoundError):
        RewardSet.build({"accuracy": 1.0}, tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="no reward function"):
        RewardSet.build({"accuracy": 1.0}, tmp_path / "empty.py")


@pytest.mark.parametrize("answer, got, expected", [
    ("12345", "12345", 1.0), ("12345", "12355", 0.8), ("12345", "2345", 0.8), ("-12", "12", 2 / 3), ("12", "x", 0.0),
])
def test_digits_partial_credit(answer, got, expected):
    from mlx_deepseek.train.rewards import digits_reward

    assert digits_reward(f"</think>\\boxed{{{got}}}", {**PREFILLED, "answer": answer}) == pytest.approx(expected)
