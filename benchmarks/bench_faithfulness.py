"""Edge ablation throughput against one plain forward pass of the same sample, on a small random Llama.

Prints, for each number of copies per pass, the edges ablated per second and that rate times the time
of one plain forward pass (no gradients) of the sample: edges per forward-pass time, 1.0 meaning an
ablation costs exactly one plain forward. Then the recovery curve's time in plain forward passes, and
the scores' cost: EAP and EAP-IG with --ig-steps m on the same sample, and their ratio (about m is
expected: m forward + backward passes against one). Times are medians of interleaved repeats in this
one process; the last line is `edges_per_second=<at the most copies> edges_per_forward=<same>
eap_ig_over_eap=<ratio>`.

Usage: python benchmarks/bench_faithfulness.py [--layers 4] [--hidden 256] [--tokens 64] [--edges 16]
       [--copies 1 8] [--ig-steps 5] [--repeats 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from core.eap import Sample, forward_loss, frozen_eval, score_samples
from core.faithfulness import RECOVERY_FRACTIONS, circuit_recovery, edge_ablation
from core.graph import ResidualGraph
from core.settings import ScoreSettings


def random_llama(layers: int, hidden: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 192, 1), max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model.to(device)


def sample_of_length(n_tokens: int) -> Sample:
    ids = torch.randint(0, 4096, (n_tokens + 1,), generator=torch.Generator().manual_seed(n_tokens)).tolist()
    prompt = n_tokens // 4
    return Sample(f"len{n_tokens}", tuple(ids[:prompt]), tuple(ids[prompt:]), n_tokens + 1 - prompt)


def seconds(call, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--edges", type=int, default=16, help="edges ablated per measurement")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 8], help="interventions per pass")
    parser.add_argument("--ig-steps", type=int, default=5, help="EAP-IG's path points, timed against EAP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = random_llama(args.layers, args.hidden, args.device)
    sample = sample_of_length(args.tokens)
    graph = ResidualGraph(args.layers, "qkv")
    edges = [(int(s), int(d)) for s, d in zip(*np.nonzero(graph.real_edge_mask))]
    edges = [edges[i] for i in np.random.default_rng(0).choice(len(edges), min(args.edges, len(edges)),
                                                                replace=False)]

    def plain() -> None:
        with frozen_eval(model), torch.no_grad():
            forward_loss(model, [sample])

    methods = {"plain": plain}
    for copies in args.copies:
        methods[f"copies={copies}"] = lambda copies=copies: edge_ablation(model, sample, graph, edges,
                                                                          copies=copies)
    # One sample's circuits, ranked by one strength matrix (cross-fitting ranks them on the other
    # half's mean |W|; the forward passes are the same).
    strength = graph.dense(np.random.default_rng(1).random(graph.n_edges))[None]
    methods["recovery"] = lambda: circuit_recovery(model, [sample], graph, strength)
    eap = ScoreSettings(device=args.device)
    eap_ig = ScoreSettings(device=args.device, method="eap-ig", ig_steps=args.ig_steps)
    methods["eap"] = lambda: score_samples(model, [sample], eap)
    methods["eap-ig"] = lambda: score_samples(model, [sample], eap_ig)
    for method in methods.values():  # warm-up
        method()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, method in methods.items():
            times[name].append(seconds(method, args.device))
    median = {name: statistics.median(values) for name, values in times.items()}

    print(f"random Llama ({args.layers} layers, d={args.hidden}, {graph.n_edges} real qkv edges), "
          f"{args.tokens} tokens, {args.device}, {torch.get_num_threads()} threads, float32; plain forward "
          f"{median['plain'] * 1e3:.1f} ms; {len(edges)} edges per measurement (+1 clean pass)")
    print(f"{'copies':>6} {'seconds':>8} {'edges/s':>8} {'edges/forward':>13}")
    rate = {}
    for copies in args.copies:
        spent = median[f"copies={copies}"]
        rate[copies] = len(edges) / spent
        print(f"{copies:>6} {spent:>8.3f} {rate[copies]:>8.1f} {rate[copies] * median['plain']:>13.3f}")
    print(f"recovery curve ({len(RECOVERY_FRACTIONS)} fractions): {median['recovery']:.3f} s = "
          f"{median['recovery'] / median['plain']:.1f} plain forwards")
    ig_ratio = median["eap-ig"] / median["eap"]
    print(f"scores: eap {median['eap']:.3f} s, eap-ig m={args.ig_steps} {median['eap-ig']:.3f} s "
          f"({ig_ratio:.2f} x eap)")
    most = max(args.copies)
    print(f"edges_per_second={rate[most]:.1f} edges_per_forward={rate[most] * median['plain']:.3f} "
          f"eap_ig_over_eap={ig_ratio:.2f}")


if __name__ == "__main__":
    main()
