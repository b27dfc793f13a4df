"""Loading Hugging Face causal LMs safely: safetensors only, remote code off unless asked."""

from __future__ import annotations

import os

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def torch_dtype(name: str):
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPE_NAMES)}")
    return getattr(torch, name)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return device


def load_causal_lm(path_or_id: str, dtype: str = "float32", device: str = "auto",
                   trust_remote_code: bool = False, revision: str | None = None):
    """A causal LM in eval mode with frozen weights, from a local folder or a hub id.

    Only safetensors weights are accepted (a pickled checkpoint can run arbitrary code).
    """
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path_or_id) and os.path.exists(path_or_id):
        raise ValueError(f"model {path_or_id!r} is a file; give the folder that holds config.json "
                         f"and *.safetensors, or a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path_or_id, dtype=torch_dtype(dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code, revision=revision)
    except OSError as error:
        raise ValueError(f"cannot load model {path_or_id!r}: it is neither a local folder with "
                         f"safetensors weights nor a reachable hub id ({error})") from error
    model.requires_grad_(False)
    return model.eval().to(resolve_device(device))
