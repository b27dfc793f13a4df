"""EAP cost against a plain forward+backward of the same loss, on a SmolLM2-135M-shaped random Llama;
and, in the same run, what position parts and EAP-IG add.

Prints, per sequence length, EAP time / plain time (targets <= 1.10) and EAP peak memory / plain peak
memory (target <= 1.15); EAP (position parts on, the default) against EAP without them; and EAP-IG
with m = 5 against EAP; all measured in this run. Last line, at 512 tokens:
`time_ratio=... mem_ratio=... parts_time_ratio=... parts_mem_ratio=... ig5_time_ratio=... ig5_mem_ratio=...`.
Both sides use frozen weights and the same loss (core.eap.forward_loss). Time: median of interleaved
repeats in one process. Memory: each measurement in a fresh subprocess; peak resident memory above
the level after the model is built (Linux VmHWM, reset through /proc/self/clear_refs; glibc's
dynamic mmap threshold is fixed so that freed tensors leave the resident set and repeated runs agree),
or torch.cuda.max_memory_allocated on CUDA.

Usage: python benchmarks/bench_eap.py [--lengths 256 512 1024] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from core.eap import Sample, forward_loss, score_samples
from core.settings import ScoreSettings

PROMPT_FRACTION = 0.25


def smollm2_shaped_model(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model.to(device)


def sample_of_length(n_tokens: int) -> Sample:
    generator = torch.Generator().manual_seed(n_tokens)
    prompt = int(n_tokens * PROMPT_FRACTION)
    ids = torch.randint(0, 49152, (n_tokens + 1,), generator=generator).tolist()
    t_cut = n_tokens - prompt + 1
    return Sample(f"len{n_tokens}", tuple(ids[:prompt]), tuple(ids[prompt:prompt + t_cut]), t_cut)


def plain_forward_backward(model, sample: Sample) -> None:
    forward_loss(model, [sample]).sum().backward()


def scorer(settings: ScoreSettings):
    def run(model, sample: Sample) -> None:
        score_samples(model, [sample], settings)
    return run


PASSES = {"plain": plain_forward_backward, "eap": scorer(ScoreSettings()),
          "no_parts": scorer(ScoreSettings(position_parts=False)),
          "ig5": scorer(ScoreSettings(method="eap-ig", ig_steps=5))}


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(model, sample: Sample, repeats: int, device: str) -> dict[str, float]:
    for run_pass in PASSES.values():  # warm-up
        run_pass(model, sample)
    seconds = {name: [] for name in PASSES}
    for _ in range(repeats):
        for name, run_pass in PASSES.items():
            synchronise(device)
            start = time.perf_counter()
            run_pass(model, sample)
            synchronise(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _read_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_bytes(pass_name: str, n_tokens: int, device: str) -> int:
    """Peak memory of one call above the level with the model built (run in a fresh process)."""
    model = smollm2_shaped_model(device)
    sample = sample_of_length(n_tokens)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        PASSES[pass_name](model, sample)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _read_kib("VmRSS")
    PASSES[pass_name](model, sample)
    return (_read_kib("VmHWM") - base) * 1024


def peak_in_subprocess(pass_name: str, n_tokens: int, device: str) -> int:
    completed = subprocess.run(
        [sys.executable, __file__, "--peak-of", pass_name, str(n_tokens), "--device", device],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072"})
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-of", nargs=2, metavar=("PASS", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps({"peak_bytes": measure_peak_bytes(args.peak_of[0], int(args.peak_of[1]),
                                                          args.device)}))
        return

    model = smollm2_shaped_model(args.device)
    print(f"SmolLM2-135M-shaped random Llama (30 layers, d=576, 9 heads / 3 KV heads), {args.device}, "
          f"{torch.get_num_threads()} threads, float32, batch 1, prompt {PROMPT_FRACTION:.0%} of tokens")
    # Each ratio: (pass, against); eap is the default (position parts on), no_parts EAP without them.
    ratios = {"": ("eap", "plain"), "parts_": ("eap", "no_parts"), "ig5_": ("ig5", "eap")}
    print(f"{'tokens':>6} " + " ".join(f"{name + ' s':>10}" for name in PASSES) + " "
          + " ".join(f"{name + ' MB':>11}" for name in PASSES) + " "
          + " ".join(f"{prefix + 'time x':>13} {prefix + 'mem x':>12}" for prefix in ratios))
    at = {}
    for n_tokens in args.lengths:
        sample = sample_of_length(n_tokens)
        seconds = median_seconds(model, sample, args.repeats, args.device)
        mb = {name: peak_in_subprocess(name, n_tokens, args.device) / 2**20 for name in PASSES}
        at[n_tokens] = {prefix: (seconds[a] / seconds[b], mb[a] / mb[b])
                        for prefix, (a, b) in ratios.items()}
        print(f"{n_tokens:>6} " + " ".join(f"{seconds[name]:>10.3f}" for name in PASSES) + " "
              + " ".join(f"{mb[name]:>11.1f}" for name in PASSES) + " "
              + " ".join(f"{t:>13.3f} {m:>12.3f}" for t, m in at[n_tokens].values()))
    key = 512 if 512 in at else args.lengths[0]
    print(" ".join(f"{prefix}time_ratio={at[key][prefix][0]:.3f} {prefix}mem_ratio={at[key][prefix][1]:.3f}"
                   for prefix in ratios))


if __name__ == "__main__":
    main()
