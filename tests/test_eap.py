"""The EAP engine against finite differences of real edge ablation, and its invariances."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ablation import finite_difference_scores
from core.adapters import NonAdditiveModelError, UnsupportedArchitectureError, adapter_for
from core.eap import InvalidSampleError, NonFiniteScoreError, Sample, forward_loss, score_samples
from core.graph import ResidualGraph
from core.settings import ScoreSettings
from tiny_models import ARCHITECTURES, VOCAB, random_samples, tiny_model


@pytest.mark.parametrize("granularity", ["qkv", "module"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_edge_equals_finite_difference_of_ablation(architecture, granularity):
    model = tiny_model(architecture, seed=ARCHITECTURES.index(architecture))
    sample = random_samples(1, seed=3, min_answer=6)[0]
    result = score_samples(model, [sample], ScoreSettings(granularity=granularity))
    graph = result.graph
    assert graph.n_edges == (4 if granularity == "qkv" else 2) * 4 + 3 * 2 + 1
    edges = list(zip(*np.nonzero(graph.real_edge_mask)))
    reference = finite_difference_scores(model, sample, graph, edges)
    scores = result.scores[0]
    assert scores.dtype == np.float64
    for (s, d), expected in reference.items():
        error = abs(scores[s, d] - expected)
        assert error <= 1e-6 * abs(expected) or error <= 1e-9, (
            f"{graph.src_names[s]}->{graph.dst_names[d]}: eap {scores[s, d]!r} vs fd {expected!r}")
    # Non-edges are structural zeros.
    assert not scores[~graph.real_edge_mask].any()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_qkv_slots_sum_to_module_slot(architecture):
    model = tiny_model(architecture)
    samples = random_samples(2, seed=5)
    qkv = score_samples(model, samples, ScoreSettings(granularity="qkv"))
    module = score_samples(model, samples, ScoreSettings(granularity="module"))
    np.testing.assert_allclose(qkv.graph.to_module(qkv.scores), module.scores, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(qkv.loss, module.loss, rtol=1e-12)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sources_of_a_slot_sum_to_about_zero(architecture):
    """Norms ignore the scale of their input (up to eps), so scaling H_d down a little changes
    nothing: each slot's scores over its real sources add up to ~0."""
    model = tiny_model(architecture)
    scores = score_samples(model, random_samples(1, seed=7), ScoreSettings()).scores[0]
    column_sums = scores.sum(axis=0)
    assert np.all(np.abs(column_sums) <= 1e-3 * np.abs(scores).max())
    assert np.abs(scores).max() > 1e-2


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_padded_batch_equals_samples_one_at_a_time(architecture):
    model = tiny_model(architecture, dtype=torch.float32)
    samples = random_samples(4, seed=11)
    assert len({s.n_tokens for s in samples}) > 1, "the batch must need padding"
    batched = score_samples(model, samples, ScoreSettings(batch_size=4))
    single = score_samples(model, samples, ScoreSettings(batch_size=1))
    assert batched.sample_ids == [s.id for s in samples]
    scale = np.abs(single.scores).max()
    np.testing.assert_allclose(batched.scores, single.scores, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(batched.loss, single.loss, rtol=1e-5)


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_narrow_dtype_mean_abs_score_within_two_percent_of_float32(narrow):
    samples = random_samples(4, seed=13, min_prompt=20, max_prompt=30, min_answer=20, max_answer=30)
    means = {}
    for dtype in (torch.float32, narrow):
        model = tiny_model("llama", n_layers=4, hidden=64, dtype=dtype, seed=2)
        result = score_samples(model, samples, ScoreSettings(batch_size=2))
        assert result.scores.dtype == np.float32  # accumulated in float32 whatever the model dtype
        means[dtype] = np.abs(result.scores).mean()
    assert abs(means[narrow] / means[torch.float32] - 1) < 0.02, means


def test_loss_is_mean_nll_of_the_kept_answer_tokens():
    model = tiny_model("llama")
    sample = Sample("x", (5, 6, 7), (8, 9, 10, 11), t_cut=3)
    with torch.no_grad(), adapter_for(model).exact_precision(model):
        logits = model(torch.tensor([[5, 6, 7, 8, 9]])).logits[0]
        log_probs = torch.log_softmax(logits, -1)
        expected = -(log_probs[2, 8] + log_probs[3, 9] + log_probs[4, 10]) / 3
        assert torch.isclose(forward_loss(model, [sample])[0], expected, rtol=1e-12)
    assert score_samples(model, [sample]).loss[0] == pytest.approx(float(expected), rel=1e-12)


def test_weights_stay_frozen_and_state_is_restored():
    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    model.train()
    score_samples(model, random_samples(1))
    assert all(p.grad is None for p in model.parameters())
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad and model.training


def test_additivity_check_refuses_a_broken_residual():
    model = tiny_model("llama", n_layers=3)
    # A scaled residual after layer 0: a1's input is no longer the sum of module outputs.
    model.model.layers[0].register_forward_hook(lambda module, args, output: output * 1.1)
    with pytest.raises(NonAdditiveModelError, match=r"LlamaForCausalLM.*'a1'"):
        score_samples(model, random_samples(1))


def test_unsupported_architecture_is_named():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM is not supported"):
        score_samples(model, random_samples(1))


@pytest.mark.parametrize("dtype, advice", [
    (torch.float32, "Score in float64 (--dtype float64) to see whether float32 overflows"),
    (torch.float64, "Check the model's weights for NaN/inf"),
    (torch.bfloat16, "score in float32")])
def test_non_finite_scores_name_the_sample_and_advise_by_dtype(dtype, advice):
    model = tiny_model("llama", dtype=dtype)
    model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteScoreError, match="s0") as raised:
        score_samples(model, random_samples(1))
    assert advice in str(raised.value)
    if dtype != torch.bfloat16:
        assert "float32 (" not in str(raised.value)


