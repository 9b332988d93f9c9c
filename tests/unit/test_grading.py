"""Answer extraction and grading (vigos_ray/grading.py) on the cases evaluation meets."""

from __future__ import annotations

import pytest

from vigos_ray.grading import extract_answer, grade

EXTRACT = [
    ("<think>so</think>\\boxed{circle}", "circle"),
    ("first \\boxed{1} then \\boxed{2}", "2"),  # the last box
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\boxed{3} and a cut-off \\boxed{\\frac{1}{", "3"),  # an unclosed last box: the complete one before it
    ("<answer> blue </answer>", "blue"),  # no box: the <answer> tag
    ("<answer>a</answer> \\boxed{b}", "b"),  # a box wins over a tag
    ("the answer is probably red", None),  # unparseable: never guessed
    ("\\boxed{", None),
]


@pytest.mark.parametrize("response,expected", EXTRACT)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


GRADE = [
    ("Circle", "circle", None, True),
    ("circle.", "circle", None, True),
    ("\\text{red}", "red", None, True),
    ("square", "circle", None, False),
    ("B", "B", ["cat", "dog", "cow"], True),
    ("(B)", "dog", ["cat", "dog", "cow"], True),  # letter against the option's text
    ("dog", "B", ["cat", "dog", "cow"], True),  # text against a letter
    ("B) dog", "B", ["cat", "dog", "cow"], True),
    ("C", "B", ["cat", "dog", "cow"], False),
    ("D", "D", ["cat", "dog", "cow"], False),  # no such option: never right
    ("1,000", "1000", None, True),
    ("2.50", "2.5", None, True),
    ("12%", "12", None, True),
    ("2.51", "2.5", None, False),
    ("\\frac{1}{2}", "0.5", None, True),  # math equivalence
    ("2\\sqrt{2}", "\\sqrt{8}", None, True),
    ("x^2+2x+1", "(x+1)^2", None, True),
    ("\\frac{1}{3}", "0.5", None, False),
    (None, "circle", None, False),  # unparseable is wrong
]


@pytest.mark.parametrize("pred,gold,choices,expected", GRADE)
def test_grade(pred, gold, choices, expected):
    assert grade(pred, gold, choices) is expected
