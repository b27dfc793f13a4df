"""The project's vocabulary: the closed sets of names that travel between modules (roles, kinds,
stages, states, dtypes), each declared once as a Literal alias with its tuple of values.

Modules compare against these names, never against bare strings of their own; a new stage or
state is added here first.
"""

from __future__ import annotations

from typing import Literal, get_args

# A model's role in a run: the model before post-training, or one after it.
Role = Literal["base", "post"]
# A run compares one post-trained model with its base (pair) or several (series).
Kind = Literal["pair", "series"]
# The pipeline's stages, in order; each does only the work the cache does not hold yet.
Stage = Literal["generate", "grade", "select", "score", "metrics"]
# Why an answer ended: an EOS token, a stop string of the template, or the token limit.
FinishReason = Literal["eos", "stop", "length"]
# A background job's state; queued and running are the active ones.
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
# Residual-graph destination slots: q/k/v inputs of each attention, or one per attention block.
Granularity = Literal["qkv", "module"]
# Floating-point types of model weights and activations.
DType = Literal["float32", "bfloat16", "float16", "float64"]
# Generation backends.
Backend = Literal["hf", "vllm"]
# Controls a run can add (docs/method.md section 8): cross-scoring, null models run as pairs of
# their own (a matched random perturbation of the base; a post-training differing only in seed), and
# faithfulness (real edge ablation and circuit recovery of each model against its scores).
Control = Literal["cross", "perturb", "seed", "faithfulness"]
# Where model work runs: in this process, or on Ray actors (core/executors.py).
ExecutorName = Literal["local", "ray"]

ROLES: tuple[str, ...] = get_args(Role)
KINDS: tuple[str, ...] = get_args(Kind)
STAGES: tuple[str, ...] = get_args(Stage)
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
JOB_STATES: tuple[str, ...] = get_args(JobState)
ACTIVE_JOB_STATES: tuple[str, ...] = ("queued", "running")
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
DTYPES: tuple[str, ...] = get_args(DType)
BACKENDS: tuple[str, ...] = get_args(Backend)
EXECUTORS: tuple[str, ...] = get_args(ExecutorName)
CONTROLS: tuple[str, ...] = get_args(Control)
NULL_CONTROLS: tuple[str, ...] = ("perturb", "seed")
