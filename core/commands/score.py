"""`python -m core score`: edge scores of samples given as token ids, without the pipeline."""

from __future__ import annotations

import argparse
import collections
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from core.errors import InputError, check_output_file
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


SAMPLE_KEYS = ("id", "prompt_ids", "answer_ids", "t_cut")


def read_samples(path: Path):
    """The samples of a JSONL file, one per line (blank lines skipped); an error names the file and
    line (from 1). Token ids and t_cut are taken as written: a string or 1.9 is refused, not cast."""
    from core.eap import InvalidSampleError, Sample

    if not path.is_file():
        raise InputError(f"samples file {path} does not exist" if not path.exists() else
                         f"samples path {path} is not a file; give a .jsonl file")
    samples = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}, line {number}"
            try:
                row = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
                raise InputError(f"{where}: not a JSON line ({' '.join(str(error).split())})") from None
            if row is None:
                continue
            if not isinstance(row, dict) or set(SAMPLE_KEYS) - set(row):
                raise InputError(f"{where}: not a sample; expected an object with keys "
                                 f"{', '.join(SAMPLE_KEYS)}")
            for field in ("prompt_ids", "answer_ids"):
                if not isinstance(row[field], list):
                    raise InputError(f"{where}: {field} is {type(row[field]).__name__}, not a list "
                                     f"of token ids")
            try:
                samples.append(Sample(str(row["id"]), tuple(row["prompt_ids"]),
                                      tuple(row["answer_ids"]), row["t_cut"]))
            except InvalidSampleError as error:
                raise InputError(f"{where}: {error}") from None
    if not samples:
        raise InputError(f"{path} holds no samples")
    return samples


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.eap import score_samples
    from core.models import load_causal_lm

    settings = ScoreSettings.from_namespace(args)
    check_output_file(args.out, "--out")
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
    graph = result.graph
    with path.open("wb") as handle:  # a file handle keeps np.savez from appending ".npz"
        np.savez(handle, scores=result.scores, src_names=np.array(graph.src_names),
                 dst_names=np.array(graph.dst_names), real_edge_mask=graph.real_edge_mask,
                 sample_ids=np.array(result.sample_ids), loss=result.loss)


def load_score_file(path: Path) -> tuple[np.ndarray, ResidualGraph, list[str]]:
    """Scores [n, n_src, n_dst], their graph and sample ids from an .npz of `python -m core score`."""
    if not path.is_file():
        raise InputError(f"score file {path} does not exist" if not path.exists() else
                         f"score path {path} is not a file; give an .npz of `python -m core score`")
    not_ours = InputError(f"{path} is not an .npz written by `python -m core score`; score the "
                          f"samples again to make one")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise not_ours
        with data:
            missing = {"scores", "src_names", "dst_names", "real_edge_mask", "sample_ids"} - set(data.files)
            if missing:
                raise InputError(f"{path} lacks {sorted(missing)}; write it with `python -m core score`")
            scores, sample_ids = data["scores"], [str(i) for i in data["sample_ids"]]
            src_names, dst_names = tuple(map(str, data["src_names"])), tuple(map(str, data["dst_names"]))
            mask = data["real_edge_mask"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if isinstance(error, InputError):
            raise
        # Not numpy's own words: they advise allow_pickle=True, which would run code from the file.
        raise not_ours from None
    n_layers = (len(src_names) - 1) // 2
    granularity = {4 * n_layers + 1: "qkv", 2 * n_layers + 1: "module"}.get(len(dst_names))
    graph = ResidualGraph(max(n_layers, 1), granularity or "qkv")
    if (granularity is None or (src_names, dst_names) != (graph.src_names, graph.dst_names)
            or not np.array_equal(mask, graph.real_edge_mask)):
        raise InputError(f"{path}: its node names and edge mask are not those of a residual graph "
                         f"({len(src_names)} sources, {len(dst_names)} slots)")
    if len(sample_ids) != scores.shape[0]:
        raise InputError(f"{path} has {scores.shape[0]} score matrices but {len(sample_ids)} sample ids")
    repeated = sorted(i for i, count in collections.Counter(sample_ids).items() if count > 1)
    if repeated:
        raise InputError(f"{path} holds the sample id {repeated[0]!r} more than once ({len(repeated)} "
                         f"id(s) repeated): samples are paired by id, so each must be unique; "
                         f"score each sample once")
    return scores, graph, sample_ids
