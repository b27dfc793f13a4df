"""Selection and truncation rules (docs/method.md section 5) on hand-made answer lengths."""

import math

import pytest

from core.selection import (RULES, Candidate, EmptySelectionError, NoJointlyCorrectError,
                            select_questions, t_cut)
from core.settings import SelectionSettings, SettingsError


def pair(qid, base_len, post_len, correct=(True, True), prompts=(10, 10)):
    return Candidate(qid, (base_len, post_len), prompts, correct)


def test_t_bar_is_the_smaller_model_mean_over_jointly_correct_questions():
    candidates = [pair("a", 100, 120), pair("b", 100, 80), pair("c", 5000, 5000, (True, False))]
    selection = select_questions(candidates, SelectionSettings(n=10))
    # base mean 100, post mean 100 -> 100; "c" (post wrong) must not count.
    assert selection.t_bar == 100.0
    assert selection.removed[RULES[0]] == 1


def test_length_window_uses_floor_of_beta_and_gamma_times_t_bar():
    # Base lengths 10, 11, 12 and post the same: T_bar = 11, window [floor(5.5), floor(16.5)] = [5, 16].
    lengths = [10, 11, 12, 5, 16, 4, 17]
    candidates = [pair(f"q{i}", n, n) for i, n in enumerate(lengths)]
    t_bar = sum(lengths) / len(lengths)
    selection = select_questions(candidates, SelectionSettings(n=100, beta=0.5, gamma=1.5, delta=0.5))
    assert selection.t_bar == pytest.approx(t_bar)
    low, high = math.floor(0.5 * t_bar), math.floor(1.5 * t_bar)
    assert selection.window == (low, high)
    kept = {c.question_id for c in candidates if low <= c.answer_lengths[0] <= high}
    assert set(selection.question_ids) == kept
    assert selection.removed[RULES[1]] == len(lengths) - len(kept)


def test_relative_length_difference_above_delta_is_dropped():
    # |100 - 60| / 80 = 0.5 (kept at delta 0.5); |100 - 50| / 75 = 0.667 (dropped).
    candidates = [pair("same", 80, 80), pair("edge", 100, 60), pair("far", 100, 50)]
    selection = select_questions(candidates, SelectionSettings(n=10, beta=0.0, gamma=10.0, delta=0.5))
    assert selection.question_ids == ("same", "edge")
    assert selection.removed[RULES[2]] == 1


def test_prompt_lengths_must_match_only_when_tokenizer_and_template_are_shared():
    candidates = [pair("a", 50, 50), pair("b", 50, 50, prompts=(10, 12))]
    shared = select_questions(candidates, SelectionSettings(n=10), shared_prompt=True)
    assert shared.question_ids == ("a",)
    assert shared.removed[RULES[3]] == 1
    assert select_questions(candidates, SelectionSettings(n=10), shared_prompt=False).question_ids \
        == ("a", "b")


def test_draw_is_seeded_and_the_same_for_both_models():
    candidates = [pair(f"q{i}", 50, 50) for i in range(40)]
    first = select_questions(candidates, SelectionSettings(n=10, seed=42))
    again = select_questions(candidates, SelectionSettings(n=10, seed=42))
    other = select_questions(candidates, SelectionSettings(n=10, seed=7))
    assert first.question_ids == again.question_ids
    assert first.question_ids != other.question_ids
    assert len(first.question_ids) == 10 and len(set(first.question_ids)) == 10
    assert first.removed[RULES[4]] == 30


def test_fewer_than_n_survivors_are_reported_with_the_rule_that_removed_the_rest():
    candidates = [pair("ok", 50, 50), pair("ok2", 60, 60), pair("wrong", 50, 50, (False, True)),
                  pair("long", 200, 200), pair("mismatch", 60, 20)]
    selection = select_questions(candidates, SelectionSettings(n=5))
    assert selection.question_ids == ("ok", "ok2")
    report = selection.report()
    assert report["n_selected"] == selection.n_selected and report["n_requested"] == 5
    assert report["removed"][RULES[0]] == 1
    summary = selection.summary()
    assert "FEWER than n=5" in summary and "not correct for every model" in summary


def test_rules_that_leave_no_question_are_a_clear_error_naming_each_rule():
    candidates = [pair("ok", 50, 50), pair("long", 500, 500), pair("mismatch", 60, 20)]
    with pytest.raises(EmptySelectionError, match=r"no question survives the selection rules: of 3 "
                                                  r"answered correctly by every model, removed: 3 mean "
                                                  r"length outside .*length window \[\d+, \d+\]"):
        select_questions(candidates, SelectionSettings())


def test_beta_above_gamma_is_refused_as_a_setting():
    with pytest.raises(SettingsError, match=r"beta=2\.0 > gamma=1\.0 .* give beta <= gamma"):
        SelectionSettings(beta=2.0, gamma=1.0)


def test_no_jointly_correct_question_is_a_clear_error():
    candidates = [pair("a", 50, 50, (True, False)), pair("b", 50, 50, (False, True))]
    with pytest.raises(NoJointlyCorrectError, match=r"correct per model, base first: \[1, 1\]"):
        select_questions(candidates, SelectionSettings())


def test_series_rules_reduce_to_the_pair_rules_and_use_all_models():
    series = [Candidate("a", (100, 100, 100), (5, 5, 5), (True, True, True)),
              Candidate("b", (100, 100, 30), (5, 5, 5), (True, True, True)),
              Candidate("c", (100, 100, 100), (5, 5, 5), (True, True, False))]
    selection = select_questions(series, SelectionSettings(n=10, beta=0.0, gamma=10.0))
    # "b": spread (100 - 30) / 76.7 > 0.5; "c": the third model is wrong.
    assert selection.question_ids == ("a",)


def test_t_cut_is_floor_of_alpha_t_bar_and_at_least_one():
    assert t_cut(0.1, 255.0) == 25
    assert t_cut(0.03, 20.0) == 1  # floor(0.6) = 0 -> 1
    assert t_cut(0.5, 11.0) == 5
    with pytest.raises(SettingsError, match="alpha"):
        t_cut(0.0, 100.0)
