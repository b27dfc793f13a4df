"""The residual graph of a pre-norm decoder (docs/method.md section 2), built from (n_layers, granularity).

Sources, in computation order: `input`, `a0`, `m0`, `a1`, `m1`, ... (index 0, then 1+2l and 2+2l).
Destination slots, in computation order:
- granularity `qkv`: `a{l}<q>`, `a{l}<k>`, `a{l}<v>`, `m{l}` per layer, then `logits`;
- granularity `module`: `a{l}`, `m{l}` per layer, then `logits`.
Because both lists are in computation order, the real sources of every slot form a prefix of the
source list, so a score matrix is dense [n_src, n_dst] with a lower-staircase real-edge mask.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from core.settings import SettingsError
from core.vocab import GRANULARITIES, Granularity

QKV = ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class ResidualGraph:
    n_layers: int
    granularity: Granularity = "qkv"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise SettingsError(f"granularity={self.granularity!r} is not one of {list(GRANULARITIES)}")
        if self.n_layers < 1:
            raise SettingsError(f"n_layers={self.n_layers} must be at least 1")

    @functools.cached_property
    def src_names(self) -> tuple[str, ...]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}", f"m{layer}"]
        return tuple(names)

    @functools.cached_property
    def dst_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for layer in range(self.n_layers):
            if self.granularity == "qkv":
                names += [f"a{layer}<{p}>" for p in QKV]
            else:
                names.append(f"a{layer}")
            names.append(f"m{layer}")
        return tuple(names + ["logits"])

    @property
    def n_src(self) -> int:
        return 1 + 2 * self.n_layers

    @property
    def n_dst(self) -> int:
        return (4 if self.granularity == "qkv" else 2) * self.n_layers + 1

    @property
    def slots_per_layer(self) -> int:
        return 4 if self.granularity == "qkv" else 2

    @staticmethod
    def attn_src(layer: int) -> int:
        return 1 + 2 * layer

    @staticmethod
    def mlp_src(layer: int) -> int:
        return 2 + 2 * layer

    def attn_dst(self, layer: int, path: str | None = None) -> int:
        """Slot of layer `layer`'s attention input; `path` in q/k/v for granularity qkv."""
        if self.granularity == "qkv":
            return 4 * layer + QKV.index(path)
        return 2 * layer

    def mlp_dst(self, layer: int) -> int:
        return self.slots_per_layer * layer + self.slots_per_layer - 1

    @property
    def logits_dst(self) -> int:
        return self.n_dst - 1

    @functools.cached_property
    def n_sources_before(self) -> np.ndarray:
        """For each slot, the number of sources it reads: its real sources are src[:k]."""
        counts = []
        for layer in range(self.n_layers):
            counts += [1 + 2 * layer] * (self.slots_per_layer - 1) + [2 + 2 * layer]
        return np.array(counts + [self.n_src], dtype=np.int64)

    @functools.cached_property
    def real_edge_mask(self) -> np.ndarray:
        mask = np.arange(self.n_src)[:, None] < self.n_sources_before[None, :]
        mask.flags.writeable = False
        return mask

    @property
    def n_edges(self) -> int:
        return int(self.real_edge_mask.sum())

    @functools.cached_property
    def edge_names(self) -> tuple[str, ...]:
        """Names `src->dst` of the real edges, in row-major order of the dense matrix."""
        src, dst = np.nonzero(self.real_edge_mask)
        return tuple(f"{self.src_names[s]}->{self.dst_names[d]}" for s, d in zip(src, dst))

    def src_index(self, name: str) -> int:
        return _lookup(self.src_names, name, "source")

    def dst_index(self, name: str) -> int:
        return _lookup(self.dst_names, name, "destination slot")

    def edges(self, scores: np.ndarray) -> np.ndarray:
        """Real-edge values of dense matrices [..., n_src, n_dst] -> [..., n_edges]."""
        return scores[..., self.real_edge_mask]

    def dense(self, edge_values: np.ndarray) -> np.ndarray:
        """Inverse of `edges`: [..., n_edges] -> [..., n_src, n_dst] with zeros at non-edges."""
        out = np.zeros(edge_values.shape[:-1] + (self.n_src, self.n_dst), dtype=edge_values.dtype)
        out[..., self.real_edge_mask] = edge_values
        return out

    def to_module(self, scores: np.ndarray) -> np.ndarray:
        """Sum the q/k/v slots of a qkv matrix [..., n_src, 4L+1] into module slots [..., 2L+1]."""
        if self.granularity == "module":
            return scores
        L = self.n_layers
        per_layer = scores[..., : 4 * L].reshape(scores.shape[:-1] + (L, 4))
        attn = per_layer[..., :3].sum(-1)
        mlp = per_layer[..., 3]
        module = np.stack([attn, mlp], axis=-1).reshape(scores.shape[:-1] + (2 * L,))
        return np.concatenate([module, scores[..., -1:]], axis=-1)


def _lookup(names: tuple[str, ...], name: str, what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise KeyError(f"unknown {what} {name!r}; known: {names[0]} ... {names[-1]}") from None
