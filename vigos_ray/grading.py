"""Answer extraction and rule-based grading for evaluation (SPEC §9: last `\\boxed{}`, else `<answer>`).

`extract_answer` returns None when a response has no answer to read; such responses are counted as unparseable
and graded wrong, never guessed. `grade` compares one extracted answer with the reference:
- multiple choice (the record lists `choices`): the letter or the text of the chosen option, either way round;
- numbers: equal within a relative 1e-6 (commas, a trailing `%` or unit-free `.0` do not matter);
- math (LaTeX or expressions): `math-verify`'s symbolic equivalence;
- otherwise: exact match after lower-casing, trimming spaces and a final full stop, and `\\text{...}` unwrapped.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

BOXED = "\\boxed{"
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TEXT_WRAP = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")
NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces (nested ones included), or None."""
    start = text.rfind(BOXED)
    while start != -1:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(BOXED) : i - 1]
        start = text.rfind(BOXED, 0, start)  # unclosed: an earlier, complete box may still hold the answer
    return None


def extract_answer(response: str) -> str | None:
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    tags = ANSWER_TAG.findall(response)
    return tags[-1].strip() if tags else None


def normalize(text: str) -> str:
    text = TEXT_WRAP.sub(r"\1", text.strip())
    text = text.strip().strip("$").strip().rstrip(".").strip()
    return " ".join(text.lower().split())


def as_number(text: str) -> float | None:
    t = normalize(text).replace(",", "").rstrip("%").strip()
    return float(t) if NUMBER.match(t) else None


def choice_letter(text: str, choices: Sequence[str]) -> str | None:
    """The option letter `text` names: "B", "(B)", "B.", "B) its text", or the option's own text."""
    letters = string.ascii_uppercase[: len(choices)]
    t = text.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.):]?", t) or re.fullmatch(r"\(?([A-Z])[.):]\s+.+", t)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    by_text = {normalize(c): letter for c, letter in zip(choices, letters, strict=False)}
    return by_text.get(normalize(t))


def math_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        wrap = lambda s: s if "$" in s else f"${s}$"  # noqa: E731  math-verify reads LaTeX between $ signs
        return bool(verify(parse(wrap(gold)), parse(wrap(pred))))
    except Exception:  # an expression math-verify cannot parse is not equal
        return False


def grade(pred: str | None, gold: str, choices: Sequence[str] | None = None) -> bool:
    if pred is None:
        return False
    if choices:
        want = choice_letter(gold, choices)
        return want is not None and choice_letter(pred, choices) == want
    if normalize(pred) == normalize(gold):
        return True
    a, b = as_number(pred), as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    if a is None and b is None and not any(c in gold for c in "\\^_/=+*"):
        return False  # plain words that differ: no symbolic reading can make them equal
    return math_equal(pred, gold)
