"""Frozen settings objects: one definition drives the CLI flags, the dashboard widgets and the cache key.

Every open choice of the method (docs/method.md) is a field here, never a silent constant. A field is
declared with `setting(...)`, which records its help text and its valid values; `__post_init__`
validates them, so a bad value fails where it is given, with a message naming the field and what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from typing import Any, ClassVar

from core.vocab import BACKENDS, DTYPES, GRANULARITIES, Backend, DType, Granularity


class SettingsError(ValueError):
    """A setting has a value outside its valid range or choices."""


def setting(default: Any, *, help: str, choices: tuple | None = None,
            low: float | None = None, high: float | None = None,
            low_open: bool = False, in_key: bool = True, key_omits_default: bool = False) -> Any:
    """Declare a settings field. `in_key=False` marks fields that cannot change a result
    (batch size, device), so they stay out of the cache key. `key_omits_default=True` marks a field
    added after results were cached under keys without it: at its default it stays out of the key (so
    those results keep their keys), any other value enters it. Such a default must never change."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "low": low, "high": high,
        "low_open": low_open, "in_key": in_key, "key_omits_default": key_omits_default})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of all settings groups. Subclasses are frozen dataclasses of `setting(...)` fields."""

    group: ClassVar[str] = "settings"
    # Prepended to each field's CLI flag and argparse dest, where a field's name alone would collide
    # with another group's on one command line (e.g. two `seed`s).
    flag_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(type(self).__name__, f, getattr(self, f.name))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key_dict(self) -> dict[str, Any]:
        """The fields that determine a result, for cache keys."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["in_key"]
                and not (f.metadata["key_omits_default"] and getattr(self, f.name) == f.default)}

    def key(self) -> str:
        return stable_hash({"group": self.group, **self.key_dict()})

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_specs(cls) -> list[dict[str, Any]]:
        """Name, default, type, choices, range and help of every field: what a UI needs for a widget."""
        return [{"name": f.name, "default": f.default, "type": type(f.default).__name__,
                 **{k: f.metadata[k] for k in ("help", "choices", "low", "high", "low_open")}}
                for f in dataclasses.fields(cls)]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            dest = cls.flag_prefix.replace("-", "_") + f.name
            flag = "--" + dest.replace("_", "-")
            kind = type(f.default)
            if kind is bool:
                parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                    default=f.default, help=f.metadata["help"])
            else:
                parser.add_argument(flag, dest=dest, type=kind, default=f.default,
                                    choices=f.metadata["choices"],
                                    help=f"{f.metadata['help']} (default: {f.default})")

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace):
        prefix = cls.flag_prefix.replace("-", "_")
        return cls(**{f.name: getattr(namespace, prefix + f.name) for f in dataclasses.fields(cls)
                      if hasattr(namespace, prefix + f.name)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise SettingsError(f"{cls.__name__}: unknown setting(s) {sorted(unknown)}; "
                                f"known: {sorted(names)}")
        return cls(**values)


def _check_field(owner: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise SettingsError(f"{owner}.{f.name}={value!r} is not one of {list(meta['choices'])}; "
                            f"pick one of those.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{owner}.{f.name}={value!r} is not a finite number.")
        low, high = meta.get("low"), meta.get("high")
        too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            left = "(" if meta.get("low_open") else "["
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise SettingsError(f"{owner}.{f.name}={value!r} is out of range {left}{lo}, {hi}]; "
                                f"choose a value in that range.")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of dict order and of the Python session."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# --- The method's settings groups -------------------------------------------------------------

# Edge-score methods (docs/method.md section 3) and EAP-IG's path baselines.
SCORE_METHODS = ("eap", "eap-ig")
IG_BASELINES = ("zero",)
# Memory plans of the engine (core/eap.py, plan_memory): checkpointing per decoder layer, and where the
# source buffer lives.
CHECKPOINTING = ("auto", "off", "layers")
SOURCE_BUFFERS = ("auto", "device", "host")


@dataclasses.dataclass(frozen=True)
class ScoreSettings(Settings):
    """How edge scores are computed (docs/method.md sections 2-3)."""

    group: ClassVar[str] = "score"
    granularity: Granularity = setting("qkv", choices=GRANULARITIES,
                               help="destination slots: q/k/v inputs per attention (qkv) or one per "
                                    "attention block (module)")
    dtype: DType = setting("float32", choices=DTYPES,
                         help="model weights and activations; scores always accumulate in float32 "
                              "(float64 for a float64 model)")
    batch_size: int = setting(1, low=1, help="rows per forward pass, a row being the cuts of one "
                                             "answer that share it, each cut with its own backward "
                                             "pass (results do not depend on it)", in_key=False)
    batches_per_commit: int = setting(1, low=1, in_key=False,
                                      help="scoring batches per cache transaction: a killed run "
                                           "loses at most these; each commit costs a fraction of a "
                                           "second, which matters where a batch takes a few")
    device: str = setting("auto", help="torch device: auto (cuda if available, else cpu), cpu, "
                                       "cuda, cuda:1 ...", in_key=False)
    method: str = setting("eap", choices=SCORE_METHODS, key_omits_default=True,
                          help="eap: gradients at the real input (one forward + one backward pass); "
                               "eap-ig: gradients averaged over ig_steps points on the straight path "
                               "from the baseline input to the real one (about ig_steps forward + "
                               "backward passes, so ig_steps times the cost of eap)")
    ig_steps: int = setting(5, low=1, high=1000, key_omits_default=True,
                            help="eap-ig only: path points alpha = k/m, k = 1..m; each costs one "
                                 "forward and one backward pass; m = 1 is eap")
    ig_baseline: str = setting("zero", choices=IG_BASELINES, key_omits_default=True,
                               help="eap-ig only: the path starts at a zero input embedding, and "
                                    "each source's output is compared with zero, as eap's zero "
                                    "ablation does")
    position_parts: bool = setting(True, in_key=False,
                                   help="also keep each sample's W split by the position group it "
                                        "comes from (first token, rest of the prompt, answer); "
                                        "the parts sum to W")
    checkpointing: str = setting("auto", choices=CHECKPOINTING, in_key=False,
                                 help="activation checkpointing per decoder layer (scores unchanged, "
                                      "about one more forward pass of time): layers, off, or auto "
                                      "(on when the memory model of core/eap.py says the plain pass "
                                      "would not fit the free device memory)")
    source_buffer: str = setting("auto", choices=SOURCE_BUFFERS, in_key=False,
                                 help="where the source outputs ((2L+1) x tokens x d_model) are kept: "
                                      "device, host (pinned memory on CUDA; slower), or auto (host "
                                      "only when they would not fit on the device even with "
                                      "checkpointing)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "eap":
            for name in ("ig_steps", "ig_baseline"):
                default = type(self).__dataclass_fields__[name].default
                if getattr(self, name) != default:
                    raise SettingsError(f"ScoreSettings.{name}={getattr(self, name)!r} applies only "
                                        f"to method 'eap-ig'; set method='eap-ig' (--method eap-ig) "
                                        f"or leave {name} at its default {default!r}.")

    @property
    def passes(self) -> int:
        """Forward + backward passes per sample, in units of eap's one: the cost `plan` counts."""
        return self.ig_steps if self.method == "eap-ig" else 1

    @classmethod
    def method_of(cls, record: dict[str, Any]) -> "ScoreSettings":
        """Settings holding only the method fields of a stored score settings record (a run's
        `score` column; records from before EAP-IG have none: eap)."""
        return cls(**{name: record[name] for name in ("method", "ig_steps", "ig_baseline")
                      if name in record})

    def method_description(self) -> dict[str, Any]:
        """Which scores W are: the method, and EAP-IG's path (what faithfulness reports record)."""
        if self.method == "eap-ig":
            return {"name": self.method, "ig_steps": self.ig_steps, "ig_baseline": self.ig_baseline}
        return {"name": self.method}


@dataclasses.dataclass(frozen=True)
class SelectionSettings(Settings):
    """Which questions are scored, and where answers are cut (docs/method.md section 5)."""

    group: ClassVar[str] = "selection"
    beta: float = setting(0.5, low=0.0, high=10.0,
                          help="keep a question if its pair-mean answer length >= floor(beta*T_bar)")
    gamma: float = setting(1.5, low=0.0, high=10.0,
                           help="keep a question if its pair-mean answer length <= floor(gamma*T_bar)")
    delta: float = setting(0.5, low=0.0, high=2.0,
                           help="drop a question if |T_base-T_post| / mean(T_base,T_post) > delta")
    n: int = setting(100, low=1, help="questions drawn (the same for both models)")
    seed: int = setting(42, low=0, help="seed of the random draw of questions")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta > self.gamma:
            raise SettingsError(f"SelectionSettings: beta={self.beta} > gamma={self.gamma} leaves the "
                                f"answer length window [floor(beta*T_bar), floor(gamma*T_bar)] "
                                f"empty, so no question could be selected; give beta <= gamma")


@dataclasses.dataclass(frozen=True)
class FaithfulnessSettings(Settings):
    """The faithfulness control of a run (`--controls faithfulness`, docs/method.md section 8): per
    model and alpha, real edge ablation of stratified edges and the circuit recovery curve on the
    run's first `questions` selected questions, scored under the run's own score settings."""

    group: ClassVar[str] = "faithfulness"
    flag_prefix: ClassVar[str] = "faith-"
    questions: int = setting(10, low=1, help="the run's first N selected questions (fewer when the "
                                             "run selected fewer)")
    edges_per_sample: int = setting(16, low=1,
                                    help="real edges ablated one at a time per question: half the "
                                         "largest by |W|, half drawn at random (all of them when it "
                                         "exceeds their number)")
    seed: int = setting(0, low=0, help="seed of the random half of the ablated edges")
    copies: int = setting(8, low=1, in_key=False,
                          help="interventions per forward pass, as copies of one question (memory "
                               "grows with it; results do not depend on it)")

    def stored_key(self, score: ScoreSettings) -> str:
        """The `settings_key` of the faithfulness table: these settings and the scores' (the run's
        score settings, whose method gives the W compared with Delta). "ranking" marks the
        cross-fitted reports (edges ranked on the other half of the questions, issue 26): rows
        written before it have other keys, so the control computes them again."""
        return stable_hash({"group": self.group, **self.key_dict(), "score": score.key(),
                            "ranking": "cross-fitted halves"})

    def stored_settings(self, score: ScoreSettings) -> dict[str, Any]:
        """The `settings` column beside `stored_key`."""
        return {"faithfulness": self.as_dict(), "score": score.as_dict()}


def check_alpha(alpha: float) -> float:
    """alpha is the fraction of T_bar kept: T_cut = max(floor(alpha*T_bar), 1)."""
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 < alpha <= 1:
        raise SettingsError(f"alpha={alpha!r} is out of range (0, 1]: it is the fraction of the mean "
                            f"answer length kept, e.g. 0.03, 0.1, 0.3 or 0.5.")
    return float(alpha)


PAPER_ALPHAS = (0.03, 0.1, 0.3, 0.5)

# Metric variants computed from the stored position parts and norms (docs/method.md section 8). No
# residual-norm variant: W does not change when the residual stream is uniformly rescaled
# (tests/test_controls_views.py), so W itself is the scale-free score.
POSITION_VARIANTS = ("all", "no-sink", "answer-only")
NORMALISATIONS = ("none", "logit-grad")


# The distribution metrics (docs/method.md section 6), in the order every table lists them; here
# rather than in core/metrics.py so that `primary` can be checked where it is given.
METRIC_NAMES = ("intensity", "complexity", "edge_entropy", "kurtosis", "diversity", "output_entropy")
# Complexity's histogram grid: each model's own pooled maximum (the paper's definition), or one
# grid for both models at a quantile of their joint pool.
COMPLEXITY_GRIDS = ("own-max", "shared-quantile")


def parse_primary(text: str) -> tuple[tuple[str, float], ...]:
    """The (metric, alpha) cells of `MetricSettings.primary`: "intensity@0.1", several separated by
    commas, or "none"; a SettingsError naming what is wrong otherwise."""
    if text.strip() == "none":
        return ()
    cells = []
    for part in text.split(","):
        metric, _, alpha = part.strip().partition("@")
        try:
            value = float(alpha)
        except ValueError:
            value = math.nan
        if metric not in METRIC_NAMES or not 0 < value <= 1:
            raise SettingsError(f"MetricSettings.primary={text!r}: {part.strip()!r} is not "
                                f"metric@alpha with a metric of {list(METRIC_NAMES)} and an alpha "
                                f"in (0, 1], e.g. 'intensity@0.1'; or give 'none'.")
        cells.append((metric, value))
    return tuple(cells)


@dataclasses.dataclass(frozen=True)
class MetricSettings(Settings):
    """Conventions of the distribution metrics and their statistics (docs/method.md sections 6-7). The
    defaults follow the paper's formulas where it gives them (it gives no bin count); every stored
    or shown metric carries the key of the settings that made it."""

    group: ClassVar[str] = "metrics"
    intensity_normaliser: str = setting("dense", choices=("dense", "edges"),
                                        help="mean |W| over all n_src*n_dst entries (dense, the "
                                             "paper's formula) or over real edges only (edges)")
    flatten: str = setting("dense", choices=("dense", "edges"),
                           help="entries of each matrix that the entropy histogram, the kurtosis and "
                                "the diversity use: all n_src*n_dst, structural zeros included (dense, "
                                "the paper's flattened matrices) or real edges only (edges)")
    histogram_bins: int = setting(100, low=2, high=100000,
                                  help="equal-width bins of complexity's histogram")
    complexity_grid: str = setting(
        "own-max", choices=COMPLEXITY_GRIDS,
        help="own-max (the paper): each model's bins span [0, the max of its own pooled |W|], "
             "recomputed in every bootstrap resample, so complexity is scale-free; "
             "shared-quantile: both models binned on [0, complexity_range_quantile of their "
             "joint pool], fixed for every resample (not scale-free: it also moves with intensity)")
    complexity_range_quantile: float = setting(
        0.999, low=0.5, high=1.0,
        help="complexity_grid shared-quantile only: the quantile of both models' pooled |W| "
             "where the bins end; larger |W| go into the last bin")
    kurtosis_of: str = setting("signed", choices=("signed", "abs"),
                               help="excess kurtosis of signed W (paper) or of |W|")
    bootstrap: int = setting(1000, low=0, high=100000,
                             help="paired bootstrap resamples of the questions for the "
                                  "studentized (bootstrap-t) intervals (0: none)")
    permutations: int = setting(10000, low=0, high=1000000,
                                help="random base/post swaps within questions for each metric's "
                                     "paired permutation p (every one of the 2^n swaps where "
                                     "2^n is not more; 0: no test)")
    ci_level: float = setting(0.95, low=0.5, high=0.999,
                              help="confidence level of the intervals; 1 - ci_level is the level "
                                   "of the tests")
    fdr: float = setting(0.05, low=0.0, high=0.5, low_open=True,
                         help="Benjamini-Hochberg false discovery rate of the per-edge tests")
    seed: int = setting(0, low=0, help="seed of the bootstrap resampling and the permutations")
    positions: str = setting("all", choices=POSITION_VARIANTS, key_omits_default=True,
                             help="positions whose scores the metrics use, from the stored position "
                                  "parts: all (W), no-sink (W without the first token's part) or "
                                  "answer-only (the answer tokens' part)")
    normalise: str = setting("none", choices=NORMALISATIONS, key_omits_default=True,
                             help="none, or logit-grad: each sample's W divided by the norm of the "
                                  "logits' gradient over its scored positions (the model's "
                                  "confidence on its own tokens, which every score is "
                                  "proportional to)")
    primary: str = setting("intensity@0.1", in_key=False,
                           help="the cell each claim rests on, declared before looking: "
                                "metric@alpha (several separated by commas, or none); tables "
                                "mark it, and its own p at 1 - ci_level is the claim's test")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_primary(self.primary)

    @property
    def primary_cells(self) -> tuple[tuple[str, float], ...]:
        """`primary` as (metric, alpha) pairs."""
        return parse_primary(self.primary)


@dataclasses.dataclass(frozen=True)
class GenerationSettings(Settings):
    """How answers are generated (docs/method.md section 5); the template and the token limit come
    from the pair's config unless overridden here."""

    group: ClassVar[str] = "generation"
    gen_dtype: DType = setting("float32", choices=DTYPES,
                             help="weights and activations while generating (bfloat16 is the usual "
                                  "choice on a GPU)")
    gen_backend: Backend = setting("hf", choices=BACKENDS,
                               help="hf (transformers generate) or vllm (when installed); greedy "
                                    "either way, but the two can differ in rounding")
    max_new_tokens: int = setting(0, low=0, help="answer token limit; 0 takes the pair's limit")
    gen_batch_size: int = setting(8, low=1, help="prompts per generate call", in_key=False)
