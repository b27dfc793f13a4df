"""Test-wide setup: never reach the network, keep CPU threads to what CI has."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The bootstrap simulations run many small matrix products: threads only add contention on 2 cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
