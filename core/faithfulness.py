"""Faithfulness of edge scores: real edge ablation and circuit recovery (docs/method.md section 8).

EAP's W[s, d] is the derivative at e = 0 of L(H_d - e O_s); removing a whole module output (e = 1) is
far from that point. This module measures the real effect with forward passes in which slot d's branch
input loses e times source s's output while the skip connection and every other slot keep it:
- edge ablation: Delta[s, d] = L(H_d - e O_s) - L(H_d), e = 1 for the real effect; as e -> 0,
  Delta / e -> W, so the intervention is the one EAP linearises;
- circuit recovery: keep the top fraction k of real edges by mean |W|, remove every other edge at
  once, loss L_k; f(k) = (L_empty - L_k) / (L_empty - L_full), its area over log k and the k where
  it reaches 0.8;
- cross-fitting: the questions are split in two halves, and the edges a question is evaluated on
  (its "top" ablated edges, its recovery circuits) are ranked by the other half's mean |W|, so no
  question ranks the edges it evaluates (selection on the same noise would inflate agreement);
- base vs post (`compare_recovery`): both models' curves and areas with a bootstrap over questions,
  paired across the models; a smaller area means a model needs more edges for the same recovery.
  These statistics live in core/faithfulness_stats.py (no torch), so the read model can use them.

On a run of the cache (`read_run_samples`, `run_faithfulness`), the samples are the run's own answers
of each model, cut at the run's T_cut for one alpha, and each model is loaded from its recorded spec.
The pipeline's faithfulness control (`--controls faithfulness`) stores `model_faithfulness` of each
model at each alpha of a run.

Every intervention is one coefficient matrix C[n_src, n_dst]: slot d's branch input becomes
H_d - sum_s C[s, d] O_s, with O_s the output of source s in that same (intervened) forward pass. Several
interventions on one sample run as a batch of copies. Like the EAP engine, this module knows a model
only through its architecture adapter (core/adapters.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from core.adapters import ArchitectureAdapter, adapter_for
from core.eap import NonFiniteScoreError, Sample, forward_loss, frozen_eval, score_samples
from core.errors import InputError, NotFoundError
from core.faithfulness_stats import (RECOVERY_FRACTIONS, agreement, compare_recovery, halves,
                                     held_out_strength, recovery_area, recovery_f, recovery_k,
                                     stratified_edges)
from core.graph import QKV, ResidualGraph
from core.models import ModelSpec
from core.settings import ScoreSettings
from core.runstore import RunStore
from core.store import Store

# Interventions per forward pass (copies of one sample in a batch).
DEFAULT_COPIES = 8


def ablated_losses(model: nn.Module, sample: Sample, graph: ResidualGraph, coefficients: np.ndarray,
                   copies: int = DEFAULT_COPIES) -> np.ndarray:
    """Loss of the sample under each intervention: coefficients [n, n_src, n_dst], where slot d's branch
    input becomes H_d - sum_s coefficients[i, s, d] O_s. Entries off the real-edge mask must be 0."""
    coefficients = np.asarray(coefficients, dtype=np.float64)
    if coefficients.ndim != 3 or coefficients.shape[1:] != (graph.n_src, graph.n_dst):
        raise ValueError(f"coefficients have shape {coefficients.shape}; expected [n, {graph.n_src}, "
                         f"{graph.n_dst}] for a {graph.n_layers}-layer {graph.granularity} graph")
    if coefficients[:, ~graph.real_edge_mask].any():
        raise ValueError("coefficients remove a source from a slot that does not read it; only real "
                         "edges (graph.real_edge_mask) can be removed")
    adapter = adapter_for(model)
    if adapter.n_layers(model) != graph.n_layers:
        raise ValueError(f"the graph has {graph.n_layers} layers but the model {adapter.n_layers(model)}")
    device = next(model.parameters()).device
    losses = np.zeros(len(coefficients))
    with frozen_eval(model), adapter.exact_precision(model), torch.no_grad():
        for start in range(0, len(coefficients), copies):
            chunk = torch.tensor(coefficients[start:start + copies], dtype=model.dtype, device=device)
            removal = _Removal(model, adapter, graph, chunk, sample.n_tokens)
            with removal.attached():
                batch_losses = forward_loss(model, [sample] * len(chunk))
            if not torch.isfinite(batch_losses).all():
                raise NonFiniteScoreError(f"sample {sample.id!r}: an intervention gave a non-finite loss; "
                                          f"ablate in float32 or float64")
            losses[start:start + len(chunk)] = batch_losses.cpu().numpy()
    return losses


def edge_ablation(model: nn.Module, sample: Sample, graph: ResidualGraph,
                  edges: Sequence[tuple[int, int]], scale: float = 1.0,
                  copies: int = DEFAULT_COPIES) -> np.ndarray:
    """Delta[s, d] = L(H_d - scale O_s) - L(H_d) of each edge (src index, dst index), one forward pass
    per edge. scale = 1 removes the edge; (Delta / scale) -> W[s, d] as scale -> 0."""
    coefficients = np.zeros((len(edges) + 1, graph.n_src, graph.n_dst))
    for row, (src, dst) in enumerate(edges, start=1):
        if not graph.real_edge_mask[src, dst]:
            raise ValueError(f"{graph.src_names[src]}->{graph.dst_names[dst]} is not a real edge: slot "
                             f"{graph.dst_names[dst]} does not read {graph.src_names[src]}")
        coefficients[row, src, dst] = scale
    # Row 0 removes nothing: L(H_d), through the same code path as the ablations.
    losses = ablated_losses(model, sample, graph, coefficients, copies)
    return losses[1:] - losses[0]


@dataclasses.dataclass(frozen=True)
class RecoveryCurve:
    """f(k) of one model on a set of samples. fractions[0] = 0 (every edge removed) and
    fractions[-1] = 1 (nothing removed), so f[0] = 0 and f[-1] = 1 exactly."""

    fractions: np.ndarray  # [K] kept fraction of real edges
    n_kept: np.ndarray  # [K] real edges kept
    losses: np.ndarray  # [K, n_samples] L_k of each sample, for a bootstrap over samples
    f: np.ndarray  # [K] (L_empty - L_k) / (L_empty - L_full), on the losses' means over samples
    area: float  # mean of f over log k on the fractions above 0 (trapezoids): 1 for f = 1 throughout
    k: float  # the kept fraction where f first reaches RECOVERY_TARGET (faithfulness_stats.recovery_k)

    def to_dict(self) -> dict:
        return {"fractions": self.fractions.tolist(), "n_kept": self.n_kept.tolist(),
                "f": self.f.tolist(), "area": self.area, "k": self.k,
                "loss_empty": float(self.losses[0].mean()),
                "loss_full": float(self.losses[-1].mean()), "losses": self.losses.tolist()}


def circuit_recovery(model: nn.Module, samples: Sequence[Sample], graph: ResidualGraph,
                     strength: np.ndarray, fractions: np.ndarray = RECOVERY_FRACTIONS,
                     copies: int = DEFAULT_COPIES) -> RecoveryCurve:
    """For each sample, keep the top fraction k of real edges by its `strength` ([n_samples, n_src,
    n_dst]; cross-fitted: the other half's mean |W|, `held_out_strength`), remove every other edge at
    once, and compare the loss with that of removing all (k = 0) or none (k = 1)."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) < 3 or fractions[0] != 0 or fractions[-1] != 1 or not (np.diff(fractions) > 0).all():
        raise ValueError(f"fractions must rise from 0 (every edge removed) through at least one value "
                         f"in (0, 1) to 1 (none removed); got {fractions.tolist()}")
    strength = np.asarray(strength)
    if strength.shape != (len(samples), graph.n_src, graph.n_dst):
        raise ValueError(f"strength has shape {strength.shape}; expected one [{graph.n_src}, "
                         f"{graph.n_dst}] matrix per sample ({len(samples)})")
    n_kept = np.rint(fractions * graph.n_edges).astype(np.int64)

    def removals(rank_by: np.ndarray) -> np.ndarray:
        # Stable order: ties keep the dense matrix's row-major order, so the curve is reproducible.
        ranked = np.argsort(-graph.edges(rank_by), kind="stable")
        coefficients = np.zeros((len(fractions), graph.n_edges))
        for row, keep in enumerate(n_kept):
            coefficients[row, ranked[keep:]] = 1.0
        return graph.dense(coefficients)

    losses = np.stack([ablated_losses(model, sample, graph, removals(rank_by), copies)
                       for sample, rank_by in zip(samples, strength)], 1)
    f = recovery_f(losses)
    return RecoveryCurve(fractions, n_kept, losses, f, float(recovery_area(fractions, f)),
                         float(recovery_k(fractions, f)))


def faithfulness_report(model: nn.Module, samples: Sequence[Sample], settings: ScoreSettings,
                        edges_per_sample: int, seed: int, copies: int = DEFAULT_COPIES) -> dict:
    """Scores the samples (EAP or EAP-IG, as the settings say), ablates edges_per_sample stratified
    real edges of each sample and runs the recovery curves, cross-fitted: a sample's top edges and
    circuits are ranked by the mean |W| of the other half of the samples (`halves`, at least 2
    samples). Everything `python -m core faithfulness` writes; `halves` records each sample's half."""
    if edges_per_sample < 1:
        raise ValueError(f"edges per sample must be at least 1, got {edges_per_sample}")
    if len(samples) < 2:
        raise InputError(f"faithfulness ranks each question's edges on the other half of the "
                         f"questions, so it needs at least 2 samples; got {len(samples)}")
    result = score_samples(model, samples, settings)
    graph = result.graph
    strength = held_out_strength(np.abs(result.scores))
    rng = np.random.default_rng(seed)
    rows = []
    for sample, scores, rank_by in zip(samples, result.scores, strength):
        chosen = stratified_edges(rank_by, graph, edges_per_sample, rng)
        deltas = edge_ablation(model, sample, graph, [(s, d) for s, d, _ in chosen], copies=copies)
        rows += [{"sample_id": sample.id, "src": graph.src_names[s], "dst": graph.dst_names[d],
                  "stratum": stratum, "w": float(scores[s, d]), "delta": float(delta)}
                 for (s, d, stratum), delta in zip(chosen, deltas)]
    recovery = circuit_recovery(model, samples, graph, strength, copies=copies)
    return {"granularity": graph.granularity, "dtype": str(model.dtype).removeprefix("torch."),
            "method": settings.method_description(), "seed": seed, "n_samples": len(samples),
            "n_real_edges": graph.n_edges,
            "edges_per_sample": min(edges_per_sample, graph.n_edges),
            "loss": dict(zip(result.sample_ids, result.loss.tolist())),
            "halves": halves(len(samples)).tolist(),
            "agreement": agreement(list(result.sample_ids), *(
                [row[name] for row in rows] for name in ("sample_id", "stratum", "w", "delta"))),
            "edges": rows, "recovery": recovery.to_dict()}


@dataclasses.dataclass(frozen=True)
class RunModel:
    """One model of a run with its own answers to the chosen questions, cut at the run's T_cut."""

    label: str
    role: str
    spec: ModelSpec
    fingerprint: str
    samples: list[Sample]

    def load(self, run_key: str, settings: ScoreSettings) -> nn.Module:
        """The model, refused when its files changed since run `run_key` generated its answers."""
        found = self.spec.fingerprint()
        if found != self.fingerprint:
            raise InputError(f"{self.label} ({self.spec}) has fingerprint {found}, but run {run_key} "
                             f"recorded {self.fingerprint}: its files changed since the run generated "
                             f"its answers; restore them or run the pair again")
        return self.spec.load(dtype=settings.dtype, device=settings.device)


@dataclasses.dataclass(frozen=True)
class RunSamples:
    run_key: str
    name: str
    alpha: float
    t_cut: int
    models: list[RunModel]  # the base first, then the post models in the run's order

    @property
    def question_ids(self) -> list[str]:
        return [sample.id for sample in self.models[0].samples]

    def model(self, label: str) -> RunModel:
        return next(entry for entry in self.models if entry.label == label)


def read_run_samples(store: Store, run_key: str, alpha: float, n_questions: int) -> RunSamples:
    """The first n_questions selected questions of a run (in the run's order), with every model's
    prompt and answer token ids cut at the run's T_cut for alpha (or the answer's end, if shorter) and
    each model's recorded spec; read-only."""
    if n_questions < 1:
        raise InputError(f"--questions must be at least 1, got {n_questions}")
    runs = RunStore(store)
    rows = runs.answers_at(run_key, alpha)
    if not rows:
        state = runs.run_state(run_key)
        if state is None:
            raise NotFoundError(f"the cache {store.path} has no run {run_key!r}; `python -m core ls "
                                f"--cache {store.path}` lists its runs")
        raise InputError(f"run {run_key} has no alpha {alpha}; its alphas are {sorted(state.t_cuts)}")
    by_label: dict[str, list[tuple]] = {}
    for row in rows:
        by_label.setdefault(row[2], []).append(row)
    base_rows = next(iter(by_label.values()))
    if base_rows[0][3] != "base":
        raise InputError(f"run {run_key} has no base model; faithfulness compares a base with its posts")
    question_ids = [row[6] for row in base_rows[:n_questions]]
    models = []
    for label, model_rows in by_label.items():
        answers = {row[6]: row for row in model_rows}
        missing = [q for q in question_ids if q not in answers]
        if missing:
            raise InputError(f"run {run_key}: {label} has no selected answer to questions {missing} "
                             f"that the base has; the cache is incomplete, rerun the run")
        name, t_cut, _, role, spec, fingerprint = model_rows[0][:6]
        models.append(RunModel(label, role, spec_from_description(json.loads(spec), label), fingerprint,
                               [Sample(q, tuple(answers[q][7]), tuple(answers[q][8]),
                                       min(t_cut, len(answers[q][8]))) for q in question_ids]))
    return RunSamples(run_key, rows[0][0], alpha, rows[0][1], models)


def spec_from_description(description: dict, label: str) -> ModelSpec:
    """The run's recorded spec of model `label`, or an InputError saying why it cannot be loaded."""
    try:
        return ModelSpec.from_description(description)
    except (KeyError, ValueError) as error:
        raise InputError(f"model {label} of the run has no loadable spec ({description}): {error}; "
                         f"a synthetic cache holds no models to ablate") from error


def run_faithfulness(run: RunSamples, settings: ScoreSettings, edges_per_sample: int, seed: int,
                     copies: int = DEFAULT_COPIES, log: Callable[[str], None] = print) -> dict:
    """faithfulness_report of each model of the run on its own answers (one model in memory at a
    time), and the base vs post comparison of their recovery curves. A model whose files no longer
    match the fingerprint the run recorded is refused: the run's answers came from other weights."""
    reports = {}
    for entry in run.models:
        model = entry.load(run.run_key, settings)
        log(f"{entry.label}: {len(entry.samples)} questions, T_cut {run.t_cut}")
        reports[entry.label] = model_faithfulness(entry, model, settings, edges_per_sample, seed,
                                                  copies)
        del model
    fractions = np.asarray(next(iter(reports.values()))["recovery"]["fractions"])
    comparison = compare_recovery(fractions, {label: np.asarray(report["recovery"]["losses"])
                                              for label, report in reports.items()}, run.models[0].label)
    return {"run_key": run.run_key, "run_name": run.name, "alpha": run.alpha, "t_cut": run.t_cut,
            "method": settings.method_description(), "questions": run.question_ids,
            "models": reports, "recovery_comparison": comparison}


def model_faithfulness(entry: RunModel, model: nn.Module, settings: ScoreSettings,
                       edges_per_sample: int, seed: int, copies: int = DEFAULT_COPIES) -> dict:
    """faithfulness_report of one model of a run on its own answers, with its role and spec: one
    entry of run_faithfulness's `models`, and what the faithfulness control stores per model."""
    return {"role": entry.role, "spec": entry.spec.describe(),
            **faithfulness_report(model, entry.samples, settings, edges_per_sample, seed, copies)}


class _Removal:
    """Hooks that make slot d's branch input H_d - sum_s C[b, s, d] O_s in copy b of the batch, with
    O_s captured in this same forward pass. A slot no copy changes is left alone."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, graph: ResidualGraph,
                 coefficients: torch.Tensor, width: int) -> None:
        self.model, self.adapter, self.graph = model, adapter, graph
        self.coefficients = coefficients
        self.changed = coefficients.ne(0).any(0).cpu().numpy()  # [n_src, n_dst]
        # Only sources some slot loses are kept, in order, so a slot's sources are a prefix of them.
        self.kept = torch.as_tensor(np.flatnonzero(self.changed.any(1)), device=coefficients.device)
        self.row = {int(src): row for row, src in enumerate(self.kept.tolist())}
        d_model = model.get_input_embeddings().embedding_dim
        self.outputs = torch.empty(len(coefficients), len(self.kept), width, d_model, dtype=model.dtype,
                                   device=coefficients.device)
        self.attn_inputs: dict[int, torch.Tensor] = {}

    def removal(self, dst: int) -> torch.Tensor:
        """sum_s C[:, s, dst] O_s, [batch, T, d]; zero coefficients add exact zeros."""
        rows = self.row[int(np.flatnonzero(self.changed[:, dst])[-1])] + 1
        batch, _, width, d_model = self.outputs.shape
        weights = self.coefficients[:, self.kept[:rows], dst].unsqueeze(1)  # [batch, 1, rows]
        return (weights @ self.outputs[:, :rows].reshape(batch, rows, -1)).reshape(batch, width, d_model)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        g = self.graph
        handles = []
        layers = self.adapter.layers(self.model)
        if 0 in self.row:
            handles.append(layers[0].register_forward_pre_hook(self._keep_input, with_kwargs=True))
        for layer_index, layer in enumerate(layers):
            parts = self.adapter.parts(layer)
            for module, src in ((parts.attn, g.attn_src(layer_index)), (parts.mlp, g.mlp_src(layer_index))):
                if src in self.row:
                    handles.append(module.register_forward_hook(self._keep_output(src)))
            if self.changed[:, g.mlp_dst(layer_index)].any():
                handles.append(parts.mlp_norm.register_forward_pre_hook(self._remove(g.mlp_dst(layer_index))))
            if g.granularity == "module":
                if self.changed[:, g.attn_dst(layer_index)].any():
                    handles.append(parts.attn_norm.register_forward_pre_hook(
                        self._remove(g.attn_dst(layer_index))))
                continue
            paths = [p for p in QKV if self.changed[:, g.attn_dst(layer_index, p)].any()]
            if not paths:
                continue
            handles.append(parts.attn_norm.register_forward_pre_hook(self._keep_attn_input(layer_index)))
            if parts.qkv_projections is not None:
                for path in paths:
                    projection = parts.qkv_projections[QKV.index(path)]
                    handles.append(projection.register_forward_pre_hook(
                        self._qkv_input(layer_index, g.attn_dst(layer_index, path), parts.attn_norm)))
            else:
                handles.append(parts.fused_qkv.register_forward_hook(
                    self._fused_qkv_output(layer_index, paths, parts.attn_norm)))
        if self.changed[:, g.logits_dst].any():
            handles.append(self.adapter.final_norm(self.model).register_forward_pre_hook(
                self._remove(g.logits_dst)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- sources ----------------------------------------------------------------------------

    def _keep_input(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.outputs[:, self.row[0]] = hidden

    def _keep_output(self, src: int):
        def hook(module, args, output):
            self.outputs[:, self.row[src]] = output[0] if isinstance(output, tuple) else output
        return hook

    # --- slots: the norm in front of a branch reads the ablated residual, the skip keeps it ----

    def _remove(self, dst: int):
        def hook(module, args):
            return (args[0] - self.removal(dst),) + args[1:]
        return hook

    def _keep_attn_input(self, layer: int):
        def hook(module, args):
            self.attn_inputs[layer] = args[0]
        return hook

    def _ablated_normed(self, layer: int, dst: int, norm: nn.Module) -> torch.Tensor:
        # forward() skips this norm's hooks; on a float64 model it is the exact-precision norm.
        return norm.forward(self.attn_inputs[layer] - self.removal(dst))

    def _qkv_input(self, layer: int, dst: int, norm: nn.Module):
        """A q, k or v projection reads the norm of its own ablated residual."""
        def hook(module, args):
            return (self._ablated_normed(layer, dst, norm),) + args[1:]
        return hook

    def _fused_qkv_output(self, layer: int, paths: list[str], norm: nn.Module):
        """The fused projection's q, k or v part is recomputed from that path's ablated residual."""
        def hook(module, args, output):
            parts = list(output.chunk(3, dim=-1))
            for path in paths:
                index = QKV.index(path)
                ablated = self._ablated_normed(layer, self.graph.attn_dst(layer, path), norm)
                parts[index] = module.forward(ablated).chunk(3, dim=-1)[index]
            return torch.cat(parts, dim=-1)
        return hook
