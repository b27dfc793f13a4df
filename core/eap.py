"""Edge Attribution Patching over the residual graph (docs/method.md section 3).

For a sample with loss L, W[s, d] = -sum_t sum_k O_s[t, k] G_d[t, k], where O_s is the output of
source s and G_d the gradient of L at slot d's residual input through that slot's branch only. This is
dL/de of L(H_d - e O_s) at e = 0: the first-order effect of removing edge s -> d.

One forward and one backward pass score every edge of every sample in a batch:
- forward hooks copy each source output into one buffer [batch, n_src, T, d_model] (model dtype);
- slot gradients are caught on views inserted in front of the branch (so the skip connection's
  gradient is excluded); q/k/v slots take the gradient at each projection's input and map it through
  the pre-attention norm's vector-Jacobian product, so the residual is never copied per head;
- as each layer's slot gradients arrive in the backward pass, one batched matrix product against the
  buffer's prefix of earlier sources gives that layer's columns, accumulated in float32 (float64 for
  a float64 model).
Samples are right-padded: with causal attention, padding after a sample's last token cannot change
that sample's computation, and padded positions carry no loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from core.adapters import ArchitectureAdapter, NonAdditiveModelError, adapter_for
from core.graph import QKV, ResidualGraph
from core.settings import ScoreSettings

# Relative tolerance of the additivity check, by model dtype: rounding of the residual additions.
ADDITIVITY_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4,
                        torch.bfloat16: 5e-2, torch.float16: 1e-2}
# Sources converted to the accumulation dtype at a time, when the model's dtype is narrower.
SOURCE_CHUNK = 16
# Slot gradients queued before one pass over the source buffer: fewer passes read less memory. Four
# layers' worth of gradients is held while the backward pass has already freed far more activations,
# so the peak does not grow.
SLOTS_PER_PRODUCT = 16


class NonFiniteScoreError(ValueError):
    """A sample produced a NaN or infinite loss or edge score."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One scoring input: the model's own answer, cut at t_cut tokens.

    The loss is the mean negative log-likelihood of answer_ids[:t_cut] given
    prompt_ids + answer_ids[:t_cut - 1].
    """

    id: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    t_cut: int

    def __post_init__(self) -> None:
        if len(self.prompt_ids) < 1:
            raise ValueError(f"sample {self.id!r}: prompt_ids is empty; the first answer token "
                             f"needs at least one prompt token to be predicted from")
        if not 1 <= self.t_cut <= len(self.answer_ids):
            raise ValueError(f"sample {self.id!r}: t_cut={self.t_cut} must lie in "
                             f"[1, len(answer_ids)={len(self.answer_ids)}]")

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.answer_ids[: self.t_cut - 1]

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + self.t_cut - 1


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    graph: ResidualGraph
    scores: np.ndarray  # [n_samples, n_src, n_dst]
    loss: np.ndarray  # [n_samples]
    sample_ids: list[str]
    seconds: np.ndarray  # [n_samples] wall time, a batch's time shared equally among its samples


def score_samples(model: nn.Module, samples: Sequence[Sample], settings: ScoreSettings = ScoreSettings(),
                  progress: Callable[[int, int], None] | None = None) -> ScoreResult:
    """Edge scores of every sample, in the order given. The model is used as loaded (its dtype and
    device); `settings.dtype` and `settings.device` are for the loader."""
    if not samples:
        raise ValueError("no samples to score: the selection is empty")
    adapter = adapter_for(model)
    graph = ResidualGraph(adapter.n_layers(model), settings.granularity)
    acc_dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    scores = np.zeros((len(samples), graph.n_src, graph.n_dst),
                      dtype=np.float64 if acc_dtype == torch.float64 else np.float32)
    loss = np.zeros(len(samples))
    seconds = np.zeros(len(samples))
    # Similar lengths share a batch, to pad little.
    order = sorted(range(len(samples)), key=lambda i: samples[i].n_tokens)
    with frozen_eval(model), adapter.exact_precision(model):
        for start in range(0, len(order), settings.batch_size):
            index = order[start:start + settings.batch_size]
            began = time.perf_counter()
            batch_scores, batch_loss = _score_batch(
                model, adapter, graph, [samples[i] for i in index], acc_dtype, check=start == 0)
            scores[index] = batch_scores
            loss[index] = batch_loss
            seconds[index] = (time.perf_counter() - began) / len(index)
            if progress is not None:
                progress(min(start + settings.batch_size, len(order)), len(order))
    return ScoreResult(graph, scores, loss, [s.id for s in samples], seconds)


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients; restores the caller's state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.requires_grad_(False).eval()
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)


def batch_inputs(samples: Sequence[Sample], device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Right-padded input ids [B, T], a mask of real positions [B, T], and per sample the
    (positions, targets) of its loss tokens."""
    width = max(s.n_tokens for s in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    real = torch.zeros(len(samples), width, dtype=torch.bool)
    targets = []
    for b, s in enumerate(samples):
        ids = torch.tensor(s.input_ids, dtype=torch.long)
        input_ids[b, : len(ids)] = ids
        real[b, : len(ids)] = True
        first = len(s.prompt_ids) - 1
        targets.append(torch.stack([torch.arange(first, first + s.t_cut),
                                    torch.tensor(s.answer_ids[: s.t_cut])]))
    return input_ids.to(device), real.to(device), [t.to(device) for t in targets]


def answer_losses(model: nn.Module, hidden: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample mean NLL of the answer tokens, from the final hidden states [B, T, d]. Only the
    loss positions go through the LM head, in float32 (or float64)."""
    head = model.get_output_embeddings()
    losses = []
    for b, (positions, tokens) in enumerate(targets):
        logits = head(hidden[b, positions])
        wide = torch.promote_types(logits.dtype, torch.float32)
        losses.append(nn.functional.cross_entropy(logits.to(wide), tokens))
    return torch.stack(losses)


def forward_loss(model: nn.Module, samples: Sequence[Sample]) -> torch.Tensor:
    """Per-sample losses of a plain forward pass whose graph reaches back to the embeddings: the
    baseline the engine's overhead is measured against, and the loss the engine differentiates."""
    device = next(model.parameters()).device
    input_ids, _, targets = batch_inputs(samples, device)
    embeds = model.get_input_embeddings()(input_ids).requires_grad_(True)
    hidden = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return answer_losses(model, hidden, targets)


def _score_batch(model: nn.Module, adapter: ArchitectureAdapter, graph: ResidualGraph,
                 samples: Sequence[Sample], acc_dtype: torch.dtype,
                 check: bool) -> tuple[np.ndarray, np.ndarray]:
    device = next(model.parameters()).device
    _, real, _ = batch_inputs(samples, device)
    recorder = _Recorder(model, adapter, graph, real, acc_dtype, keep_slot_inputs=check)
    with recorder.attached():
        losses = forward_loss(model, samples)
        bad = [s.id for s, value in zip(samples, losses.detach()) if not torch.isfinite(value)]
        if bad:
            raise NonFiniteScoreError(f"non-finite loss for sample(s) {bad}; nothing was stored. The "
                                      f"model overflows: score in float32, or check its weights for "
                                      f"NaN/inf")
        if check:
            recorder.check_additivity(type(model).__name__)
        losses.sum().backward()
        recorder.score_pending()
    scores = recorder.scores.cpu().numpy()
    bad = [s.id for s, m in zip(samples, scores) if not np.isfinite(m).all()]
    if bad:
        raise NonFiniteScoreError(f"non-finite edge scores for sample(s) {bad}; nothing was stored. "
                                  f"Score in float32 or check the model's weights for NaN/inf")
    return scores, losses.detach().cpu().numpy()


class _Recorder:
    """Hooks that collect source outputs in the forward pass and score slots in the backward pass."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, graph: ResidualGraph,
                 real: torch.Tensor, acc_dtype: torch.dtype, keep_slot_inputs: bool) -> None:
        self.model, self.adapter, self.graph = model, adapter, graph
        batch, width = real.shape
        d_model = model.get_input_embeddings().embedding_dim
        self.sources = torch.empty(batch, graph.n_src, width, d_model, dtype=model.dtype,
                                   device=real.device)
        self.scores = torch.zeros(batch, graph.n_src, graph.n_dst, dtype=acc_dtype, device=real.device)
        self.real = real.unsqueeze(-1).to(acc_dtype)
        # Gradients at padded positions are zero already (nothing after them carries loss); the
        # mask makes that explicit where there is padding.
        self.padded = not bool(real.all())
        self.acc_dtype = acc_dtype
        # Residual input of each attention norm (for the q/k/v norm VJP) and, when checking
        # additivity, of every slot.
        self.attn_inputs: dict[int, torch.Tensor] = {}
        self.slot_inputs: dict[str, torch.Tensor] | None = {} if keep_slot_inputs else None
        self.pending_qkv: dict[int, dict[str, torch.Tensor]] = {}
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.edge_mask = torch.tensor(graph.real_edge_mask, dtype=acc_dtype, device=real.device)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = []
        layers = self.adapter.layers(self.model)
        handles.append(layers[0].register_forward_pre_hook(self._capture_input, with_kwargs=True))
        for layer_index, layer in enumerate(layers):
            parts = self.adapter.parts(layer)
            g = self.graph
            handles.append(parts.attn.register_forward_hook(self._capture_source(g.attn_src(layer_index))))
            handles.append(parts.mlp.register_forward_hook(self._capture_source(g.mlp_src(layer_index))))
            handles.append(parts.mlp_norm.register_forward_pre_hook(
                self._branch_slot(f"m{layer_index}", [g.mlp_dst(layer_index)])))
            if g.granularity == "module":
                handles.append(parts.attn_norm.register_forward_pre_hook(
                    self._branch_slot(f"a{layer_index}", [g.attn_dst(layer_index)])))
                continue
            handles.append(parts.attn_norm.register_forward_pre_hook(self._keep_attn_input(layer_index)))
            if parts.qkv_projections is not None:
                for path, projection in zip(QKV, parts.qkv_projections):
                    handles.append(projection.register_forward_pre_hook(
                        self._qkv_input_grad(layer_index, path, parts.attn_norm)))
            else:
                handles.append(parts.fused_qkv.register_forward_hook(
                    self._fused_qkv_grad(layer_index, parts.attn_norm, parts.fused_qkv)))
        handles.append(self.adapter.final_norm(self.model).register_forward_pre_hook(
            self._branch_slot("logits", [self.graph.logits_dst])))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- forward: sources -------------------------------------------------------------------

    def _capture_input(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.sources[:, 0] = hidden.detach()

    def _capture_source(self, index: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.sources[:, index] = out.detach()
        return hook

    # --- forward: slots, whose gradients arrive in the backward pass -------------------------

    def _branch_slot(self, name: str, dst: list[int]):
        """Replace a norm's input by a view: the gradient caught on the view is the branch's alone."""
        def hook(module, args):
            hidden = args[0]
            if self.slot_inputs is not None:
                self.slot_inputs[name] = hidden.detach()
            branch = hidden.view_as(hidden)
            branch.register_hook(lambda grad: self._score_slots(dst, [grad.to(self.acc_dtype)]))
            return (branch,) + args[1:]
        return hook

    def _keep_attn_input(self, layer: int):
        def hook(module, args):
            self.attn_inputs[layer] = args[0]
            if self.slot_inputs is not None:
                self.slot_inputs[f"a{layer}"] = args[0].detach()
        return hook

    def _qkv_input_grad(self, layer: int, path: str, norm: nn.Module):
        def hook(module, args):
            view = args[0].view_as(args[0])
            view.register_hook(lambda grad: self._qkv_arrived(layer, path, norm, grad))
            return (view,) + args[1:]
        return hook

    def _fused_qkv_grad(self, layer: int, norm: nn.Module, fused: nn.Module):
        weights = self.adapter.fused_qkv_weights(fused)

        def on_grad(grad):
            for path, part, weight in zip(QKV, grad.chunk(3, dim=-1), weights):
                self._qkv_arrived(layer, path, norm, part.to(self.acc_dtype) @ weight.to(self.acc_dtype))

        def hook(module, args, output):
            output.register_hook(on_grad)
        return hook

    def _qkv_arrived(self, layer: int, path: str, norm: nn.Module, grad: torch.Tensor) -> None:
        pending = self.pending_qkv.setdefault(layer, {})
        pending[path] = grad
        if len(pending) < 3:
            return
        del self.pending_qkv[layer]
        x = self.attn_inputs.pop(layer)
        # One norm VJP for the three paths: it is linear in the gradient and broadcasts over x.
        grads = self.adapter.norm_vjp(norm, x, torch.stack([pending[p].to(self.acc_dtype) for p in QKV]))
        self._score_slots([self.graph.attn_dst(layer, p) for p in QKV], list(grads))

    # --- backward: scores -------------------------------------------------------------------

    def _score_slots(self, dst: list[int], grads: list[torch.Tensor]) -> None:
        """Queue slot gradients; every SLOTS_PER_PRODUCT slots, score them in one pass."""
        self.pending += [(d, grad * self.real if self.padded else grad) for d, grad in zip(dst, grads)]
        if len(self.pending) >= SLOTS_PER_PRODUCT:
            self.score_pending()

    def score_pending(self) -> None:
        """W[:, :k, dst] = -<sources[:, :k], G_dst> for the queued slots, k the most sources any of
        them reads; entries of sources a slot does not read are then zeroed by the edge mask."""
        if not self.pending:
            return
        slots = [d for d, _ in self.pending]
        k = int(self.graph.n_sources_before[slots].max())
        dst = torch.tensor(slots, device=self.scores.device)
        batch = self.sources.shape[0]
        g = torch.stack([grad for _, grad in self.pending], dim=1).reshape(batch, len(dst), -1)
        self.pending = []
        step = k if self.sources.dtype == self.acc_dtype else SOURCE_CHUNK
        # One matrix product per sample on contiguous rows of the buffer: a batched product over
        # the buffer's strided prefix would copy it.
        for b in range(batch):
            for lo in range(0, k, step):
                hi = min(k, lo + step)
                chunk = self.sources[b, lo:hi].reshape(hi - lo, -1).to(self.acc_dtype)
                self.scores[b, lo:hi, dst] = -(chunk @ g[b].T) * self.edge_mask[lo:hi, dst]

    # --- additivity -------------------------------------------------------------------------

    def check_additivity(self, architecture: str) -> None:
        """Every slot's residual input must equal the sum of its real sources (docs/method.md section 2)."""
        tolerance = ADDITIVITY_TOLERANCE[self.model.dtype]
        # Slot name by the index of its last real source.
        slots_after = {2 * self.graph.n_layers: "logits"}
        for layer in range(self.graph.n_layers):
            slots_after[2 * layer] = f"a{layer}"
            slots_after[2 * layer + 1] = f"m{layer}"
        running = torch.zeros_like(self.sources[:, 0], dtype=self.acc_dtype)
        for source in range(self.graph.n_src):
            running += self.sources[:, source].to(self.acc_dtype) * self.real
            name = slots_after[source]
            actual = self.slot_inputs[name].to(self.acc_dtype) * self.real
            error = (actual - running).norm() / actual.norm().clamp_min(torch.finfo(self.acc_dtype).tiny)
            if not error <= tolerance:
                raise NonAdditiveModelError(
                    f"{architecture}: the residual input of slot {name!r} is not the sum of the "
                    f"embedding and earlier module outputs (relative error {float(error):.2e} > "
                    f"{tolerance:.0e}). This model has a non-standard residual (post-norms, scaled or "
                    f"parallel blocks?), so its edge scores would be meaningless; its adapter must model "
                    f"that explicitly.")
        self.slot_inputs = None
