"""Answer extraction and correctness grading (docs/method.md section 5).

The answer is the content of the last \\boxed{...} (braces may nest); without one, the text after
"the answer is" / "final answer is", else the last number in the text. Two answers are equivalent if
they are numerically equal (relative tolerance 1e-4, after stripping units, currency, commas and
percent signs, and reading fractions) or symbolically equal by math-verify.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from fractions import Fraction

RELATIVE_TOLERANCE = 1e-4
# math-verify guards its sympy work with signal.alarm, which only works in the main thread.
MATH_VERIFY_TIMEOUT_S = 5

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_PHRASE_RE = re.compile(r"(?:final answer is|the answer is)\s*:?\s*(.+)", re.IGNORECASE)
_FRAC_RE = re.compile(r"^([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
# "x = 5": the value is the right-hand side.
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z]\w*\s*=\s*(.+)$")
_SLASH_FRAC_RE = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")
# Wrappers and decorations that do not change a numeric value.
_DECORATIONS = (r"\$", r"\\\$", r"\\!", r"\\,", r"\\;", r"\\ ", r"\\left", r"\\right",
                r"\\text\{[^{}]*\}", r"\\mathrm\{[^{}]*\}", r"\\%", "%", r"\^\{?\\circ\}?",
                r"\\circ", r"\\displaystyle")


@dataclasses.dataclass(frozen=True)
class Grade:
    extracted: str | None
    correct: bool
    # How the answer was found: boxed, phrase, last-number or none.
    rule: str


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, matching nested braces; None if absent or
    unclosed."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_answer_with_rule(text: str) -> tuple[str | None, str]:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    phrases = list(_PHRASE_RE.finditer(text))
    if phrases:
        # The phrase's answer runs to the end of its sentence or line.
        answer = re.split(r"(?<!\d)\.(?!\d)|\n", phrases[-1].group(1), maxsplit=1)[0].strip()
        if answer:
            return answer.rstrip(".").strip(), "phrase"
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1], "last-number"
    return None, "none"


def extract_answer(text: str) -> str | None:
    return extract_answer_with_rule(text)[0]


def to_number(answer: str) -> float | None:
    """The numeric value of an answer like '5', '-3.5', '1,234', '$5', '5 apples', '50%', '\\frac{1}{2}',
    '3/4'; None if it is not a single number (an expression, several numbers, words only)."""
    s = answer.strip()
    for pattern in _DECORATIONS:
        s = re.sub(pattern, " ", s)
    s = s.strip().rstrip(".").strip()
    assignment = _ASSIGNMENT_RE.match(s)
    if assignment:
        s = assignment.group(1).strip()
    frac = _FRAC_RE.match(s.replace(" ", ""))
    if frac:
        sign, num, den = frac.group(1), to_number(frac.group(2)), to_number(frac.group(3))
        if num is None or den in (None, 0):
            return None
        return -num / den if sign == "-" else num / den
    slash = _SLASH_FRAC_RE.match(s)
    if slash:
        num, den = (float(Fraction(g.replace(",", ""))) for g in slash.groups())
        return None if den == 0 else num / den
    # A number followed by words ("5 apples", "12 dollars") counts as that number; a number among
    # other numbers or operators does not.
    numbers = _NUMBER_RE.findall(s)
    if len(numbers) != 1:
        return None
    rest = s.replace(numbers[0], " ", 1)
    if re.search(r"[\d=+*/^\\<>-]", rest):
        return None
    value = float(numbers[0].replace(",", ""))
    return value if math.isfinite(value) else None


def numbers_equal(a: float, b: float, rel_tol: float = RELATIVE_TOLERANCE) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0) or a == b


def _symbolically_equal(answer: str, reference: str) -> bool:
    """math-verify's verdict; False if it fails or times out."""
    try:
        from math_verify import parse, verify
        # signal-based timeouts only work in the main thread; elsewhere run without them.
        timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        gold = parse(f"${reference}$", parsing_timeout=timeout)
        target = parse(f"${answer}$", parsing_timeout=timeout)
        if not gold or not target:
            return False
        return bool(verify(gold, target, timeout_seconds=timeout))
    except Exception:  # math-verify raises many kinds on odd input (sympy, timeouts); not equal then
        return False


def answers_equal(answer: str, reference: str) -> bool:
    a, r = to_number(answer), to_number(reference)
    if a is not None and r is not None:
        return numbers_equal(a, r)
    if _normalise_text(answer) == _normalise_text(reference):
        return True
    return _symbolically_equal(answer, reference)


def _normalise_text(s: str) -> str:
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def grade(text: str, reference: str) -> Grade:
    """Grade a model's answer text against a reference answer."""
    extracted, rule = extract_answer_with_rule(text)
    correct = extracted is not None and answers_equal(extracted, str(reference))
    return Grade(extracted, correct, rule)
