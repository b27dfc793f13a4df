"""Answer extraction and equivalence on tricky answers."""

import pytest

from core.grading import answers_equal, extract_answer, extract_answer_with_rule, grade, to_number


@pytest.mark.parametrize("text, expected, rule", [
    ("so \\boxed{5}", "5", "boxed"),
    ("first \\boxed{3}, then corrected: \\boxed{7}.", "7", "boxed"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
    ("\\boxed{\\left\\{1, \\frac{2}{3}\\right\\}}", "\\left\\{1, \\frac{2}{3}\\right\\}", "boxed"),
    ("\\boxed{\\text{\\{a\\}}} done", "\\text{\\{a\\}}", "boxed"),
    ("3 + 4 = 7. The answer is 7 apples.\nNext", "7 apples", "phrase"),
    ("My final answer is: 3.5.", "3.5", "phrase"),
    ("We get 12, then 15 and finally 20", "20", "last-number"),
    ("unclosed \\boxed{12 and then 13", "13", "last-number"),
    ("I do not know.", None, "none"),
    ("", None, "none"),
])
def test_extract_answer(text, expected, rule):
    assert extract_answer_with_rule(text) == (expected, rule)
    assert extract_answer(text) == expected


@pytest.mark.parametrize("answer, value", [
    ("5", 5.0), ("-3.5", -3.5), ("1,234,567", 1234567.0), ("$5", 5.0), ("\\$12.50", 12.5),
    ("5 apples", 5.0), ("50%", 50.0), ("50\\%", 50.0), ("\\frac{1}{2}", 0.5), ("\\dfrac{3}{4}", 0.75),
    ("-\\frac{1}{4}", -0.25), ("3/4", 0.75), ("x = 12", 12.0), ("12 \\text{ cm}", 12.0),
    ("90^\\circ", 90.0), (".5", 0.5),
])
def test_to_number_reads_single_numbers(answer, value):
    assert to_number(answer) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("answer", ["x + 1", "1, 2", "3 - 4", "\\sqrt{2}", "abc", "5/0", "\\frac{1}{0}"])
def test_to_number_refuses_non_numbers(answer):
    assert to_number(answer) is None


@pytest.mark.parametrize("answer, reference, equal", [
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("\\dfrac{1}{3}", "0.33333", True),     # within the relative tolerance 1e-4
    ("0.333", "1/3", False),                # outside it
    ("1,000", "1000", True),
    ("$5", "5", True),
    ("5 apples", "5", True),
    ("6", "5", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),      # symbolic, via math-verify
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+1", "(x+1)^2", False),
    ("\\text{yes}", "yes", True),
    ("\\text{no}", "yes", False),
])
def test_answers_equal(answer, reference, equal):
    assert answers_equal(answer, reference) is equal


def test_grade_reports_extraction_and_rule():
    g = grade("Adding: 17 + 25 = 42. So \\boxed{42}.", "42")
    assert (g.extracted, g.correct, g.rule) == ("42", True, "boxed")
    g = grade("The result is 41.", "42")
    assert (g.extracted, g.correct, g.rule) == ("41", False, "last-number")
    g = grade("no idea", "42")
    assert (g.extracted, g.correct, g.rule) == (None, False, "none")


def test_grade_survives_garbage_for_math_verify():
    # Unbalanced LaTeX must not raise: it is just not equal.
    assert grade("\\boxed{\\frac{{1}{2}", "1/2").correct is False


def test_grade_in_a_worker_thread():
    # math-verify's signal-based timeout only works in the main thread; grading must still work.
    import threading
    results = []
    thread = threading.Thread(target=lambda: results.append(grade("\\boxed{2\\sqrt{2}}", "\\sqrt{8}")))
    thread.start()
    thread.join()
    assert results[0].correct is True
