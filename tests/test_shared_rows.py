"""Cuts of one answer scored in one forward pass (core.eap.shared_rows) against each cut scored alone:
scores, position parts and measures, in float64, on every architecture and memory plan, for EAP-IG and
the token view."""

import numpy as np
import pytest

import core.eap as eap
from core.eap import Sample, score_samples, shared_rows
from core.settings import ScoreSettings
from tiny_models import ARCHITECTURES, random_samples, tiny_model

MEASURES = ("loss", "logit_grad_norm", "logits_slot_grad_norm", "residual_norm")


def cuts(sample: Sample, t_cuts: tuple[int, ...]) -> list[Sample]:
    return [Sample(f"{sample.id}@{t}", sample.prompt_ids, sample.answer_ids, t) for t in t_cuts]


def test_a_cut_joins_the_row_of_a_longer_cut_while_that_costs_less():
    answer = tuple(range(20, 40))
    prompt = (1, 2, 3)
    # n_tokens = 3 + t_cut - 1: 22, 14, 7, 4 and, of another answer, 10.
    one = cuts(Sample("a", prompt, answer, 1), (12, 20, 2, 5))
    other = Sample("b", prompt, answer[::-1], 8)
    # 14 tokens cost 2 x 14 alone, more than one more backward pass over 22: it joins; 7 (2 x 7 <= 22)
    # starts a row, and 4 joins that (2 x 4 > 7).
    assert shared_rows(one + [other]) == [[0, 1], [2, 3], [4]]
    # Equal cuts of one answer share a row; equal cuts of different answers do not.
    twice = cuts(Sample("a", prompt, answer, 1), (5, 5))
    assert shared_rows(twice) == [[0, 1]]
    assert shared_rows([twice[0], Sample("c", prompt, answer[::-1], 5)]) == [[0], [1]]


def _samples() -> list[Sample]:
    """Two answers at four cuts each (rows of up to four samples) and a third answer at one cut."""
    first, second, third = random_samples(3, seed=31, min_prompt=6, max_prompt=8, min_answer=9,
                                          max_answer=12)
    samples = (cuts(first, (1, 3, 6, 9)) + cuts(second, (2, 5, 9)) + [third])
    assert max(len(row) for row in shared_rows(samples)) >= 3, "the test needs rows of several cuts"
    return samples


def _assert_equal_to_alone(model, samples, settings: ScoreSettings, answer_positions: bool = False):
    together = score_samples(model, samples, settings, answer_positions=answer_positions)
    alone = [score_samples(model, [s], settings, answer_positions=answer_positions) for s in samples]
    assert together.sample_ids == [s.id for s in samples]
    scale = np.abs(together.scores).max()
    assert scale > 1e-3
    for i, result in enumerate(alone):
        np.testing.assert_allclose(together.scores[i], result.scores[0], rtol=1e-10, atol=1e-12 * scale,
                                   err_msg=samples[i].id)
        parts = result.position_parts[0]
        np.testing.assert_allclose(together.position_parts[i, :len(parts)], parts, rtol=1e-10,
                                   atol=1e-12 * scale)
        assert not together.position_parts[i, len(parts):].any()
        for name in MEASURES:
            assert getattr(together, name)[i] == pytest.approx(getattr(result, name)[0], rel=1e-10), name


@pytest.mark.parametrize("granularity", ["qkv", "module"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cuts_sharing_a_forward_pass_equal_cuts_scored_alone(architecture, granularity):
    model = tiny_model(architecture, seed=ARCHITECTURES.index(architecture))
    _assert_equal_to_alone(model, _samples(), ScoreSettings(granularity=granularity, batch_size=2))


@pytest.mark.parametrize("checkpointing, source_buffer", [("layers", "device"), ("layers", "host"),
                                                          ("off", "host")])
def test_shared_rows_under_every_memory_plan(checkpointing, source_buffer, monkeypatch):
    # The checkpointed loss head runs in chunks of 3 answer tokens, so a cut ends inside a chunk.
    monkeypatch.setattr(eap, "LOSS_CHUNK", 3)
    model = tiny_model("llama", n_layers=3, seed=5)
    _assert_equal_to_alone(model, _samples(), ScoreSettings(batch_size=2, checkpointing=checkpointing,
                                                            source_buffer=source_buffer))


def test_shared_rows_for_eap_ig():
    model = tiny_model("qwen2", seed=6)
    _assert_equal_to_alone(model, _samples(), ScoreSettings(batch_size=3, method="eap-ig", ig_steps=3))


def test_shared_rows_in_the_token_view():
    model = tiny_model("gpt2", seed=7)
    _assert_equal_to_alone(model, _samples(), ScoreSettings(batch_size=2), answer_positions=True)
