"""Throughput of the demo's two heavy stages against their batch sizes, on a SmolLM2-135M-shaped
random Llama with the demo's shapes: prompts of 64-73 tokens, answers of 64 tokens, scored at the
T_cuts of the paper's alphas on 64-token answers (1, 6, 18, 31).

Scoring: samples per second of `score_samples` at each --score-batches size, as the pipeline hands
samples over (core.pipeline: chunks of `batch_size` rows, the cuts of an answer sharing a forward
pass, core.eap.shared_rows), against one forward pass per cut (chunks of `batch_size` samples in
T_cut-major order, so no chunk holds two cuts of one answer: the pipeline before shared rows).
Generation: answers per second of `generate_greedy` at each --gen-batches size, against
the smallest, and against transformers' greedy `generate` at the largest (the prompts share the
demo's 24-token system turn; the random model never ends an answer early). Interleaved repeats in
one process, medians. Results do not depend on the batch size (tests/test_eap.py checks scores,
tests/test_generation.py answers); only speed does.

Usage: python benchmarks/bench_demo_throughput.py [--questions 8] [--repeats 3] [--threads 2]
Last line: `score_rows_vs_per_cut_b<k>=... gen_speedup_b<k>=... gen_vs_hf_generate_b<k>=...`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_eap import smollm2_shaped_model  # this script's folder is on sys.path

from core.eap import Sample, score_samples, shared_rows
from core.generation import generate_greedy
from core.settings import ScoreSettings

ANSWER_TOKENS = 64
T_CUTS = (1, 6, 18, 31)


# Tokens every demo prompt starts with: the chat template's system turn.
SHARED_PREFIX = 24


def demo_shaped_prompts(n: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(n)
    prefix = torch.randint(1, 49152, (SHARED_PREFIX,), generator=generator).tolist()
    return [prefix + torch.randint(1, 49152, (64 - SHARED_PREFIX + i % 10,), generator=generator).tolist()
            for i in range(n)]


def demo_shaped_samples(n_questions: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(0)
    questions = [(f"q{q}", tuple(prompt), tuple(torch.randint(1, 49152, (ANSWER_TOKENS,),
                                                              generator=generator).tolist()))
                 for q, prompt in enumerate(demo_shaped_prompts(n_questions))]
    return [Sample(qid, prompt, answer, cut) for cut in T_CUTS for qid, prompt, answer in questions]


def score_per_cut(model, samples: list[Sample], batch_size: int) -> None:
    """The baseline: one score_samples call per chunk of `batch_size` samples, T_cut-major, so each
    cut runs its own forward pass."""
    settings = ScoreSettings(batch_size=batch_size)
    for start in range(0, len(samples), batch_size):
        score_samples(model, samples[start:start + batch_size], settings)


def score_rows(model, samples: list[Sample], batch_size: int) -> None:
    """As core.pipeline does: one score_samples call per chunk of `batch_size` rows."""
    settings = ScoreSettings(batch_size=batch_size)
    rows = shared_rows(samples)
    for start in range(0, len(rows), batch_size):
        score_samples(model, [samples[i] for row in rows[start:start + batch_size] for i in row],
                      settings)


def hf_generate(model, prompts: list[list[int]]) -> None:
    """The baseline: transformers' own greedy `generate`, left-padded, the same number of tokens."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False, pad_token_id=0,
                   max_new_tokens=ANSWER_TOKENS, min_new_tokens=ANSWER_TOKENS)


class _Tokenizer:
    """What generate_greedy needs of a tokenizer, for a model whose EOS is never produced on purpose."""
    eos_token_id = 0
    pad_token_id = 0


def interleaved_medians(runs: dict[str, callable], repeats: int) -> dict[str, float]:
    for run in runs.values():  # warm-up
        run()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8, help="questions scored (x4 T_cuts)")
    parser.add_argument("--score-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts", type=int, default=64, help="prompts generated")
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = smollm2_shaped_model("cpu")
    print(f"SmolLM2-135M-shaped random Llama, cpu, {torch.get_num_threads()} threads, float32")

    samples = demo_shaped_samples(args.questions)
    score_runs = {}
    for b in args.score_batches:
        score_runs[("per cut", b)] = lambda b=b: score_per_cut(model, samples, b)
        score_runs[("rows", b)] = lambda b=b: score_rows(model, samples, b)
    score = interleaved_medians(score_runs, args.repeats)
    for (kind, b), seconds in score.items():
        print(f"score batch {b:>3} {kind:>7}: {len(samples) / seconds:6.2f} samples/s "
              f"({seconds:.2f} s for {len(samples)})")

    prompts = demo_shaped_prompts(args.prompts)
    gen_runs = {b: (lambda b=b: generate_greedy(model, _Tokenizer(), prompts, ANSWER_TOKENS, batch_size=b))
                for b in args.gen_batches}
    largest = max(args.gen_batches)
    gen_runs["hf"] = lambda: [hf_generate(model, prompts[start:start + largest])
                              for start in range(0, len(prompts), largest)]
    gen = interleaved_medians(gen_runs, args.repeats)
    baseline = gen.pop("hf")
    for b, seconds in gen.items():
        print(f"generate batch {b:>3}: {len(prompts) / seconds:6.2f} answers/s "
              f"({seconds:.2f} s for {len(prompts)} x {ANSWER_TOKENS} tokens), "
              f"x{gen[args.gen_batches[0]] / seconds:.2f}")
    print(f"transformers generate, batch {largest}: {baseline:.2f} s; ours at that batch "
          f"x{baseline / gen[largest]:.2f}")
    print(" ".join([f"score_rows_vs_per_cut_b{b}={score['per cut', b] / score['rows', b]:.3f}"
                    for b in args.score_batches]
                   + [f"gen_speedup_b{b}={gen[args.gen_batches[0]] / s:.3f}" for b, s in gen.items()]
                   + [f"gen_vs_hf_generate_b{largest}={baseline / gen[largest]:.3f}"]))


if __name__ == "__main__":
    main()
