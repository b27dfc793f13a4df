"""W split by position group (first token, rest of the prompt, answer): the parts sum to W, and each
part is the derivative of ablating the edge at that group's positions only."""

import numpy as np
import pytest
import torch

from ablation import ablated_loss, source_outputs
from core.adapters import adapter_for
from core.eap import POSITION_GROUPS, Sample, score_samples
from core.settings import ScoreSettings
from tiny_models import ARCHITECTURES, random_samples, tiny_model


@pytest.mark.parametrize("granularity", ["qkv", "module"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_parts_sum_to_w_and_w_is_unchanged(architecture, granularity):
    model = tiny_model(architecture, seed=1)
    samples = random_samples(3, seed=19)
    assert len({s.n_tokens for s in samples}) > 1, "the batch must need padding"
    with_parts = score_samples(model, samples, ScoreSettings(granularity=granularity, batch_size=3))
    without = score_samples(model, samples, ScoreSettings(granularity=granularity, batch_size=3,
                                                          position_parts=False))
    parts = with_parts.position_parts
    assert parts.shape == (3, len(POSITION_GROUPS)) + with_parts.scores.shape[1:]
    assert parts.dtype == np.float64 and without.position_parts is None
    np.testing.assert_array_equal(parts.sum(axis=1), with_parts.scores)
    scale = np.abs(without.scores).max()
    np.testing.assert_allclose(with_parts.scores, without.scores, rtol=0, atol=1e-12 * scale)
    np.testing.assert_array_equal(with_parts.loss, without.loss)
    assert not parts[..., ~with_parts.graph.real_edge_mask].any()
    assert all(np.abs(parts[:, g]).max() > 1e-3 * scale for g in range(len(POSITION_GROUPS)))


def group_ablation_scores(model, sample: Sample, graph, group: int, eps: float = 1e-5) -> np.ndarray:
    """Central differences of L(H_d - e O_s) where O_s is removed at the group's positions only."""
    t0, t1 = sample.position_groups()[group]
    with adapter_for(model).exact_precision(model):
        sources = source_outputs(model, sample)
        for source in sources:
            source[:, :t0] = 0
            source[:, t1:] = 0
        scores = np.zeros((graph.n_src, graph.n_dst))
        for s, d in zip(*np.nonzero(graph.real_edge_mask)):
            scores[s, d] = (ablated_loss(model, sample, graph, s, d, eps, sources)
                            - ablated_loss(model, sample, graph, s, d, -eps, sources)) / (2 * eps)
    return scores


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_each_part_is_the_derivative_of_ablating_its_positions_only(architecture):
    model = tiny_model(architecture, seed=2)
    sample = random_samples(1, seed=23, min_prompt=4, min_answer=5)[0]
    sample = Sample(sample.id, sample.prompt_ids, sample.answer_ids, t_cut=4)
    result = score_samples(model, [sample], ScoreSettings(granularity="qkv"))
    for group, name in enumerate(POSITION_GROUPS):
        expected = group_ablation_scores(model, sample, result.graph, group)
        part = result.position_parts[0, group]
        error = np.abs(part - expected)
        assert np.all(error <= 1e-6 * np.abs(expected) + 1e-9), (name, error.max())


def test_empty_groups_give_zero_parts():
    model = tiny_model("llama")
    # One prompt token: no rest of the prompt. t_cut = 1: no answer token is an input.
    sample = Sample("one", (5,), (8, 9), t_cut=1)
    result = score_samples(model, [sample])
    parts = result.position_parts[0]
    assert np.abs(parts[0]).max() > 0
    assert not parts[1].any() and not parts[2].any()
    np.testing.assert_array_equal(parts[0], result.scores[0])


def test_narrow_dtype_parts_sum_to_its_scores():
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    result = score_samples(model, random_samples(2, seed=29), ScoreSettings(batch_size=2))
    assert result.position_parts.dtype == np.float32
    np.testing.assert_array_equal(result.position_parts.sum(axis=1), result.scores)
