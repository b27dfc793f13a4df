"""Reference edge scores by finite differences of real edge ablation (docs/method.md section 3).

W[s, d] = d/de L(H_d - e * O_s) at e = 0, where only slot d's branch sees the ablated input. This
module is deliberately independent of the engine's hooks: it perturbs the real forward pass.
"""

import torch

from core.adapters import adapter_for
from core.eap import forward_loss
from core.graph import ResidualGraph


def source_outputs(model, sample) -> list[torch.Tensor]:
    """Outputs of input, a0, m0, ... on one sample (batch of 1)."""
    adapter = adapter_for(model)
    outputs = {}
    handles = []
    layers = adapter.layers(model)

    def keep(index, from_input=False):
        def hook(module, args, kwargs_or_output, *rest):
            if from_input:
                value = args[0] if args else kwargs_or_output["hidden_states"]
            else:
                value = kwargs_or_output[0] if isinstance(kwargs_or_output, tuple) else kwargs_or_output
            outputs[index] = value.detach().clone()
        return hook

    handles.append(layers[0].register_forward_pre_hook(keep(0, True), with_kwargs=True))
    for l, layer in enumerate(layers):
        parts = adapter.parts(layer)
        handles.append(parts.attn.register_forward_hook(keep(1 + 2 * l)))
        handles.append(parts.mlp.register_forward_hook(keep(2 + 2 * l)))
    try:
        with torch.no_grad():
            forward_loss(model, [sample])
    finally:
        for h in handles:
            h.remove()
    return [outputs[i] for i in range(1 + 2 * len(layers))]


def ablated_loss(model, sample, graph: ResidualGraph, src: int, dst: int, eps: float,
                 sources: list[torch.Tensor]) -> float:
    """Loss with slot dst's branch input H_d replaced by H_d - eps * O_src."""
    adapter = adapter_for(model)
    name = graph.dst_names[dst]
    delta = eps * sources[src]
    handles = []
    if name == "logits":
        target = adapter.final_norm(model)
        handles.append(target.register_forward_pre_hook(lambda m, args: (args[0] - delta,) + args[1:]))
    else:
        layer = int(name[1:].split("<")[0])
        parts = adapter.parts(adapter.layers(model)[layer])
        if name.startswith("m"):
            handles.append(parts.mlp_norm.register_forward_pre_hook(
                lambda m, args: (args[0] - delta,) + args[1:]))
        elif "<" not in name:
            handles.append(parts.attn_norm.register_forward_pre_hook(
                lambda m, args: (args[0] - delta,) + args[1:]))
        else:
            path = "qkv".index(name[-2])
            residual = {}
            handles.append(parts.attn_norm.register_forward_pre_hook(
                lambda m, args: residual.__setitem__("x", args[0])))

            def ablated_normed():
                # forward() skips hooks; on a float64 model it is the exact-precision norm.
                return parts.attn_norm.forward(residual["x"] - delta)

            if parts.qkv_projections is not None:
                handles.append(parts.qkv_projections[path].register_forward_pre_hook(
                    lambda m, args: (ablated_normed(),) + args[1:]))
            else:
                def replace_part(module, args, output):
                    ablated = module.forward(ablated_normed()).chunk(3, dim=-1)[path]
                    pieces = list(output.chunk(3, dim=-1))
                    pieces[path] = ablated
                    return torch.cat(pieces, dim=-1)
                handles.append(parts.fused_qkv.register_forward_hook(replace_part))
    try:
        with torch.no_grad():
            return float(forward_loss(model, [sample])[0])
    finally:
        for h in handles:
            h.remove()


def finite_difference_scores(model, sample, graph: ResidualGraph, edges, eps: float = 1e-5) -> dict:
    """Central differences for the given (src, dst) index pairs."""
    adapter = adapter_for(model)
    with adapter.exact_precision(model):
        sources = source_outputs(model, sample)
        return {(s, d): (ablated_loss(model, sample, graph, s, d, eps, sources)
                         - ablated_loss(model, sample, graph, s, d, -eps, sources)) / (2 * eps)
                for s, d in edges}
