"""`python -m core score`: edge scores of samples given as token ids, without the pipeline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from core.graph import ResidualGraph
from core.settings import ScoreSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help="score samples (JSONL of token ids) with EAP and write an .npz",
        description="Each JSONL line: {\"id\": ..., \"prompt_ids\": [...], \"answer_ids\": [...], "
                    "\"t_cut\": int}. The .npz holds scores [n, n_src, n_dst], src_names, dst_names, "
                    "real_edge_mask, sample_ids and loss.")
    parser.add_argument("--model", required=True, help="local folder or hub id (safetensors only)")
    parser.add_argument("--samples", required=True, type=Path, help="JSONL file of samples")
    parser.add_argument("--out", required=True, type=Path, help="output .npz file")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own code from the hub (off by default)")
    ScoreSettings.add_arguments(parser)
    parser.set_defaults(handler=run)


def read_samples(path: Path):
    from core.eap import Sample

    if not path.exists():
        raise FileNotFoundError(f"samples file {path} does not exist")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            samples.append(Sample(str(row["id"]), tuple(int(t) for t in row["prompt_ids"]),
                                  tuple(int(t) for t in row["answer_ids"]), int(row["t_cut"])))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a sample line ({error!r}); expected keys id, "
                             f"prompt_ids, answer_ids, t_cut") from None
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.eap import score_samples
    from core.models import load_causal_lm

    settings = ScoreSettings.from_namespace(args)
    samples = read_samples(args.samples)
    model = load_causal_lm(args.model, settings.dtype, settings.device, args.trust_remote_code)
    with tqdm(total=len(samples), desc="scoring", unit="sample") as bar:
        result = score_samples(model, samples, settings,
                               progress=lambda done, total: bar.update(done - bar.n))
    save_score_file(args.out, result)
    print(f"wrote {len(samples)} samples x {result.graph.n_edges} edges to {args.out}")
    return 0


def save_score_file(path: Path, result) -> None:
    """The .npz format read by load_score_file and `python -m core metrics`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = result.graph
    with path.open("wb") as handle:  # a file handle keeps np.savez from appending ".npz"
        np.savez(handle, scores=result.scores, src_names=np.array(graph.src_names),
                 dst_names=np.array(graph.dst_names), real_edge_mask=graph.real_edge_mask,
                 sample_ids=np.array(result.sample_ids), loss=result.loss)


def load_score_file(path: Path) -> tuple[np.ndarray, ResidualGraph, list[str]]:
    """Scores [n, n_src, n_dst], their graph and sample ids from an .npz of `python -m core score`."""
    if not path.exists():
        raise FileNotFoundError(f"score file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        missing = {"scores", "src_names", "dst_names", "real_edge_mask", "sample_ids"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; write it with `python -m core score`")
        scores, sample_ids = data["scores"], [str(i) for i in data["sample_ids"]]
        src_names, dst_names = tuple(map(str, data["src_names"])), tuple(map(str, data["dst_names"]))
        mask = data["real_edge_mask"]
    n_layers = (len(src_names) - 1) // 2
    granularity = {4 * n_layers + 1: "qkv", 2 * n_layers + 1: "module"}.get(len(dst_names))
    graph = ResidualGraph(max(n_layers, 1), granularity or "qkv")
    if (granularity is None or (src_names, dst_names) != (graph.src_names, graph.dst_names)
            or not np.array_equal(mask, graph.real_edge_mask)):
        raise ValueError(f"{path}: its node names and edge mask are not those of a residual graph "
                         f"({len(src_names)} sources, {len(dst_names)} slots)")
    if len(sample_ids) != scores.shape[0]:
        raise ValueError(f"{path} has {scores.shape[0]} score matrices but {len(sample_ids)} sample ids")
    return scores, graph, sample_ids
