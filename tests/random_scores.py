"""Random score summaries on a graph, for tests of views that take mean matrices (no model)."""

import numpy as np

from core.graph import ResidualGraph


def random_means(graph: ResidualGraph, seed: int = 0) -> dict[str, np.ndarray]:
    """Both models' mean |W| (positive) and mean W on the real edges, zero elsewhere."""
    rng = np.random.default_rng(seed)
    shape = (graph.n_src, graph.n_dst)
    mask = graph.real_edge_mask
    return {"base_abs": np.where(mask, rng.uniform(0.1, 1.0, shape), 0.0),
            "post_abs": np.where(mask, rng.uniform(0.1, 1.0, shape), 0.0),
            "base_signed": np.where(mask, rng.normal(size=shape), 0.0),
            "post_signed": np.where(mask, rng.normal(size=shape), 0.0)}
