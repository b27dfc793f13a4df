"""Loading Hugging Face causal LMs safely: safetensors only, remote code off unless asked."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from core.errors import InputError
from core.settings import stable_hash
from core.vocab import DTYPES, DType


def torch_dtype(name: DType):
    import torch

    if name not in DTYPES:
        raise InputError(f"dtype {name!r} is not one of {list(DTYPES)}")
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
        raise InputError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return device


def load_causal_lm(path_or_id: str, dtype: DType = "float32", device: str = "auto",
                   trust_remote_code: bool = False, revision: str | None = None):
    """A causal LM in eval mode with frozen weights, from a local folder or a hub id.

    Only safetensors weights are accepted (a pickled checkpoint can run arbitrary code).
    """
    from transformers import AutoModelForCausalLM

    if os.path.exists(path_or_id):
        folder = Path(path_or_id)
        # A model only its own code can build is refused first: its weights cannot be judged.
        problem = None
        if not trust_remote_code and (folder / "config.json").is_file():
            problem = remote_code_problem(folder)
        problem = problem or local_model_problem(folder)
        if problem is None and not trust_remote_code:
            problem = weight_shape_problem(folder)
        if problem:
            raise ModelNotLoadableError(f"cannot load model {path_or_id!r}: {problem}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path_or_id, dtype=torch_dtype(dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code, revision=revision)
    except OSError as error:
        raise ModelNotLoadableError(f"cannot load model {path_or_id!r}: it is neither a local folder "
                                    f"with safetensors weights nor a reachable hub id "
                                    f"({' '.join(str(error).split())})") from error
    model.requires_grad_(False)
    return model.eval().to(resolve_device(device))


def check_finite_weights(model, what: str) -> None:
    """Raise ModelNotLoadableError when a weight of `model` is NaN or infinite: such a model writes
    garbage answers that no question would be graded correct on, so say so before generating."""
    import torch

    bad = [name for name, weight in model.named_parameters() if not torch.isfinite(weight).all()]
    if bad:
        raise ModelNotLoadableError(
            f"{what} has non-finite weights (NaN or inf) in {len(bad)} tensor(s), first "
            f"{bad[:3]}: its checkpoint is damaged or was saved after training diverged; use "
            f"another checkpoint")


# --- Model specs: what a model is, and a fingerprint of its content ---------------------------

SPEC_KINDS = ("hub", "local", "adapter", "perturbed")
# Files of a model folder that determine its outputs (weights, config, tokenizer); hashed for the
# fingerprint of a local model or adapter.
FINGERPRINT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")


class TokenizerMismatchError(InputError):
    """Models compared on the same questions would not be fed the same token ids."""


class ModelNotLoadableError(InputError):
    """A model's files are missing or unsafe; found without loading any weights."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A hub id (with optional revision), a local folder, a LoRA adapter on a base spec, or a
    perturbed base: the null model of docs/method.md section 8, base + R with R matched per weight
    matrix to (post - base) in Frobenius norm along a direction drawn from `seed` (see
    `matched_perturbation`); built in memory at load, never written (`path` is empty)."""

    kind: str
    path: str
    revision: str | None = None
    base: "ModelSpec | None" = None
    post: "ModelSpec | None" = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {list(SPEC_KINDS)}")
        if (self.kind in ("adapter", "perturbed")) != (self.base is not None):
            raise ValueError("an adapter or perturbed spec needs a base model, and only they have one")
        if (self.kind == "perturbed") != (self.post is not None and isinstance(self.seed, int)):
            raise ValueError("a perturbed spec needs a post model and an integer seed, and only it "
                             "has them")

    @classmethod
    def perturbed(cls, base: "ModelSpec", post: "ModelSpec", seed: int) -> "ModelSpec":
        return cls("perturbed", "", base=base, post=post, seed=seed)

    @classmethod
    def from_config(cls, entry: dict, root: Path | None = None) -> "ModelSpec":
        """From a config entry: {hub = "org/name", revision = ...}, {path = "folder"} or
        {adapter = "folder", base = {...}}; relative folders are taken from `root`."""
        def local(folder: str) -> str:
            folder_path = Path(folder)
            return str(folder_path if folder_path.is_absolute() or root is None else root / folder_path)

        if not isinstance(entry, dict):
            raise InputError(f"model entry {entry!r} is not a table of `hub`, `path` or `adapter`")
        for key in ("hub", "path", "adapter", "revision"):
            if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
                raise InputError(f"model entry {entry}: `{key}` must be a non-empty string, not "
                                 f"{entry[key]!r}")
        if "adapter" in entry:
            if "base" not in entry:
                raise InputError(f"model entry {entry}: an adapter needs `base = {{...}}`")
            return cls("adapter", local(entry["adapter"]), base=cls.from_config(entry["base"], root))
        if "hub" in entry:
            return cls("hub", entry["hub"], revision=entry.get("revision"))
        if "path" in entry:
            return cls("local", local(entry["path"]))
        raise InputError(f"model entry {entry} names no model: give `hub`, `path` or `adapter`")

    def describe(self) -> dict:
        """JSON-able identity of the spec (without its content fingerprint)."""
        out: dict = {"kind": self.kind, "path": self.path}
        if self.revision:
            out["revision"] = self.revision
        if self.base is not None:
            out["base"] = self.base.describe()
        if self.post is not None:
            out.update(post=self.post.describe(), seed=self.seed)
        return out

    @classmethod
    def from_description(cls, description: dict) -> "ModelSpec":
        """The spec whose describe() is `description` (a run's models table keeps it as JSON)."""
        nested = {name: cls.from_description(description[name])
                  for name in ("base", "post") if name in description}
        return cls(description["kind"], description["path"], description.get("revision"),
                   seed=description.get("seed"), **nested)

    def identity(self) -> dict:
        """What names the model apart from its content: the hub id of a hub model; nothing for
        a folder (its files' hash is its identity), so a moved checkout keeps its cache keys."""
        out: dict = {"kind": self.kind}
        if self.kind == "hub":
            out["hub"] = self.path
        if self.base is not None:
            out["base"] = self.base.identity()
        if self.post is not None:
            out.update(post=self.post.identity(), seed=self.seed)
        return out

    def __str__(self) -> str:
        if self.kind == "perturbed":
            return f"{self.base} + a random update matched to {self.post} (seed {self.seed})"
        if self.kind == "adapter":
            return f"{self.base} + adapter {self.path}"
        return f"{self.path}@{self.revision}" if self.revision else self.path

    # --- fingerprint --------------------------------------------------------------------------

    def fingerprint(self, file_hash=None) -> str:
        """Hub commit of a hub model; hash of the weight, config and tokenizer files of a folder;
        both for an adapter. `file_hash(path) -> hex` lets a caller memoise file hashes."""
        file_hash = file_hash or sha256_file
        if self.kind == "perturbed":  # its weights follow from both models' and the seed
            return stable_hash(["perturbed", self.base.fingerprint(file_hash),
                                self.post.fingerprint(file_hash), self.seed])
        if self.kind == "hub":
            return "hub:" + resolve_hub_commit(self.path, self.revision)
        folder_hash = hash_folder(self.path, file_hash)
        if self.kind == "adapter":
            return stable_hash(["adapter", self.base.fingerprint(file_hash), folder_hash])
        return "sha256:" + folder_hash

    def tokenizer_source(self) -> str:
        """Where the tokenizer lives: an adapter's own folder if it ships one, else its base."""
        if self.kind == "perturbed":
            return self.base.tokenizer_source()
        if self.kind == "adapter":
            if (Path(self.path) / "tokenizer_config.json").exists():
                return self.path
            return self.base.tokenizer_source()
        return self.path

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        source = self.tokenizer_source()
        if self.kind == "perturbed":
            return self.base.load_tokenizer()
        revision = self.revision if self.kind == "hub" else None
        try:
            return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        except OSError as error:
            raise ModelNotLoadableError(f"cannot load the tokenizer of {self} from {source!r}: "
                                        f"{' '.join(str(error).split())}") from error

    def load(self, dtype: DType = "float32", device: str = "auto"):
        """The model in eval mode with frozen weights; an adapter is merged into its base
        (merge_and_unload), so scoring sees a plain model of the base's architecture; a perturbed
        spec is built from its base and post (the post on the CPU, only while R is drawn)."""
        if self.kind == "perturbed":
            model = self.base.load(dtype=dtype, device=device)
            post = self.post.load(dtype=dtype, device="cpu")
            matched_perturbation(model, post, self.seed)
            del post
            return model
        if self.kind != "adapter":
            model = load_causal_lm(self.path, dtype=dtype, device=device, revision=self.revision)
        else:
            from peft import PeftModel

            folder = Path(self.path)
            problem = adapter_problem(folder)
            if problem:
                raise ModelNotLoadableError(f"cannot load {self}: {problem}")
            base = self.base.load(dtype=dtype, device=device)
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=False).merge_and_unload()
            model.requires_grad_(False)
            model.eval()
        check_finite_weights(model, f"the model {self}")
        return model


    def weights_root(self) -> "ModelSpec":
        """The hub or local model whose architecture (and config) this spec has."""
        return self.base.weights_root() if self.base is not None else self


