"""Loading Hugging Face causal LMs safely: safetensors only, remote code off unless asked."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from core.settings import stable_hash
from core.vocab import DTYPES, DType


def torch_dtype(name: DType):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    return getattr(torch, name)


# The values huggingface_hub itself reads as true for HF_HUB_OFFLINE.
_TRUE_VALUES = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the user switched the model hub off (HF_HUB_OFFLINE), read at call time so a
    caller's environment change counts."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in _TRUE_VALUES


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return device


def load_causal_lm(path_or_id: str, dtype: DType = "float32", device: str = "auto",
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


# --- Model specs: what a model is, and a fingerprint of its content ---------------------------

SPEC_KINDS = ("hub", "local", "adapter")
# Files of a model folder that determine its outputs (weights, config, tokenizer); hashed for the
# fingerprint of a local model or adapter.
FINGERPRINT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")


class TokenizerMismatchError(ValueError):
    """Models compared on the same questions do not share one tokenizer."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A hub id (with optional revision), a local folder, or a LoRA adapter on a base spec."""

    kind: str
    path: str
    revision: str | None = None
    base: "ModelSpec | None" = None

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {list(SPEC_KINDS)}")
        if (self.kind == "adapter") != (self.base is not None):
            raise ValueError("an adapter spec needs a base model, and only an adapter has one")

    @classmethod
    def from_config(cls, entry: dict, root: Path | None = None) -> "ModelSpec":
        """From a config entry: {hub = "org/name", revision = ...}, {path = "folder"} or
        {adapter = "folder", base = {...}}; relative folders are taken from `root`."""
        def local(folder: str) -> str:
            folder_path = Path(folder)
            return str(folder_path if folder_path.is_absolute() or root is None else root / folder_path)

        if "adapter" in entry:
            if "base" not in entry:
                raise ValueError(f"model entry {entry}: an adapter needs `base = {{...}}`")
            return cls("adapter", local(entry["adapter"]), base=cls.from_config(entry["base"], root))
        if "hub" in entry:
            return cls("hub", entry["hub"], revision=entry.get("revision"))
        if "path" in entry:
            return cls("local", local(entry["path"]))
        raise ValueError(f"model entry {entry} names no model: give `hub`, `path` or `adapter`")

    def describe(self) -> dict:
        """JSON-able identity of the spec (without its content fingerprint)."""
        out: dict = {"kind": self.kind, "path": self.path}
        if self.revision:
            out["revision"] = self.revision
        if self.base is not None:
            out["base"] = self.base.describe()
        return out

    def identity(self) -> dict:
        """What names the model apart from its content: the hub id of a hub model; nothing for
        a folder (its files' hash is its identity), so a moved checkout keeps its cache keys."""
        out: dict = {"kind": self.kind}
        if self.kind == "hub":
            out["hub"] = self.path
        if self.base is not None:
            out["base"] = self.base.identity()
        return out

    def __str__(self) -> str:
        if self.kind == "adapter":
            return f"{self.base} + adapter {self.path}"
        return f"{self.path}@{self.revision}" if self.revision else self.path

    # --- fingerprint --------------------------------------------------------------------------

    def fingerprint(self, file_hash=None) -> str:
        """Hub commit of a hub model; hash of the weight, config and tokenizer files of a folder;
        both for an adapter. `file_hash(path) -> hex` lets a caller memoise file hashes."""
        file_hash = file_hash or sha256_file
        if self.kind == "hub":
            return "hub:" + resolve_hub_commit(self.path, self.revision)
        folder_hash = hash_folder(self.path, file_hash)
        if self.kind == "adapter":
            return stable_hash(["adapter", self.base.fingerprint(file_hash), folder_hash])
        return "sha256:" + folder_hash

    def tokenizer_source(self) -> str:
        """Where the tokenizer lives: an adapter's own folder if it ships one, else its base."""
        if self.kind == "adapter":
            if (Path(self.path) / "tokenizer_config.json").exists():
                return self.path
            return self.base.tokenizer_source()
        return self.path

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        source = self.tokenizer_source()
        revision = self.revision if self.kind == "hub" else None
        try:
            return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        except OSError as error:
            raise ValueError(f"cannot load the tokenizer of {self} from {source!r}: {error}") from error

    def load(self, dtype: DType = "float32", device: str = "auto"):
        """The model in eval mode with frozen weights; an adapter is merged into its base
        (merge_and_unload), so scoring sees a plain model of the base's architecture."""
        if self.kind != "adapter":
            return load_causal_lm(self.path, dtype=dtype, device=device, revision=self.revision)
        from peft import PeftModel

        folder = Path(self.path)
        if not (folder / "adapter_config.json").exists():
            raise ValueError(f"adapter folder {folder} has no adapter_config.json; give the folder "
                             f"written by peft's save_pretrained")
        if not (folder / "adapter_model.safetensors").exists():
            raise ValueError(f"adapter folder {folder} has no adapter_model.safetensors; only "
                             f"safetensors adapters are loaded (a pickled .bin can run code)")
        base = self.base.load(dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False).merge_and_unload()
        model.requires_grad_(False)
        return model.eval()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_folder(folder: str | os.PathLike, file_hash=sha256_file) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist; give a folder with config.json "
                         f"and *.safetensors (or adapter_config.json), or a hub id")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"model folder {folder} holds no weight, config or tokenizer files")
    return stable_hash([[p.name, file_hash(p)] for p in files], length=32)


def resolve_hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a hub revision points to: asked of the hub when online, else read from the local
    hub cache. A 40-hex revision is already a commit."""
    import re

    import huggingface_hub

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if not hub_offline():
        try:
            return huggingface_hub.HfApi().model_info(repo_id, revision=revision).sha
        except Exception:  # noqa: BLE001 - unreachable hub: fall back to the local cache below
            pass
    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    if isinstance(cached, str):
        return Path(cached).parent.name
    raise ValueError(f"cannot fingerprint hub model {repo_id!r}"
                     f"{'@' + revision if revision else ''}: the hub is unreachable and it is not in "
                     f"the local hub cache; download it first (huggingface-cli download {repo_id}) or "
                     f"give a local folder")


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that maps text to ids: vocabulary, added and special tokens, chat template."""
    return stable_hash({
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "class": type(tokenizer).__name__})


def check_same_tokenizer(labelled_tokenizers: list[tuple[str, object]]) -> str:
    """Raise TokenizerMismatchError unless every model uses the same tokenizer; returns its
    fingerprint. The paired method feeds both models the same prompt ids."""
    first_label, first = labelled_tokenizers[0]
    first_print = tokenizer_fingerprint(first)
    for label, tokenizer in labelled_tokenizers[1:]:
        if tokenizer_fingerprint(tokenizer) == first_print:
            continue
        vocab_a, vocab_b = first.get_vocab(), tokenizer.get_vocab()
        differing = sorted(set(vocab_a.items()) ^ set(vocab_b.items()))[:3]
        detail = (f"vocabularies differ ({len(vocab_a)} vs {len(vocab_b)} tokens; e.g. {differing})"
                  if differing else "special tokens or chat templates differ")
        raise TokenizerMismatchError(
            f"models {first_label!r} and {label!r} have different tokenizers: {detail}. The method "
            f"compares the models on identical prompt token ids, so a pair or series must share one "
            f"tokenizer; pick checkpoints of the same model family.")
    return first_print