@pytest.mark.parametrize("bad, shown", [
    (dict(t_cut=0), "t_cut=0"), (dict(t_cut=5), "t_cut=5"), (dict(prompt_ids=()), "prompt_ids is empty"),
    (dict(t_cut=1.9), "t_cut = 1.9 is not an integer"), (dict(t_cut=2.0), "t_cut = 2.0"),
    (dict(t_cut=True), "t_cut = True"), (dict(prompt_ids=(1, "2")), "prompt_ids[1] = '2'"),
    (dict(answer_ids=(3, -4, 5)), "answer_ids[1] = -4"), (dict(answer_ids=(3, 4.0, 5)), "answer_ids[1] = 4.0"),
    (dict(prompt_ids=(1, False)), "prompt_ids[1] = False")])
def test_bad_samples_are_refused_naming_sample_and_value(bad, shown):
    fields = dict(id="q7", prompt_ids=(1, 2), answer_ids=(3, 4, 5), t_cut=2) | bad
    with pytest.raises(InvalidSampleError, match="q7") as raised:
        Sample(**fields)
    assert shown in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_numpy_integer_ids_are_accepted():
    sample = Sample("np", tuple(np.array([1, 2], dtype=np.int64)), tuple(np.array([3, 4], dtype=np.int32)),
                    np.int64(2))
    assert score_samples(tiny_model("llama"), [sample]).loss[0] > 0


@pytest.mark.parametrize("field", ["prompt_ids", "answer_ids"])
def test_ids_outside_the_vocabulary_are_refused_before_any_model_work(field):
    model = tiny_model("llama")
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    good = Sample("fine", (1, 2), (3, 4), 2)
    fields = dict(id="q9", prompt_ids=(1, 2), answer_ids=(3, 4), t_cut=2) | {field: (5, VOCAB)}
    with pytest.raises(InvalidSampleError, match=rf"'q9': {field}\[1\] = {VOCAB} is outside the model's "
                                                 rf"vocabulary \(ids 0 to {VOCAB - 1}\)"):
        score_samples(model, [good, Sample(**fields)])
    assert not calls


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_measures_equal_their_definitions(architecture):
    """Logit-gradient norm ||(p - onehot(y)) / T_cut||, the gradient norm at the final residual, and
    the mean L2 norm of the final residual, each computed here by plain autograd, per sample."""
    model = tiny_model(architecture, seed=3)
    samples = random_samples(3, seed=41)
    result = score_samples(model, samples, ScoreSettings(batch_size=3))
    adapter = adapter_for(model)
    for i, sample in enumerate(samples):
        final = {}

        def leaf(module, args):
            final["h"] = args[0].detach().requires_grad_(True)
            return (final["h"],) + args[1:]
        handle = adapter.final_norm(model).register_forward_pre_hook(leaf)
        try:
            with adapter.exact_precision(model):
                logits = model(torch.tensor([sample.input_ids])).logits[0]
        finally:
            handle.remove()
        first = len(sample.prompt_ids) - 1
        scored = logits[first:first + sample.t_cut]
        targets = torch.tensor(sample.answer_ids[:sample.t_cut])
        probs = torch.softmax(scored, -1) - nn.functional.one_hot(targets, VOCAB)
        assert result.logit_grad_norm[i] == pytest.approx(float(probs.detach().norm() / sample.t_cut),
                                                      rel=1e-10)
        loss = nn.functional.cross_entropy(scored, targets)
        (grad,) = torch.autograd.grad(loss, final["h"])
        assert result.logits_slot_grad_norm[i] == pytest.approx(float(grad.norm()), rel=1e-10)
        assert result.residual_norm[i] == pytest.approx(float(final["h"].detach().norm(dim=-1).mean()), rel=1e-12)
        assert result.loss[i] == pytest.approx(float(loss), rel=1e-12)


def test_empty_selection_is_refused():
    with pytest.raises(ValueError, match="no samples"):
        score_samples(tiny_model("llama"), [])


def test_cli_round_trips_a_jsonl_file(tmp_path):
    model = tiny_model("qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    samples = random_samples(3, seed=17)
    lines = [json.dumps({"id": s.id, "prompt_ids": list(s.prompt_ids), "answer_ids": list(s.answer_ids),
                         "t_cut": s.t_cut}) for s in samples]
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.npz"
    completed = subprocess.run(
        [sys.executable, "-m", "core", "score", "--model", str(tmp_path / "model"),
         "--samples", str(tmp_path / "samples.jsonl"), "--out", str(out), "--batch-size", "2"],
        capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    saved = np.load(out)
    graph = ResidualGraph(2, "qkv")
    assert saved["scores"].shape == (3, graph.n_src, graph.n_dst) and saved["scores"].dtype == np.float32
    assert list(saved["src_names"]) == list(graph.src_names)
    assert list(saved["dst_names"]) == list(graph.dst_names)
    np.testing.assert_array_equal(saved["real_edge_mask"], graph.real_edge_mask)
    assert list(saved["sample_ids"]) == ["s0", "s1", "s2"]
    direct = score_samples(model, samples)
    np.testing.assert_allclose(saved["scores"], direct.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(saved["loss"], direct.loss, rtol=1e-5)


def test_cli_names_a_missing_model(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"id": 1, "prompt_ids": [1], "answer_ids": [2], "t_cut": 1}\n')
    completed = subprocess.run(
        [sys.executable, "-m", "core", "score", "--model", str(tmp_path / "nowhere"),
         "--samples", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o.npz")],
        capture_output=True, text=True)
    assert completed.returncode == 2
    assert "nowhere" in completed.stderr