def matched_perturbation(model, post, seed: int) -> dict[str, float]:
    """Turn `model` (the base) into base + R in place: for every weight matrix (2-D parameter:
    attention and MLP projections, embeddings and the LM head; tied matrices once), R has the
    Frobenius norm of (post - base) and a Gaussian direction drawn from (seed, parameter name), in
    float64. Norm gains and biases (1-D) stay the base's: "a random update of the same size" is
    defined per matrix (docs/method.md section 8), and a random sign flip of a gain is no update
    of a trained model's kind. Returns each matrix's ||R||_F."""
    import torch

    post_parameters = dict(post.named_parameters())
    norms = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim != 2:
                continue
            if name not in post_parameters or post_parameters[name].shape != parameter.shape:
                raise InputError(f"the post model has no matrix {name} of shape "
                                 f"{tuple(parameter.shape)}; a null model needs the base's "
                                 f"architecture")
            delta = post_parameters[name].detach().cpu().double() - parameter.detach().cpu().double()
            norm = torch.linalg.matrix_norm(delta)
            generator = torch.Generator().manual_seed(int(stable_hash([seed, name]), 16) % 2**63)
            direction = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            update = direction * (norm / torch.linalg.matrix_norm(direction))
            parameter.add_(update.to(device=parameter.device, dtype=parameter.dtype))
            norms[name] = float(norm)
    return norms


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_folder(folder: str | os.PathLike, file_hash=sha256_file) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist; give a folder with config.json "
                         f"and *.safetensors (or adapter_config.json), or a hub id")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise InputError(f"model folder {folder} holds no weight, config or tokenizer files")
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
    raise InputError(f"cannot fingerprint hub model {repo_id!r}"
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


def check_same_tokenizer(labelled_tokenizers: list[tuple[str, object]], template=None,
                         questions: Iterable = ()) -> str:
    """Raise TokenizerMismatchError unless every model would be fed the same token ids: the same
    vocabulary, the same ids for every rendered prompt (`template`, a core.templates.PromptTemplate,
    on each of `questions`, objects with .id and .question), and the same chat template when the
    prompt template uses it (or no template is given). Special-token maps and pad tokens may differ
    (RL checkpoints often ship others than their base). Returns the first tokenizer's fingerprint."""
    first_label, first = labelled_tokenizers[0]
    vocabulary = first.get_vocab()
    questions = list(questions)
    first_prompts = [template.render(q.question, first)[1] for q in questions] if template else []
    for label, tokenizer in labelled_tokenizers[1:]:
        def refuse(detail: str) -> TokenizerMismatchError:
            return TokenizerMismatchError(
                f"models {first_label!r} and {label!r} have different tokenizers: {detail}. "
                f"The method feeds every model of a pair or series identical prompt ids; pick "
                f"checkpoints that share a tokenizer.")

        other = tokenizer.get_vocab()
        if other != vocabulary:
            differing = sorted(set(vocabulary.items()) ^ set(other.items()))[:3]
            raise refuse(f"their vocabularies differ ({len(vocabulary)} vs {len(other)} tokens; "
                         f"e.g. {differing})")
        if (template is None or template.text is None) and (
                getattr(first, "chat_template", None) != getattr(tokenizer, "chat_template", None)):
            used = f"the prompt template {template.name!r} uses it" if template else "it may be used"
            raise refuse(f"their chat templates differ and {used}")
        for question, ids in zip(questions, first_prompts):
            theirs = template.render(question.question, tokenizer)[1]
            if theirs != ids:
                at = next((k for k, (a, b) in enumerate(zip(ids, theirs)) if a != b),
                          min(len(ids), len(theirs)))
                shown = [seq[at] if at < len(seq) else "end" for seq in (ids, theirs)]
                raise refuse(f"the prompt of question {question.id!r} becomes {len(ids)} vs "
                             f"{len(theirs)} ids, first differing at position {at} ({shown[0]} vs "
                             f"{shown[1]})")
    return tokenizer_fingerprint(first)


# --- Loadable without loading: the files a model needs, checked before any work ---------------

# Bytes per element of each safetensors dtype (the format's own names).
SAFETENSORS_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                          "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                          "F8_E5M2": 1}
# The safetensors library refuses larger headers; so does this check (before reading one).
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
WEIGHTS_INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """Exactly the weight files loading `folder` reads: the files its safetensors index maps
    weights to, or model.safetensors. Raises ValueError (the reason) when the index maps a weight
    to a file that is not safetensors (a pickle can run code when loaded) or outside the folder,
    or when there are no safetensors weights at all."""
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        if (folder / "model.safetensors").is_file():
            return [folder / "model.safetensors"]
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise ValueError(f"the folder {folder} holds only pickled weights ({pickled[:3]}), which "
                             f"can run code when loaded; convert them to safetensors")
        raise ValueError(f"the folder {folder} has no model.safetensors (or {WEIGHTS_INDEX})")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"its {index.name} is not a safetensors index ({error!r})") from None
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"its {index.name} maps weights to names that are not file names")
    unsafe = [name for name in names if not name.endswith(".safetensors")]
    if unsafe:
        raise ValueError(f"its {index.name} maps weights to {unsafe[:3]}, which is not safetensors "
                         f"(a pickled file can run code when loaded); convert the weights to "
                         f"safetensors and fix the index")
    outside = [name for name in names if Path(name).name != name]
    if outside:
        raise ValueError(f"its {index.name} maps weights to {outside[:3]}, outside the folder; "
                         f"an index names files beside it")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{index.name} names {len(names)} weight files, {len(missing)} missing: "
                         f"{missing[:3]}")
    return [folder / name for name in names]


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file declares, after checking that its header is the
    format's (an 8-byte length, then JSON naming each tensor's dtype, shape and byte range) and that
    the ranges tile the data the file holds. Raises ValueError (the reason); reads only the header."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is {size} bytes, too short for a safetensors file")
        (header_bytes,) = struct.unpack("<Q", head)
        if header_bytes > min(SAFETENSORS_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path.name} is not a safetensors file (its first 8 bytes declare a "
                             f"{header_bytes}-byte header in a {size}-byte file)")
        try:
            header = json.loads(handle.read(header_bytes))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes, shapes, ranges = size - 8 - header_bytes, {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            if not all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path.name}: the header entry of {name!r} is not a tensor's "
                             f"(dtype, shape, data_offsets)") from None
        width = SAFETENSORS_ITEM_BYTES.get(dtype)
        if width is not None and end - begin != width * math.prod(shape):
            raise ValueError(f"{path.name}: tensor {name!r} of shape {list(shape)} and dtype {dtype} "
                             f"declares {end - begin} bytes")
        shapes[name] = shape
        ranges.append((begin, end))
    covered = max((end for _, end in ranges), default=0)
    if covered > data_bytes:
        raise ValueError(f"{path.name} is cut short: its header declares {covered} bytes of tensors, "
                         f"the file holds {data_bytes}; copy or download it again")
    return shapes


