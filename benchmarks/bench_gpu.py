"""Long answers on one GPU: EAP on a Qwen2.5-7B-shaped random Qwen2 (built from its config, no
download; bfloat16, SDPA attention) at 1k to 32k tokens, against a plain forward+backward of the same
loss with the same activation checkpointing (core.eap.forward_loss(checkpointed=True)).

Per length: seconds and peak memory above the loaded model (torch.cuda.max_memory_allocated) of both,
their ratios, EAP's throughput in tokens/s, and the memory model's prediction (core.eap.peak_bytes)
beside the measured peak. A length that runs out of memory ends the sweep (longer ones need more);
so does one that the time budget cannot fit, judged from the previous length's time. Last line:
`max_tokens=<n> time_ratio=<at 4k> mem_ratio=<at 4k>` (nan where 4k did not run).

`--tiny` runs the same code on the CPU in seconds: a tiny Qwen2 in float32, lengths 32 to 1024 (the
last line reports 1024: at shorter lengths the peaks are a few MB, which the allocator's reuse of
freed memory dominates), memory as the peak resident set above the start (Linux VmHWM).

Usage: python benchmarks/bench_gpu.py [--budget-s 420] [--tiny]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import time
from pathlib import Path

import torch

from core.eap import ModelShape, Sample, forward_loss, peak_bytes, plan_memory, score_samples
from core.settings import ScoreSettings

PROMPT_FRACTION = 0.25
# The answer lengths of the sweep, and the one whose ratios the last line reports (4k; --tiny reports
# its longest, for the reason the docstring gives).
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
TINY_LENGTHS = (32, 64, 128, 256, 512, 1024)
REPORTED = 2
# Each length is assumed to take at most this many times the previous one (attention grows faster
# than linearly at long lengths; checked before it starts, against the time budget left).
GROWTH = 3.0


def qwen2_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=False)
    # Qwen2.5-7B's shape.
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def build_model(tiny: bool, device: str):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(qwen2_config(tiny), dtype=dtype,
                                              attn_implementation="sdpa")
    model.requires_grad_(False)
    return model.eval()


def sample_of_length(n_tokens: int, vocab: int) -> Sample:
    generator = torch.Generator().manual_seed(n_tokens)
    prompt = int(n_tokens * PROMPT_FRACTION)
    ids = torch.randint(0, vocab, (n_tokens + 1,), generator=generator).tolist()
    t_cut = n_tokens - prompt + 1
    return Sample(f"len{n_tokens}", tuple(ids[:prompt]), tuple(ids[prompt:prompt + t_cut]), t_cut)


class Meter:
    """Wall time and peak memory of one call, above the memory in use before it."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if not self.cuda:
            # glibc then maps every block of 128 KiB or more on its own and unmaps it when freed, so
            # the resident set follows the tensors alive (M_MMAP_THRESHOLD = -3).
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)

    def __call__(self, run) -> tuple[float, int]:
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            base = _read_kib("VmRSS") * 1024
        start = time.perf_counter()
        run()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if self.cuda else _read_kib("VmHWM") * 1024
        return seconds, peak - base


def _read_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 on the CPU, in seconds")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall time for the sweep after the model is built; a length that would "
                             "not fit is not started")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: the 7B sweep needs a GPU (run --tiny on the CPU)")
    device = "cpu" if args.tiny else "cuda"
    lengths = TINY_LENGTHS if args.tiny else LENGTHS
    began = time.perf_counter()
    model = build_model(args.tiny, device)
    shape = ModelShape.of(model)
    vocab = model.config.vocab_size
    settings = ScoreSettings(checkpointing="layers", source_buffer="auto")
    meter = Meter(device)

    def plain(sample: Sample):
        return lambda: forward_loss(model, [sample], checkpointed=True).sum().backward()

    def eap(sample: Sample):
        return lambda: score_samples(model, [sample], settings)

    # Warm-up (kernels, allocator) at the shortest length.
    warm = sample_of_length(lengths[0], vocab)
    plain(warm)()
    eap(warm)()
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
    print(f"Qwen2 {'tiny' if args.tiny else '7B-shaped'} random ({shape.n_layers} layers, "
          f"d={shape.d_model}, {shape.n_params / 1e9:.2f}B params), {device}, {model.dtype}, "
          f"SDPA, batch 1, prompt {PROMPT_FRACTION:.0%} of tokens, checkpointing per layer on both "
          f"sides; free memory after loading: {'n/a' if free is None else f'{free / 2**30:.1f} GiB'}")
    print(f"{'tokens':>6} {'plain s':>9} {'eap s':>9} {'time x':>7} {'plain MiB':>10} {'eap MiB':>9} "
          f"{'mem x':>6} {'model MiB':>10} {'buffer':>7} {'tok/s':>9}")
    ratios: dict[int, tuple[float, float]] = {}
    max_tokens = 0
    spent_last = 0.0
    sweep_start = time.perf_counter()
    for n_tokens in lengths:
        left = args.budget_s - (time.perf_counter() - sweep_start)
        if spent_last * GROWTH > left:
            print(f"{n_tokens:>6} not started: about {spent_last * GROWTH:.0f} s expected, {left:.0f} s "
                  f"of the budget left")
            break
        sample = sample_of_length(n_tokens, vocab)
        plan = plan_memory(shape, n_tokens, free, settings.checkpointing, settings.source_buffer)
        length_start = time.perf_counter()
        try:
            plain_s, plain_bytes = meter(plain(sample))
            eap_s, eap_bytes = meter(eap(sample))
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"{n_tokens:>6} out of memory: {str(error).splitlines()[0][:120]}")
            break
        spent_last = time.perf_counter() - length_start
        max_tokens = n_tokens
        ratios[n_tokens] = (eap_s / plain_s, eap_bytes / plain_bytes)
        modelled = peak_bytes(shape, n_tokens, plan.checkpointing, plan.source_on_device)
        modelled -= shape.n_params * shape.dtype_bytes
        print(f"{n_tokens:>6} {plain_s:>9.3f} {eap_s:>9.3f} {eap_s / plain_s:>7.3f} "
              f"{plain_bytes / 2**20:>10.1f} {eap_bytes / 2**20:>9.1f} {eap_bytes / plain_bytes:>6.3f} "
              f"{modelled / 2**20:>10.1f} {'device' if plan.source_on_device else 'host':>7} "
              f"{n_tokens / eap_s:>9.1f}")
    print(f"total {time.perf_counter() - began:.1f} s")
    reported = TINY_LENGTHS[-1] if args.tiny else LENGTHS[REPORTED]
    time_ratio, mem_ratio = ratios.get(reported, (math.nan, math.nan))
    print(f"max_tokens={max_tokens} time_ratio={time_ratio:.3f} mem_ratio={mem_ratio:.3f}")


if __name__ == "__main__":
    main()
