"""EAP-IG (docs/method.md section 3): gradients averaged over the path from a zero input embedding to
the real one. With one point it is EAP; as the points grow it converges on the path integral, computed
here independently by Gauss-Legendre quadrature of finite differences of real ablation. Also the
settings that select it, and the score keys they must leave unchanged."""

import argparse
import dataclasses

import numpy as np
import pytest

from ablation import ablated_loss, source_outputs
from core.adapters import adapter_for
from core.eap import score_samples
from core.settings import ScoreSettings, Settings, SettingsError, setting
from tiny_models import ARCHITECTURES, random_samples, tiny_model

# ScoreSettings keys computed by the code before EAP-IG and position parts existed: results cached
# under them must keep their keys.
KEYS_BEFORE = {"default": "c65d9aafe6cc4809", "module": "012169ea04db91b2", "bfloat16": "a8bb83b422140467"}


def test_score_keys_at_default_settings_are_those_before_eap_ig():
    assert ScoreSettings().key() == KEYS_BEFORE["default"]
    assert ScoreSettings(granularity="module").key() == KEYS_BEFORE["module"]
    assert ScoreSettings(dtype="bfloat16").key() == KEYS_BEFORE["bfloat16"]
    assert ScoreSettings(position_parts=False, batch_size=8).key() == KEYS_BEFORE["default"]


def test_a_key_omits_default_field_enters_the_key_only_off_its_default():
    @dataclasses.dataclass(frozen=True)
    class Example(Settings):
        old: int = setting(1, help="a field keys always held")
        new: str = setting("a", choices=("a", "b"), key_omits_default=True, help="a later field")

    assert Example().key_dict() == {"old": 1}
    assert Example(new="b").key_dict() == {"old": 1, "new": "b"}
    assert Example(new="b").key() != Example().key()
    keys = {ScoreSettings().key(), ScoreSettings(method="eap-ig").key(),
            ScoreSettings(method="eap-ig", ig_steps=6).key()}
    assert len(keys) == 3


def test_ig_settings_are_refused_without_eap_ig_and_out_of_range():
    with pytest.raises(SettingsError, match="ig_steps=3 applies only to method 'eap-ig'"):
        ScoreSettings(ig_steps=3)
    with pytest.raises(SettingsError, match="ig_steps=0 is out of range"):
        ScoreSettings(method="eap-ig", ig_steps=0)
    with pytest.raises(SettingsError, match="method='eap-gi' is not one of"):
        ScoreSettings(method="eap-gi")


def test_cli_flags_come_from_the_settings():
    parser = argparse.ArgumentParser()
    ScoreSettings.add_arguments(parser)
    args = parser.parse_args(["--method", "eap-ig", "--ig-steps", "3", "--no-position-parts"])
    assert ScoreSettings.from_namespace(args) == ScoreSettings(method="eap-ig", ig_steps=3,
                                                               position_parts=False)
    # The cost is stated where the flag is chosen.
    assert "about ig_steps forward + backward passes" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("granularity", ["qkv", "module"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_point_at_the_real_input_is_eap_bit_for_bit(architecture, granularity):
    model = tiny_model(architecture, seed=4)
    samples = random_samples(3, seed=31)
    eap = score_samples(model, samples, ScoreSettings(granularity=granularity, batch_size=3))
    ig = score_samples(model, samples, ScoreSettings(granularity=granularity, batch_size=3,
                                                     method="eap-ig", ig_steps=1))
    for field in ("scores", "position_parts", "loss", "logit_grad_norm", "logits_slot_grad_norm",
                  "residual_norm"):
        np.testing.assert_array_equal(getattr(ig, field), getattr(eap, field), err_msg=field)


def smooth_norms(model, epsilon: float = 1.0):
    """Norm epsilons comparable to the embedding's scale. With a tiny epsilon a pre-norm layer-0
    slot's gradient grows like 1/alpha down to alpha ~ sqrt(epsilon) / rms(embedding), a feature
    no quadrature with a few nodes resolves; here the integrand is smooth on [0, 1]."""
    for module in model.modules():
        for name in ("variance_epsilon", "eps"):
            if hasattr(module, name):
                setattr(module, name, epsilon)
    return model


def path_integral_scores(model, sample, graph, nodes: int = 8, eps: float = 1e-5) -> np.ndarray:
    """W[s, d] = integral over alpha in [0, 1] of d/de L_alpha(H_d - e O_s) at e = 0, where L_alpha
    scales the input embedding by alpha and O_s is source s's output at the real input."""
    adapter = adapter_for(model)
    layer0 = adapter.layers(model)[0]
    points, weights = np.polynomial.legendre.leggauss(nodes)
    scores = np.zeros((graph.n_src, graph.n_dst))
    with adapter.exact_precision(model):
        sources = source_outputs(model, sample)
        for point, weight in zip(points, weights):
            alpha = (point + 1) / 2

            def scale(module, args, kwargs, alpha=alpha):
                if args:
                    return (args[0] * alpha,) + args[1:], kwargs
                return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * alpha}
            handle = layer0.register_forward_pre_hook(scale, with_kwargs=True)
            try:
                for s, d in zip(*np.nonzero(graph.real_edge_mask)):
                    derivative = (ablated_loss(model, sample, graph, s, d, eps, sources)
                                  - ablated_loss(model, sample, graph, s, d, -eps, sources)) / (2 * eps)
                    scores[s, d] += weight / 2 * derivative
            finally:
                handle.remove()
    return scores


# GPT-2: biases make a zero input's block outputs nonzero; the baseline still compares with zero.
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_converges_on_the_path_integral(architecture):
    model = smooth_norms(tiny_model(architecture, seed=5))
    sample = random_samples(1, seed=37, min_answer=4)[0]
    graph = score_samples(model, [sample], ScoreSettings(granularity="module")).graph
    reference = path_integral_scores(model, sample, graph)
    scale = np.abs(reference).max()

    def error(estimate):
        return np.abs(estimate - reference).max() / scale

    ig = {m: score_samples(model, [sample], ScoreSettings(granularity="module", method="eap-ig",
                                                          ig_steps=m)).scores[0]
          for m in (4, 16, 32, 64)}
    # The right-endpoint rule's error falls like 1/m ...
    assert error(ig[16]) < error(ig[4]) / 3 and error(ig[64]) < error(ig[16]) / 3
    assert error(ig[64]) < 2e-2
    # ... and it is that rule's on this integral: its 1/m term cancels in a Richardson extrapolation.
    assert error(2 * ig[64] - ig[32]) < 2e-4, error(2 * ig[64] - ig[32])