def local_model_problem(folder: Path) -> str | None:
    """What keeps a local model folder from loading (None: config.json is there, and every weight
    file a load would read is safetensors, present and well-formed); reads no weights."""
    if not folder.is_dir():
        return (f"{folder} is not a folder; give the folder that holds config.json and "
                f"*.safetensors, or a hub id")
    if not (folder / "config.json").is_file():
        return f"the folder {folder} has no config.json"
    try:
        for file in weight_files(folder):
            safetensors_shapes(file)
    except (OSError, ValueError) as error:
        return str(error)
    return None


def weight_shape_problem(folder: Path) -> str | None:
    """Whether the weight files' shapes contradict what config.json says the model is (e.g. its
    hidden size or vocabulary): the model is built from the config on the meta device (no memory)
    and each stored tensor that it names is compared. Call after local_model_problem found none."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its config.json does not describe a model ({' '.join(str(error).split())})"
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    for file in weight_files(folder):
        for name, shape in safetensors_shapes(file).items():
            want = expected.get(name, expected.get(prefix + name))
            if want is not None and want != shape:
                return (f"{file.name}: {name} has shape {list(shape)} but config.json describes "
                        f"{list(want)}; the config does not belong to these weights")
    return None


def remote_code_problem(folder: Path) -> str | None:
    """Whether the model in `folder` is of a type transformers does not know, so only its own code
    (config.json's auto_map) could load it."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        return f"its config.json is not JSON ({error!r})"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in CONFIG_MAPPING:
        return None
    if isinstance(config, dict) and "auto_map" in config:
        return (f"its model type {model_type!r} is known only to the code it ships (auto_map in "
                f"config.json), which is not run without --trust-remote-code")
    return f"its config.json names the model type {model_type!r}, which transformers does not know"


def adapter_problem(folder: Path) -> str | None:
    """What keeps a LoRA adapter folder from loading (None: its config is there and its weights are
    a well-formed safetensors file)."""
    if not (folder / "adapter_config.json").is_file():
        return (f"the adapter folder {folder} has no adapter_config.json; give the folder written by "
                f"peft's save_pretrained")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return (f"the adapter folder {folder} has no adapter_model.safetensors; only safetensors "
                f"adapters are loaded (a pickled .bin can run code)")
    try:
        safetensors_shapes(weights)
    except (OSError, ValueError) as error:
        return str(error)
    return None


def hub_model_problem(repo_id: str, revision: str | None = None) -> str | None:
    """What keeps a hub model from loading: its file list (asked of the hub when online, else the
    local hub cache) lacks config.json or safetensors weights. Downloads nothing."""
    import huggingface_hub

    if not hub_offline():
        try:
            files = {s.rfilename for s in huggingface_hub.HfApi().model_info(
                repo_id, revision=revision).siblings or ()}
        except Exception:  # noqa: BLE001 - unreachable hub: the local cache below decides
            files = None
        if files is not None:
            if "config.json" not in files:
                return f"the hub model {repo_id} has no config.json"
            if not any(name.endswith(".safetensors") for name in files):
                return f"the hub model {repo_id} has no safetensors weights (pickled ones can run code)"
            return None
    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    if not isinstance(cached, str):
        return (f"the hub model {repo_id} is unreachable and not in the local hub cache; download it "
                f"first (huggingface-cli download {repo_id}) or give a local folder")
    return local_model_problem(Path(cached).parent)


def model_problem(spec: ModelSpec) -> str | None:
    """What keeps `spec` (and an adapter's base) from loading, or None."""
    if spec.kind == "perturbed":
        return model_problem(spec.base) or model_problem(spec.post)
    if spec.kind == "adapter":
        return adapter_problem(Path(spec.path)) or model_problem(spec.base)
    if spec.kind == "hub":
        return hub_model_problem(spec.path, spec.revision)
    return local_model_problem(Path(spec.path))


def model_config(spec: ModelSpec):
    """The transformers config of the model whose architecture `spec` has (an adapter's or a
    perturbed model's base); raises ModelNotLoadableError when it cannot be read."""
    from transformers import AutoConfig

    root = spec.weights_root()
    try:
        return AutoConfig.from_pretrained(root.path, revision=root.revision, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ModelNotLoadableError(f"cannot read its config ({' '.join(str(error).split())})") from None


def architecture_problem(config) -> str | None:
    """Whether core.adapters has an adapter for the architecture a config names."""
    from core.adapters import ADAPTERS

    supported = [name for adapter in ADAPTERS for name in adapter.architectures]
    architecture = (config.architectures or [type(config).__name__])[0]
    if architecture in supported:
        return None
    return (f"architecture {architecture} is not supported (supported: {', '.join(supported)}); "
            f"core/adapters.py would need an adapter for it")


def config_problem(spec: ModelSpec) -> str | None:
    """What in a model's config keeps it from being scored, read before any work: an architecture
    without an adapter, or (a local folder) weights whose shapes the config contradicts. Call
    after model_problem found none."""
    if spec.kind == "perturbed":
        return config_problem(spec.base) or config_problem(spec.post)
    try:
        problem = architecture_problem(model_config(spec))
    except ModelNotLoadableError as error:
        return str(error)
    root = spec.weights_root()
    if problem is None and root.kind == "local":
        problem = weight_shape_problem(Path(root.path))
    return problem


def check_loadable(labelled_specs: Iterable[tuple[str, ModelSpec]]) -> None:
    """Raise ModelNotLoadableError naming every model whose files are missing, unsafe or malformed,
    or whose architecture cannot be scored, before any of them is loaded (so a bad post model is
    found before the base generates)."""
    problems = [f"{label}: {problem}" for label, spec in labelled_specs
                if (problem := model_problem(spec) or config_problem(spec))]
    if problems:
        raise ModelNotLoadableError(f"{len(problems)} model(s) cannot be loaded: "
                                    + "; ".join(problems))
