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
that sample's computation, and padded positions carry no loss; products run over each sample's own
positions only.

Cuts of one answer share a forward pass (`shared_rows`): the cuts' input ids are prefixes of the
longest cut's, and with causal attention each cut's loss reads the longest cut's forward pass at its own
positions only. So a row of the batch runs the longest cut once and one backward pass per cut (the
graph retained between them); each backward pass scores only its cut, over its cut's positions. A cut
joins the row when its own forward and backward pass would cost more than one more backward pass over
the row's positions: with frozen weights a backward pass costs about a forward pass.

Position parts: the sum over positions t is taken as three sums over contiguous position groups
(first token, rest of the prompt, answer), each its own product, so W's parts by group come at no
extra pass; W is their sum. The token view splits the answer group further, one group per answer
position (`score_samples(answer_positions=True)`): the same products over narrower ranges. EAP-IG (method "eap-ig", docs/method.md section 3): the gradients are
averaged over m points alpha = k/m, k = 1..m, on the path from a zero input embedding to the real
one, each point one forward and one backward pass, and multiplied by the real source outputs (the
pass at alpha = 1, which is EAP's, records them); with m = 1 it is EAP.

Long answers (ScoreSettings.checkpointing, source_buffer; the memory model is `bytes_per_token`):
each decoder layer can run under non-reentrant activation checkpointing. The first forward pass
builds the whole autograd graph, so the gradient hooks it registers on the slot views fire in the one
backward pass; only the saved activations are dropped and recomputed layer by layer during that
backward pass. The forward hooks fire again while a layer is recomputed: they then do nothing (the
sources, the additivity inputs and the slot views belong to the first forward pass; recomputation
gives the same values). The source buffer can live in host memory (pinned on CUDA), copied to the
device SOURCE_CHUNK_CHECKPOINTED rows at a time when scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.adapters import ArchitectureAdapter, NonAdditiveModelError, adapter_for, position_limit
from core.graph import QKV, ResidualGraph
from core.settings import ScoreSettings

# Relative tolerance of the additivity check, by model dtype: rounding of the residual additions.
ADDITIVITY_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4,
                        torch.bfloat16: 5e-2, torch.float16: 1e-2}
# Sources converted to the accumulation dtype at a time, when the model's dtype is narrower.
SOURCE_CHUNK = 16
# Slot gradients queued before one pass over the source buffer: fewer passes read less memory. Four
# layers' worth of gradients is held while the backward pass has already freed far more activations,
# so the peak does not grow; a row's earlier backward passes (shared_rows) free nothing, and the
# memory model counts the queue on top of every activation (bytes_per_token).
SLOTS_PER_PRODUCT = 16
# Under checkpointing the backward pass no longer frees more than it holds, so the queue and the
# converted source rows are kept to one layer's worth.
SLOTS_PER_PRODUCT_CHECKPOINTED = 4
SOURCE_CHUNK_CHECKPOINTED = 4
# Under checkpointing the LM head and loss run on this many answer positions at a time, recomputed in
# the backward pass: the float32 logits ([positions, vocab]) would otherwise outgrow the whole model.
LOSS_CHUNK = 1024
# Share of the free device memory the memory model plans to fill: the rest absorbs the allocator's
# fragmentation and what the model leaves out.
MEMORY_HEADROOM = 0.85


# Position groups of the parts of W, in order: the first token (the attention sink), the rest of the
# prompt (its last position predicts the first answer token), the answer tokens fed as input.
POSITION_GROUPS = ("first_token", "prompt_rest", "answer")


class NonFiniteScoreError(ValueError):
    """A sample produced a NaN or infinite loss or edge score."""


