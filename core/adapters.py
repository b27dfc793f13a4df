"""Architecture adapters: where a decoder keeps its embedding, attention, MLP and norms.

The EAP engine (core/eap.py) knows only this interface. Residual semantics every adapter guarantees
(checked at run time by the engine's additivity check):
- the residual input of layer l's attention norm, of its MLP norm, and of the final norm equal the sum
  of the embedding output (source `input`) and all earlier attention and MLP block outputs;
- the attention block's output is taken after its output projection (all heads summed), the MLP's after
  its down projection.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn

from core.errors import CircuitdiffError, InputError


class UnsupportedArchitectureError(InputError):
    """No adapter knows where this model keeps its residual stream."""


class NonAdditiveModelError(CircuitdiffError):
    """The module outputs do not add up to a slot's residual input: edge scores would be meaningless."""


def rms_norm_vjp(norm: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient at the input x of y = w * x / sqrt(mean(x^2) + eps), given the gradient at y."""
    weighted = grad * norm.weight.to(grad.dtype)
    x = x.to(grad.dtype)
    inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    x_hat = x * inv_rms
    return inv_rms * (weighted - x_hat * (weighted * x_hat).mean(-1, keepdim=True))


def layer_norm_vjp(norm: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient at the input x of LayerNorm(x), given the gradient at its output."""
    weighted = grad * norm.weight.to(grad.dtype)
    x = x.to(grad.dtype)
    centred = x - x.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
    x_hat = centred * inv_std
    return inv_std * (weighted - weighted.mean(-1, keepdim=True)
                      - x_hat * (weighted * x_hat).mean(-1, keepdim=True))


def _rms_norm_wide_forward(norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # HF's RMSNorm computes in float32 even for float64 input; this keeps the wider dtype.
    wide = torch.promote_types(hidden_states.dtype, torch.float32)
    x = hidden_states.to(wide)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(hidden_states.dtype)


@dataclasses.dataclass(frozen=True)
class LayerParts:
    attn_norm: nn.Module
    attn: nn.Module
    mlp_norm: nn.Module
    mlp: nn.Module
    # Separate q, k, v projections reading the normed residual, or None when fused.
    qkv_projections: tuple[nn.Module, nn.Module, nn.Module] | None
    # A fused projection whose output splits into q, k, v along the last dim (GPT-2's c_attn).
    fused_qkv: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class ArchitectureAdapter:
    family: str
    architectures: tuple[str, ...]
    layers: Callable[[nn.Module], nn.ModuleList]
    parts: Callable[[nn.Module], LayerParts]
    final_norm: Callable[[nn.Module], nn.Module]
    norm_vjp: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    # (weight, split sizes) of a fused q/k/v projection: input gradient of part i is
    # grad_i @ weight_i^T. None for adapters with separate projections.
    fused_qkv_weights: Callable[[nn.Module], tuple[torch.Tensor, ...]] | None = None
    rms_norms: bool = False
    # The config field giving the rows of a learned position table (GPT-2's n_positions): a token
    # past it has no position embedding. None: rotary positions, no table.
    position_table: str | None = None

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    @contextlib.contextmanager
    def exact_precision(self, model: nn.Module) -> Iterator[None]:
        """Make a float64 model compute its norms in float64 (HF upcasts only to float32)."""
        if model.dtype != torch.float64 or not self.rms_norms:
            yield
            return
        norms = [self.final_norm(model)] + [m for layer in self.layers(model)
                                            for m in (self.parts(layer).attn_norm,
                                                      self.parts(layer).mlp_norm)]
        for norm in norms:
            norm.forward = _rms_norm_wide_forward.__get__(norm)
        try:
            yield
        finally:
            for norm in norms:
                del norm.forward


def _llama_parts(layer: nn.Module) -> LayerParts:
    attn = layer.self_attn
    return LayerParts(attn_norm=layer.input_layernorm, attn=attn,
                      mlp_norm=layer.post_attention_layernorm, mlp=layer.mlp,
                      qkv_projections=(attn.q_proj, attn.k_proj, attn.v_proj))


def _gpt2_parts(block: nn.Module) -> LayerParts:
    return LayerParts(attn_norm=block.ln_1, attn=block.attn, mlp_norm=block.ln_2, mlp=block.mlp,
                      qkv_projections=None, fused_qkv=block.attn.c_attn)


def _gpt2_qkv_weights(c_attn: nn.Module) -> tuple[torch.Tensor, ...]:
    # Conv1D stores weight as [in, out] and computes x @ W + b; out = [q | k | v].
    return tuple(w.T for w in c_attn.weight.chunk(3, dim=1))


LLAMA_FAMILY = ArchitectureAdapter(
    family="llama",
    architectures=("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"),
    layers=lambda model: model.base_model.layers,
    parts=_llama_parts,
    final_norm=lambda model: model.base_model.norm,
    norm_vjp=rms_norm_vjp,
    rms_norms=True,
)

GPT2_FAMILY = ArchitectureAdapter(
    family="gpt2",
    architectures=("GPT2LMHeadModel",),
    layers=lambda model: model.base_model.h,
    parts=_gpt2_parts,
    final_norm=lambda model: model.base_model.ln_f,
    norm_vjp=layer_norm_vjp,
    fused_qkv_weights=_gpt2_qkv_weights,
    position_table="n_positions",
)

ADAPTERS = (LLAMA_FAMILY, GPT2_FAMILY)


def position_limit(config) -> int | None:
    """How many positions a model of this transformers config can embed (None: no fixed limit)."""
    architecture = (config.architectures or [type(config).__name__])[0]
    for adapter in ADAPTERS:
        if architecture in adapter.architectures and adapter.position_table:
            return int(getattr(config, adapter.position_table))
    return None


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a model, chosen by its class name (the config's architecture)."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.architectures:
            return adapter
    supported = [a for adapter in ADAPTERS for a in adapter.architectures]
    raise UnsupportedArchitectureError(
        f"architecture {name} is not supported (supported: {', '.join(supported)}). Its residual "
        f"stream layout is unknown, so edge scores cannot be computed; add an adapter in "
        f"core/adapters.py that says where its embedding, attention, MLP and norms are.")
