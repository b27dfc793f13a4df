"""benchmarks/bench_gpu.py --tiny: the GPU benchmark's code path, run on the CPU in seconds."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_sweep_reaches_every_length_and_ends_with_the_summary_line():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny"],
                               capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    last = completed.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"max_tokens=(\d+) time_ratio=(\S+) mem_ratio=(\S+)", last)
    assert match, last
    assert int(match[1]) == 1024
    time_ratio, mem_ratio = float(match[2]), float(match[3])
    # EAP adds the source buffer and the scoring to the same checkpointed pass: it costs more than
    # the plain pass, not orders of magnitude more.
    assert 0.2 < time_ratio < 20 and 0.5 < mem_ratio < 20