class InvalidSampleError(ValueError):
    """A sample's token ids or t_cut cannot be scored: refused before any model work."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class Sample:
    """One scoring input: the model's own answer, cut at t_cut tokens.

    The loss is the mean negative log-likelihood of answer_ids[:t_cut] given
    prompt_ids + answer_ids[:t_cut - 1]. Token ids are Python or numpy ints >= 0; whether they lie
    inside a model's vocabulary is checked by `score_samples`.
    """

    id: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    t_cut: int

    def __post_init__(self) -> None:
        if len(self.prompt_ids) < 1:
            raise InvalidSampleError(f"sample {self.id!r}: prompt_ids is empty; the first answer "
                                     f"token needs at least one prompt token to be predicted from")
        for field in ("prompt_ids", "answer_ids"):
            for position, token in enumerate(getattr(self, field)):
                if not _is_int(token) or token < 0:
                    raise InvalidSampleError(
                        f"sample {self.id!r}: {field}[{position}] = {token!r} is not a token id "
                        f"(an integer >= 0); pass the ids the model's tokenizer produced")
        if not _is_int(self.t_cut):
            raise InvalidSampleError(f"sample {self.id!r}: t_cut = {self.t_cut!r} is not an integer; "
                                     f"it counts answer tokens, give it as an int")
        if not 1 <= self.t_cut <= len(self.answer_ids):
            raise InvalidSampleError(f"sample {self.id!r}: t_cut={self.t_cut} must lie in "
                                     f"[1, len(answer_ids)={len(self.answer_ids)}]")

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.answer_ids[: self.t_cut - 1]

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + self.t_cut - 1

    def position_groups(self) -> tuple[tuple[int, int], ...]:
        """[start, end) of each group of POSITION_GROUPS in input_ids; a group may be empty."""
        prompt = len(self.prompt_ids)
        return (0, 1), (1, prompt), (prompt, self.n_tokens)

    def answer_position_groups(self) -> tuple[tuple[int, int], ...]:
        """`position_groups` with the answer group split into its positions: the first token, the
        rest of the prompt, then one group per answer token fed as input (t_cut - 1 of them)."""
        first, prompt_rest, (start, end) = self.position_groups()
        return (first, prompt_rest, *((t, t + 1) for t in range(start, end)))


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Edge scores of samples, with per-sample measurements taken in the same passes (all at the real
    input; for EAP-IG too)."""

    graph: ResidualGraph
    scores: np.ndarray  # [n_samples, n_src, n_dst]
    # [n_samples, len(POSITION_GROUPS), n_src, n_dst], summing to scores over axis 1; None when
    # ScoreSettings.position_parts is off. With `score_samples(answer_positions=True)`, the groups
    # of Sample.answer_position_groups, zero-padded to the longest answer.
    position_parts: np.ndarray | None
    loss: np.ndarray  # [n_samples]
    sample_ids: list[str]
    seconds: np.ndarray  # [n_samples] wall time, a batch's time shared equally among its samples
    # ||dL/dlogits||_F over the scored positions, = ||(p_t - onehot(y_t)) / T_cut||_F: the confidence
    # scale every score is proportional to (docs/method.md section 4).
    logit_grad_norm: np.ndarray  # [n_samples]
    # ||G_logits||_F: the gradient at the logits slot's input (the final residual, before the final
    # norm), nonzero only at the scored positions; the column `logits` of W is -<O_s, G_logits>.
    logits_slot_grad_norm: np.ndarray  # [n_samples]
    # Mean over the sample's positions of the L2 norm of the final residual (the logits slot's input):
    # the residual stream's scale.
    residual_norm: np.ndarray  # [n_samples]


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know of a decoder."""

    n_layers: int
    d_model: int
    intermediate: int
    vocab: int
    n_params: int
    dtype_bytes: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        config = model.config
        d_model = model.get_input_embeddings().embedding_dim
        # GPT-2 names it n_inner, None meaning 4 d.
        intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                        or 4 * d_model)
        return cls(n_layers=adapter_for(model).n_layers(model), d_model=d_model, intermediate=intermediate, vocab=model.get_output_embeddings().out_features,
                   n_params=sum(p.numel() for p in model.parameters()),
                   dtype_bytes=torch.finfo(model.dtype).bits // 8)


def layer_activation_bytes(shape: ModelShape) -> int:
    """Bytes per token that one decoder layer's backward pass needs saved (e: the dtype's bytes; norms
    compute in float32): per norm a float32 copy of its input and its e-byte output; q/k/v, o, gate/up
    and down projections save their inputs (d, d, d, i); attention saves q, k and v expanded to all
    heads and its output (4d; SDPA's flash and memory-efficient kernels keep no T x T matrix); the MLP
    saves gate and up outputs and the activation (3i)."""
    e, d, i = shape.dtype_bytes, shape.d_model, shape.intermediate
    norms = 2 * (4 + e) * d
    return norms + e * (3 * d + 4 * d + 4 * i)


def bytes_per_token(shape: ModelShape, checkpointing: bool, source_on_device: bool) -> int:
    """Device bytes per scored token, beyond the weights (docs: README, memory model).

    - source buffer: (2L + 1) x d x e, unless it is on the host;
    - activations: every layer's (L x layer_activation_bytes) without checkpointing; with it, each
      layer's input (L x d x e) and one layer's activations being recomputed;
    - slot gradients queued for scoring, stacked once, and the source rows converted to float32 for
      the product: (2 x slots + rows) x d x 4 (slots, rows: SLOTS_PER_PRODUCT and SOURCE_CHUNK, or
      their _CHECKPOINTED values);
    - the loss head without checkpointing: per answer token its e-byte logits and three float32 vocab
      rows (wide logits, log-softmax, their gradient); with checkpointing it runs on LOSS_CHUNK
      tokens at a time, a fixed cost (`fixed_bytes`).
    """
    e, d, layers = shape.dtype_bytes, shape.d_model, shape.n_layers
    acc = 8 if e == 8 else 4
    source = (2 * layers + 1) * d * e if source_on_device else 0
    if checkpointing:
        activations = layers * d * e + layer_activation_bytes(shape)
        scoring = (2 * SLOTS_PER_PRODUCT_CHECKPOINTED + SOURCE_CHUNK_CHECKPOINTED) * d * acc
        loss_head = 0
    else:
        activations = layers * layer_activation_bytes(shape)
        scoring = (2 * SLOTS_PER_PRODUCT + SOURCE_CHUNK) * d * acc
        loss_head = shape.vocab * (e + 3 * acc)
    return source + activations + scoring + loss_head


def working_bytes(shape: ModelShape, n_tokens: int, checkpointing: bool, source_on_device: bool) -> int:
    """The memory model's device bytes for one sample of n_tokens tokens, beyond the weights: per
    token (`bytes_per_token`), and under checkpointing one chunk of the loss head."""
    acc = 8 if shape.dtype_bytes == 8 else 4
    loss_chunk = (min(LOSS_CHUNK, n_tokens) * shape.vocab * (shape.dtype_bytes + 3 * acc)
                  if checkpointing else 0)
    return loss_chunk + n_tokens * bytes_per_token(shape, checkpointing, source_on_device)


def peak_bytes(shape: ModelShape, n_tokens: int, checkpointing: bool, source_on_device: bool) -> int:
    """The memory model's device peak: weights and working bytes."""
    return shape.n_params * shape.dtype_bytes + working_bytes(shape, n_tokens, checkpointing,
                                                              source_on_device)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    checkpointing: bool
    source_on_device: bool


def plan_memory(shape: ModelShape, n_tokens: int, free_bytes: int | None, checkpointing: str = "auto",
                source_buffer: str = "auto") -> MemoryPlan:
    """The settings' choices with "auto" resolved: the cheapest plan whose working bytes fit in
    MEMORY_HEADROOM of the device memory free with the model loaded (free_bytes None: no limit known,
    as on the CPU). When nothing fits, the plan that needs least, so the failure names the real limit."""
    def need(plan: MemoryPlan) -> int:
        return working_bytes(shape, n_tokens, plan.checkpointing, plan.source_on_device)

    # Cheapest first: checkpointing costs about one more forward pass; the host buffer a copy per use.
    candidates = [MemoryPlan(c, d) for d in (True, False) for c in (False, True)
                  if checkpointing in ("auto", "layers" if c else "off")
                  and source_buffer in ("auto", "device" if d else "host")]
    for plan in candidates:
        if free_bytes is None or need(plan) <= MEMORY_HEADROOM * free_bytes:
            return plan
    return min(candidates, key=need)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; None elsewhere (the memory model then plans no saving)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def shared_rows(samples: Sequence[Sample]) -> list[list[int]]:
    """Indexes of `samples` grouped into rows of one forward pass each, each row's samples shortest
    first (equal ones in the order given). The cuts of one answer (equal prompt and answer ids),
    taken longest first, join the row of the longest while their own forward and backward pass
    (2 n_tokens) would cost more than one more backward pass over the row's tokens; a shorter cut
    starts a row of its own. Rows in the order of their answers' first sample."""
    by_answer: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for index, sample in enumerate(samples):
        by_answer.setdefault((sample.prompt_ids, sample.answer_ids), []).append(index)
    rows = []
    for indexes in by_answer.values():
        row: list[int] = []
        for index in sorted(indexes, key=lambda i: (-samples[i].n_tokens, -i)):
            if row and 2 * samples[index].n_tokens <= samples[row[0]].n_tokens:
                rows.append(row[::-1])
                row = []
            row.append(index)
        rows.append(row[::-1])
    return rows


def score_samples(model: nn.Module, samples: Sequence[Sample], settings: ScoreSettings = ScoreSettings(),
                  progress: Callable[[int, int], None] | None = None,
                  answer_positions: bool = False) -> ScoreResult:
    """Edge scores of every sample, in the order given. The model is used as loaded (its dtype and
    device); `settings.dtype` and `settings.device` are for the loader. `answer_positions`: the
    parts of W are those of Sample.answer_position_groups (each answer position apart; the token
    view), whatever settings.position_parts says."""
    if not samples:
        raise ValueError("no samples to score: the selection is empty")
    check_vocabulary(model, samples)
    adapter = adapter_for(model)
    graph = ResidualGraph(adapter.n_layers(model), settings.granularity)
    acc_dtype = torch.float64 if model.dtype == torch.float64 else torch.float32

    def groups_of(sample: Sample) -> tuple[tuple[int, int], ...]:
        if answer_positions:
            return sample.answer_position_groups()
        return sample.position_groups() if settings.position_parts else ((0, sample.n_tokens),)

    groups = [groups_of(s) for s in samples]
    n_groups = max(len(g) for g in groups)
    # Empty ranges pad a shorter answer's groups: their parts stay zero.
    groups = [g + ((0, 0),) * (n_groups - len(g)) for g in groups]
    totals = np.zeros((len(samples), n_groups, graph.n_src, graph.n_dst),
                      dtype=np.float64 if acc_dtype == torch.float64 else np.float32)
    measures = {f.name: np.zeros(len(samples)) for f in dataclasses.fields(_Measures)}
    seconds = np.zeros(len(samples))
    steps = settings.ig_steps if settings.method == "eap-ig" else 1
    # Rows of similar lengths share a batch, to pad little.
    rows = sorted(shared_rows(samples), key=lambda row: samples[row[-1]].n_tokens)
    shape = ModelShape.of(model)
    free = free_device_bytes(next(model.parameters()).device)
    done = 0
    with frozen_eval(model), adapter.exact_precision(model):
        for start in range(0, len(rows), settings.batch_size):
            batch_rows = rows[start:start + settings.batch_size]
            index = [i for row in batch_rows for i in row]
            # Each row as positions into the batch's samples.
            positions = np.cumsum([0] + [len(row) for row in batch_rows])
            local_rows = [list(range(lo, hi)) for lo, hi in zip(positions[:-1], positions[1:])]
            batch = [samples[i] for i in index]
            plan = plan_memory(shape, len(batch_rows) * max(s.n_tokens for s in batch), free,
                               settings.checkpointing, settings.source_buffer)
            began = time.perf_counter()
            batch_totals, batch_measures = _score_batch(
                model, adapter, graph, batch, local_rows, acc_dtype, steps, [groups[i] for i in index],
                check=start == 0, plan=plan)
            totals[index] = batch_totals
            for name, values in dataclasses.asdict(batch_measures).items():
                measures[name][index] = values
            seconds[index] = (time.perf_counter() - began) / len(index)
            done += len(index)
            if progress is not None:
                progress(done, len(samples))
    return ScoreResult(graph, totals.sum(axis=1),
                       totals if settings.position_parts or answer_positions else None,
                       sample_ids=[s.id for s in samples], seconds=seconds, **measures)


def check_vocabulary(model: nn.Module, samples: Sequence[Sample]) -> None:
    """Every token id must index the model's embedding and, as a target, its LM head, and every
    position its position table (a model with one)."""
    vocabulary = min(model.get_input_embeddings().num_embeddings,
                     model.get_output_embeddings().out_features)
    limit = position_limit(model.config)
    for sample in samples:
        if limit is not None and sample.n_tokens > limit:
            raise InvalidSampleError(
                f"sample {sample.id!r}: its prompt and answer up to T_cut span {sample.n_tokens} "
                f"positions, more than the {limit} the model has position embeddings for; shorten "
                f"the prompt or lower t_cut")
        for field in ("prompt_ids", "answer_ids"):
            for position, token in enumerate(getattr(sample, field)):
                if token >= vocabulary:
                    raise InvalidSampleError(
                        f"sample {sample.id!r}: {field}[{position}] = {token} is outside the "
                        f"model's vocabulary (ids 0 to {vocabulary - 1}); the ids must come from "
                        f"this model's tokenizer")


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


def answer_token_losses(model: nn.Module, hidden: torch.Tensor, targets: list[torch.Tensor],
                        on_logits: Callable[[int, torch.Tensor], None] | None = None,
                        checkpointed: bool = False) -> list[torch.Tensor]:
    """Per sample, the NLL of each answer token [t_cut], from the final hidden states [B, T, d]. Only
    the loss positions go through the LM head, in float32 (or float64). `on_logits(b, logits)` sees
    each sample's logits as the loss reads them (to hook their gradient; under checkpointing once per
    chunk). `checkpointed`: the head runs on LOSS_CHUNK positions at a time and its logits are
    recomputed in the backward pass."""
    head = model.get_output_embeddings()

    def nll(b: int, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if on_logits is not None:
            on_logits(b, wide)
        return nn.functional.cross_entropy(wide, tokens, reduction="none")

    if not checkpointed:
        return [nll(b, hidden[b, positions], tokens) for b, (positions, tokens) in enumerate(targets)]
    return [torch.cat([checkpoint(nll, b, hidden[b, positions[lo:lo + LOSS_CHUNK]],
                                  tokens[lo:lo + LOSS_CHUNK], use_reentrant=False)
                       for lo in range(0, len(tokens), LOSS_CHUNK)])
            for b, (positions, tokens) in enumerate(targets)]


def forward_token_losses(model: nn.Module, samples: Sequence[Sample],
                         on_logits: Callable[[int, torch.Tensor], None] | None = None,
                         checkpointed: bool = False) -> list[torch.Tensor]:
    """`answer_token_losses` of a plain forward pass whose graph reaches back to the embeddings.
    `checkpointed`: each decoder layer and the loss head run under activation checkpointing."""
    device = next(model.parameters()).device
    input_ids, _, targets = batch_inputs(samples, device)
    embeds = model.get_input_embeddings()(input_ids).requires_grad_(True)
    with checkpointed_layers(model, checkpointed):
        hidden = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return answer_token_losses(model, hidden, targets, on_logits, checkpointed)


def forward_loss(model: nn.Module, samples: Sequence[Sample], checkpointed: bool = False) -> torch.Tensor:
    """Per-sample losses (mean answer-token NLL) of a plain forward pass: the baseline the engine's
    overhead is measured against, and the loss the engine differentiates."""
    return torch.stack([losses.mean() for losses in forward_token_losses(model, samples,
                                                                         checkpointed=checkpointed)])


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run each decoder layer under non-reentrant activation checkpointing: its saved activations are
    dropped after the forward pass and recomputed in the backward pass. Module hooks stay outside a
    layer's own pre-hooks (they run once) and inside for its submodules (they run again on
    recomputation)."""
    if not enabled:
        yield
        return
    layers = adapter_for(model).layers(model)
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@dataclasses.dataclass
class _Measures:
    """Per-sample values of a batch, at the real input (see ScoreResult)."""

    loss: np.ndarray
    logit_grad_norm: np.ndarray
    logits_slot_grad_norm: np.ndarray
    residual_norm: np.ndarray


def _non_finite_advice(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "The model overflows in its dtype: score in float32 (--dtype float32)"
    if dtype == torch.float32:
        return ("Score in float64 (--dtype float64) to see whether float32 overflows, and check the "
                "model's weights for NaN/inf")
    return "Check the model's weights for NaN/inf"


def _score_batch(model: nn.Module, adapter: ArchitectureAdapter, graph: ResidualGraph,
                 samples: Sequence[Sample], rows: list[list[int]], acc_dtype: torch.dtype, steps: int,
                 groups: list[tuple[tuple[int, int], ...]], check: bool,
                 plan: MemoryPlan) -> tuple[np.ndarray, _Measures]:
    """Totals [n_samples, groups, n_src, n_dst] (per sample, its position ranges [t0, t1), as many
    for every sample) averaged over the path's `steps` points, and the batch's measures. `rows`: the
    samples of each forward row (`shared_rows`), shortest first."""
    device = next(model.parameters()).device
    longest = [samples[row[-1]] for row in rows]
    _, real, _ = batch_inputs(longest, device)
    row_of = {i: b for b, row in enumerate(rows) for i in row}
    recorder = _Recorder(model, adapter, graph, real, groups, acc_dtype, keep_slot_inputs=check,
                         plan=plan, sample_rows=[row_of[i] for i in range(len(samples))],
                         sample_tokens=[s.n_tokens for s in samples])
    # Backward pass k scores the k-th sample of every row that has one.
    backward_passes = [[(b, row[k]) for b, row in enumerate(rows) if k < len(row)]
                       for k in range(max(len(row) for row in rows))]
    # The real input (alpha = 1) first: its pass records the source outputs every point multiplies,
    # and the loss and measures; it is exactly EAP's pass.
    alphas = [1.0] + [k / steps for k in range(1, steps)]
    with recorder.attached():
        for point, alpha in enumerate(alphas):
            at_real_input = point == 0
            recorder.begin_pass(None if at_real_input else alpha)
            token_losses = forward_token_losses(model, longest,
                                                recorder.catch_logits if at_real_input else None,
                                                checkpointed=plan.checkpointing)
            losses = [token_losses[row_of[i]][:s.t_cut].mean() for i, s in enumerate(samples)]
            if at_real_input:
                real_losses = torch.stack(losses).detach()
                bad = [s.id for s, value in zip(samples, real_losses) if not torch.isfinite(value)]
                if bad:
                    raise NonFiniteScoreError(f"non-finite loss for sample(s) {bad}; nothing was "
                                              f"stored. {_non_finite_advice(model.dtype)}")
                if check:
                    recorder.check_additivity(type(model).__name__)
            for k, members in enumerate(backward_passes):
                last = k == len(backward_passes) - 1
                with recorder.backward_pass(members, last):
                    sum(losses[i] for _, i in members).backward(retain_graph=not last)
                recorder.score_pending()
    totals = recorder.totals if steps == 1 else recorder.totals / steps
    totals = totals.cpu().numpy()
    bad = [s.id for s, t in zip(samples, totals) if not np.isfinite(t).all()]
    if bad:
        raise NonFiniteScoreError(f"non-finite edge scores for sample(s) {bad}; nothing was stored. "
                                  f"{_non_finite_advice(model.dtype)}")
    return totals, recorder.measures(real_losses)


class _Recorder:
    """Hooks that collect source outputs in the forward pass and score slots in the backward pass."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, graph: ResidualGraph,
                 real: torch.Tensor, groups: list[tuple[tuple[int, int], ...]], acc_dtype: torch.dtype,
                 keep_slot_inputs: bool, plan: MemoryPlan, sample_rows: list[int],
                 sample_tokens: list[int]) -> None:
        """`real`: the rows' real positions [rows, T]; per sample, its position ranges (`groups`),
        its row and its number of tokens."""
        self.model, self.adapter, self.graph = model, adapter, graph
        batch, width = real.shape
        n_samples = len(groups)
        d_model = model.get_input_embeddings().embedding_dim
        self.device = real.device
        # Pinned host memory makes the copies to and from a CUDA device direct DMA.
        self.sources = torch.empty(batch, graph.n_src, width, d_model, dtype=model.dtype,
                                   device=real.device if plan.source_on_device else "cpu",
                                   pin_memory=not plan.source_on_device and real.device.type == "cuda")
        self.slots_per_product = SLOTS_PER_PRODUCT_CHECKPOINTED if plan.checkpointing else SLOTS_PER_PRODUCT
        self.source_chunk = (SOURCE_CHUNK_CHECKPOINTED if plan.checkpointing or not plan.source_on_device
                             else SOURCE_CHUNK)
        # True while a backward pass runs: forward hooks then fire only to recompute a checkpointed
        # layer, and must neither record again nor insert views.
        self.in_backward = False
        # The backward pass in progress: (row, sample) of the samples it scores; whether it is the
        # batch's last (which may then free the recorded attention inputs).
        self.members: list[tuple[int, int]] = []
        self.last_backward = True
        # Per sample, the non-empty position ranges [t0, t1) summed into each part of the totals.
        self.groups = [[(part, t0, t1) for part, (t0, t1) in enumerate(sample_groups) if t1 > t0]
                       for sample_groups in groups]
        self.sample_rows, self.sample_tokens = sample_rows, sample_tokens
        self.totals = torch.zeros(n_samples, len(groups[0]), graph.n_src, graph.n_dst, dtype=acc_dtype,
                                  device=real.device)
        self.real = real.unsqueeze(-1).to(acc_dtype)
        self.acc_dtype = acc_dtype
        # Residual input of each attention norm (for the q/k/v norm VJP) and, when checking
        # additivity, of every slot.
        self.attn_inputs: dict[int, torch.Tensor] = {}
        self.slot_inputs: dict[str, torch.Tensor] | None = {} if keep_slot_inputs else None
        self.pending_qkv: dict[int, dict[str, torch.Tensor]] = {}
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.edge_mask = torch.tensor(graph.real_edge_mask, dtype=acc_dtype, device=real.device)
        # The pass in progress: None at the real input, else the factor scaling the input embedding.
        self.input_scale: float | None = None
        self.logit_grad_sq = torch.zeros(n_samples, dtype=acc_dtype, device=real.device)
        self.logits_slot_grad_norm = torch.zeros(n_samples, dtype=acc_dtype, device=real.device)
        self.residual_norm = torch.zeros(n_samples, dtype=acc_dtype, device=real.device)

    def begin_pass(self, input_scale: float | None) -> None:
        self.input_scale = input_scale

    @contextlib.contextmanager
    def backward_pass(self, members: list[tuple[int, int]], last: bool) -> Iterator[None]:
        self.in_backward, self.members, self.last_backward = True, members, last
        try:
            yield
        finally:
            self.in_backward = False

    def catch_logits(self, b: int, logits: torch.Tensor) -> None:
        if self.in_backward:
            return

        def on_grad(grad):
            # Summed over the loss head's chunks when it is checkpointed.
            for row, sample in self.members:
                if row == b:
                    self.logit_grad_sq[sample] += grad.to(self.acc_dtype).pow(2).sum()
        logits.register_hook(on_grad)

    def measures(self, losses: torch.Tensor) -> _Measures:
        return _Measures(loss=losses.cpu().numpy(),
                         logit_grad_norm=self.logit_grad_sq.sqrt().cpu().numpy(),
                         logits_slot_grad_norm=self.logits_slot_grad_norm.cpu().numpy(),
                         residual_norm=self.residual_norm.cpu().numpy())

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
            self._branch_slot("logits", [self.graph.logits_dst], measure=True)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- forward: sources -------------------------------------------------------------------

    def _capture_input(self, module, args, kwargs):
        """At the real input, record the embedding; on the EAP-IG path, scale it instead."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.input_scale is None:
            self.sources[:, 0] = hidden.detach()
            return None
        scaled = hidden * self.input_scale
        if args:
            return (scaled,) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": scaled}

    def _capture_source(self, index: int):
        def hook(module, args, output):
            if self.input_scale is None and not self.in_backward:
                out = output[0] if isinstance(output, tuple) else output
                self.sources[:, index] = out.detach()
        return hook

    # --- forward: slots, whose gradients arrive in the backward pass -------------------------

    def _branch_slot(self, name: str, dst: list[int], measure: bool = False):
        """Replace a norm's input by a view: the gradient caught on the view is the branch's alone.
        With `measure`, at the real input, also take the norms of the input and of its gradient."""
        def hook(module, args):
            if self.in_backward:
                return None
            hidden = args[0]
            if self.slot_inputs is not None:
                self.slot_inputs[name] = hidden.detach()
            measuring = measure and self.input_scale is None
            if measuring:
                norms = torch.linalg.vector_norm(hidden.detach(), dim=-1, dtype=self.acc_dtype)
                for sample, (row, tokens) in enumerate(zip(self.sample_rows, self.sample_tokens)):
                    self.residual_norm[sample] = norms[row, :tokens].mean()
            branch = hidden.view_as(hidden)

            def on_grad(grad):
                grad = grad.to(self.acc_dtype)
                if measuring:
                    norms = torch.linalg.vector_norm(grad.flatten(1), dim=-1)
                    for row, sample in self.members:
                        self.logits_slot_grad_norm[sample] = norms[row]
                self._score_slots(dst, [grad])
            branch.register_hook(on_grad)
            return (branch,) + args[1:]
        return hook

    def _keep_attn_input(self, layer: int):
        def hook(module, args):
            if self.in_backward:
                return
            self.attn_inputs[layer] = args[0]
            if self.slot_inputs is not None:
                self.slot_inputs[f"a{layer}"] = args[0].detach()
        return hook

    def _qkv_input_grad(self, layer: int, path: str, norm: nn.Module):
        def hook(module, args):
            if self.in_backward:
                return None
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
            if not self.in_backward:
                output.register_hook(on_grad)
        return hook

    def _qkv_arrived(self, layer: int, path: str, norm: nn.Module, grad: torch.Tensor) -> None:
        pending = self.pending_qkv.setdefault(layer, {})
        pending[path] = grad
        if len(pending) < 3:
            return
        del self.pending_qkv[layer]
        # Later backward passes of the batch read it again.
        x = self.attn_inputs.pop(layer) if self.last_backward else self.attn_inputs[layer]
        # One norm VJP for the three paths: it is linear in the gradient and broadcasts over x.
        grads = self.adapter.norm_vjp(norm, x, torch.stack([pending[p].to(self.acc_dtype) for p in QKV]))
        self._score_slots([self.graph.attn_dst(layer, p) for p in QKV], list(grads))

    # --- backward: scores -------------------------------------------------------------------

    def _score_slots(self, dst: list[int], grads: list[torch.Tensor]) -> None:
        """Queue slot gradients; every SLOTS_PER_PRODUCT slots, score them in one pass."""
        self.pending += list(zip(dst, grads))
        if len(self.pending) >= self.slots_per_product:
            self.score_pending()

    def score_pending(self) -> None:
        """totals[sample, part, :k, dst] += -<sources[row, :k], G_dst[row]> over each part's positions,
        for the queued slots and the backward pass's samples, k the most sources any of them reads;
        entries of sources a slot does not read are then zeroed by the edge mask."""
        if not self.pending:
            return
        slots = [d for d, _ in self.pending]
        k = int(self.graph.n_sources_before[slots].max())
        dst = torch.tensor(slots, device=self.totals.device)
        batch, _, _, d_model = self.sources.shape
        g = torch.stack([grad for _, grad in self.pending], dim=1).reshape(batch, len(dst), -1)
        self.pending = []
        on_device = self.sources.device == self.device
        step = k if self.sources.dtype == self.acc_dtype and on_device else self.source_chunk
        # One matrix product per sample and position range, on rows of the buffer whose positions
        # and hidden units are contiguous (row stride T * d): a batched product over the buffer's
        # strided prefix would copy it. Padded positions are outside every range.
        for b, sample in self.members:
            for part, t0, t1 in self.groups[sample]:
                grad = g[b, :, t0 * d_model:t1 * d_model]
                for lo in range(0, k, step):
                    hi = min(k, lo + step)
                    chunk = self.sources[b, lo:hi, t0:t1].to(self.device, self.acc_dtype)
                    chunk = chunk.reshape(hi - lo, -1)
                    self.totals[sample, part, lo:hi, dst] += (-(chunk @ grad.T)
                                                              * self.edge_mask[lo:hi, dst])

    # --- additivity -------------------------------------------------------------------------

    def check_additivity(self, architecture: str) -> None:
        """Every slot's residual input must equal the sum of its real sources (docs/method.md section 2)."""
        tolerance = ADDITIVITY_TOLERANCE[self.model.dtype]
        # Slot name by the index of its last real source.
        slots_after = {2 * self.graph.n_layers: "logits"}
        for layer in range(self.graph.n_layers):
            slots_after[2 * layer] = f"a{layer}"
            slots_after[2 * layer + 1] = f"m{layer}"
        running = torch.zeros_like(self.sources[:, 0], dtype=self.acc_dtype, device=self.device)
        for source in range(self.graph.n_src):
            running += self.sources[:, source].to(self.device, self.acc_dtype) * self.real
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
