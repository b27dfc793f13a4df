"""Long-answer memory plans keep the scores: checkpointed layers, the chunked loss head and the source
buffer on the host against the default path; and the memory model that chooses among them."""

import dataclasses

import numpy as np
import pytest
import torch

import core.eap as eap
from core.eap import MemoryPlan, ModelShape, bytes_per_token, plan_memory, score_samples, working_bytes
from core.settings import ScoreSettings, SettingsError
from tiny_models import ARCHITECTURES, random_samples, tiny_model

PLANS = [("layers", "device"), ("off", "host"), ("layers", "host")]
MEASURES = ("loss", "logit_grad_norm", "logits_slot_grad_norm", "residual_norm")


def _score(model, samples, **settings):
    return score_samples(model, samples, ScoreSettings(batch_size=2, **settings))


@pytest.mark.parametrize("granularity", ["qkv", "module"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_float64_scores_parts_and_measures_equal_the_default_path(architecture, granularity, monkeypatch):
    # A loss chunk of 3 answer tokens: the checkpointed loss head runs in several chunks.
    monkeypatch.setattr(eap, "LOSS_CHUNK", 3)
    model = tiny_model(architecture, n_layers=3, seed=ARCHITECTURES.index(architecture))
    samples = random_samples(3, seed=23, min_answer=6)
    assert max(s.t_cut for s in samples) > 3
    default = _score(model, samples, granularity=granularity, checkpointing="off", source_buffer="device")
    scale = np.abs(default.scores).max()
    for checkpointing, source_buffer in PLANS:
        result = _score(model, samples, granularity=granularity, checkpointing=checkpointing,
                        source_buffer=source_buffer)
        np.testing.assert_allclose(result.position_parts, default.position_parts, rtol=1e-12,
                                   atol=1e-13 * scale, err_msg=f"{checkpointing}, {source_buffer}")
        np.testing.assert_allclose(result.scores, default.scores, rtol=1e-12, atol=1e-13 * scale)
        for name in MEASURES:
            np.testing.assert_allclose(getattr(result, name), getattr(default, name), rtol=1e-12,
                                       err_msg=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_eap_ig_under_checkpointing_equals_the_default_path(architecture):
    model = tiny_model(architecture, seed=4)
    samples = random_samples(2, seed=29)
    settings = dict(method="eap-ig", ig_steps=3)
    default = _score(model, samples, checkpointing="off", **settings)
    result = _score(model, samples, checkpointing="layers", source_buffer="host", **settings)
    np.testing.assert_allclose(result.position_parts, default.position_parts, rtol=1e-12,
                               atol=1e-13 * np.abs(default.scores).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bit_for_bit_where_the_order_of_operations_is_the_same(architecture, dtype, monkeypatch):
    """Checkpointing recomputes the same kernels on the same inputs, and on the CPU the host buffer
    is the device's memory: with the default path's scoring queue and source chunk, and one loss
    chunk, both are bit for bit. Their own smaller queue and chunk (SLOTS_PER_PRODUCT_CHECKPOINTED,
    SOURCE_CHUNK_CHECKPOINTED) change the shapes of the score products and so their rounding, and
    several loss chunks the order of the loss sum: the float64 test bounds those."""
    model = tiny_model(architecture, dtype=dtype, seed=1)
    samples = random_samples(3, seed=31)
    default = _score(model, samples, checkpointing="off", source_buffer="device")
    monkeypatch.setattr(eap, "SLOTS_PER_PRODUCT_CHECKPOINTED", eap.SLOTS_PER_PRODUCT)
    monkeypatch.setattr(eap, "SOURCE_CHUNK_CHECKPOINTED", eap.SOURCE_CHUNK)
    for checkpointing, source_buffer in PLANS:
        result = _score(model, samples, checkpointing=checkpointing, source_buffer=source_buffer)
        np.testing.assert_array_equal(result.position_parts, default.position_parts)
        for name in MEASURES:
            np.testing.assert_array_equal(getattr(result, name), getattr(default, name), err_msg=name)


def test_checkpointing_records_each_source_once_and_recomputes_each_layer(monkeypatch):
    model = tiny_model("llama", n_layers=3)
    layer_calls, mlp_calls = [], []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *args: mlp_calls.append(1))
    model.model.layers[0].register_forward_pre_hook(lambda *args: layer_calls.append(1))
    writes = []
    original = eap._Recorder._capture_source

    def counting(self, index):
        hook = original(self, index)

        def counted(module, args, output):
            writes.append((index, self.in_backward))
            return hook(module, args, output)
        return counted
    monkeypatch.setattr(eap._Recorder, "_capture_source", counting)
    _score(model, random_samples(1), checkpointing="layers")
    # Each MLP starts in the forward pass and again when its layer is recomputed (which stops early,
    # once the last saved tensor is back, so later forward hooks may not fire); every source is
    # recorded in the forward pass, and the source hooks that fire again during the backward pass
    # (the attention's, at least) are the ones the recorder must ignore; the layer's own pre-hook
    # (outside the checkpoint) runs once.
    assert len(mlp_calls) == 2 * 3
    recorded = [index for index, in_backward in writes if not in_backward]
    assert sorted(recorded) == sorted(set(recorded)) and len(recorded) == 2 * 3
    assert any(in_backward for _, in_backward in writes)
    assert len(layer_calls) == 1


def test_additivity_check_still_refuses_a_broken_residual_under_checkpointing():
    model = tiny_model("llama", n_layers=3)
    model.model.layers[0].register_forward_hook(lambda module, args, output: output * 1.1)
    with pytest.raises(eap.NonAdditiveModelError, match="'a1'"):
        _score(model, random_samples(1), checkpointing="layers", source_buffer="host")


def test_layers_are_restored_after_scoring():
    model = tiny_model("qwen2")
    _score(model, random_samples(1), checkpointing="layers")
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_settings_refuse_an_unknown_plan_and_stay_out_of_the_key():
    with pytest.raises(SettingsError, match="checkpointing='always'"):
        ScoreSettings(checkpointing="always")
    with pytest.raises(SettingsError, match="source_buffer='disk'"):
        ScoreSettings(source_buffer="disk")
    assert ScoreSettings(checkpointing="layers", source_buffer="host").key() == ScoreSettings().key()


# --- the memory model -------------------------------------------------------------------------

QWEN_7B = ModelShape(n_layers=28, d_model=3584, intermediate=18944, vocab=152064,
                     n_params=7_615_616_512, dtype_bytes=2)


def test_the_source_buffer_is_2l_plus_1_rows_of_d_model_per_token():
    on_device = bytes_per_token(QWEN_7B, checkpointing=True, source_on_device=True)
    on_host = bytes_per_token(QWEN_7B, checkpointing=True, source_on_device=False)
    assert on_device - on_host == (2 * 28 + 1) * 3584 * 2


def test_checkpointing_keeps_one_layer_of_activations_and_every_layer_input():
    plain = bytes_per_token(QWEN_7B, checkpointing=False, source_on_device=True)
    checkpointed = bytes_per_token(QWEN_7B, checkpointing=True, source_on_device=True)
    layer = eap.layer_activation_bytes(QWEN_7B)
    scoring_saved = (2 * (eap.SLOTS_PER_PRODUCT - eap.SLOTS_PER_PRODUCT_CHECKPOINTED)
                     + eap.SOURCE_CHUNK - eap.SOURCE_CHUNK_CHECKPOINTED) * 3584 * 4
    loss_head = 152064 * (2 + 3 * 4)
    assert plain - checkpointed == 27 * layer - 28 * 3584 * 2 + scoring_saved + loss_head


@pytest.mark.parametrize("free_gib, expected", [
    (None, MemoryPlan(checkpointing=False, source_on_device=True)),  # CPU: no limit known
    (1000, MemoryPlan(checkpointing=False, source_on_device=True)),
    (60, MemoryPlan(checkpointing=True, source_on_device=True)),
    (30, MemoryPlan(checkpointing=True, source_on_device=False)),
    # Nothing fits: the plan that needs least.
    (12, MemoryPlan(checkpointing=True, source_on_device=False))])
def test_auto_takes_the_cheapest_plan_that_fits(free_gib, expected):
    free = None if free_gib is None else free_gib * 2**30
    plan = plan_memory(QWEN_7B, 32768, free)
    assert plan == expected
    if free is not None and free_gib > 12:
        assert working_bytes(QWEN_7B, 32768, plan.checkpointing, plan.source_on_device) <= 0.85 * free


def test_explicit_settings_override_auto():
    assert plan_memory(QWEN_7B, 32768, 2**40, "layers", "host") == MemoryPlan(True, False)
    assert plan_memory(QWEN_7B, 32768, 2**30, "off", "device") == MemoryPlan(False, True)
    assert plan_memory(QWEN_7B, 32768, 2**30, "off") == MemoryPlan(False, False)


def test_model_shape_is_read_from_the_model():
    shape = ModelShape.of(tiny_model("qwen2", n_layers=3, hidden=32))
    assert dataclasses.astuple(shape)[:4] == (3, 32, 64, 64)
    assert shape.dtype_bytes == 8
    assert ModelShape.of(tiny_model("gpt2", dtype=torch.float32)).intermediate == 4 * 32
