"""Run configuration: the pairs, series and datasets a run can name (core/pairs.toml or another
file, and those made from the browser, which the cache keeps: core/user_pairs.py), and the run
request itself, which travels between processes as a JSON file.

Light on purpose (no torch, no transformers): the dashboard reads `configured()` and builds
`RunRequest`s through core.jobs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from core.datasets import Dataset, is_path, load_dataset, read_jsonl_bytes
from core.errors import CircuitdiffError, InputError
from core.executors import split_address
from core.models import ModelSpec
from core.settings import (PAPER_ALPHAS, FaithfulnessSettings, GenerationSettings, ScoreSettings,
                           SelectionSettings, check_alpha)
from core.store import Store, fetch_one
from core.vocab import CONTROLS, EXECUTORS, ExecutorName, Kind

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_PATH = Path(__file__).resolve().parent / "pairs.toml"


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    label: str
    spec: ModelSpec
    algorithm: str | None = None
    # A series' training step of this checkpoint (the trajectory's x axis); the base is step 0.
    step: int | None = None


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """A pair (one post model) or a series (several), sharing one template and token limit."""

    name: str
    kind: Kind
    base: ModelEntry
    posts: tuple[ModelEntry, ...]
    template: str
    max_new_tokens: int
    # Layer count the config declares, checked against the model's own config.
    layers: int | None = None
    # A pair's seed null: a post-training that differs from `posts[0]` only in seed (--controls seed).
    seed_null: ModelEntry | None = None

    @property
    def models(self) -> tuple[ModelEntry, ...]:
        return (self.base, *self.posts)


@dataclasses.dataclass(frozen=True)
class Config:
    """A parsed config file; `path` is the file it came from (named in errors); `cache` the cache
    whose pairs and datasets made from the browser it also resolves (None: the default cache)."""

    path: Path
    pairs: dict[str, Any]
    series: dict[str, Any]
    datasets: dict[str, Any]
    cache: str | None = None


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """What to run. `limit` keeps the first N questions of the dataset (0: all); `cache` is the
    cache file (None: the default); `config` the config file (None: core/pairs.toml).

    Where model work runs (core/executors.py; in no cache key, results do not depend on it):
    `executor` "local" (this process) or "ray"; for ray, `ray_address` None (start Ray here, or
    RAY_ADDRESS), "auto" or "HOST:PORT", and `ray_actors` the pool size (0: one per GPU, or per CPU
    where the cluster has no GPU).

    `controls` (core.vocab.CONTROLS; in no run key: each adds its own rows or runs),
    `perturb_seed`, the seed of the perturbation null's direction (in the null model's key), and
    `faithfulness`, the settings of the faithfulness control (in its rows' key)."""

    pair: str
    dataset: str
    alphas: tuple[float, ...] = PAPER_ALPHAS
    selection: SelectionSettings = SelectionSettings()
    score: ScoreSettings = ScoreSettings()
    generation: GenerationSettings = GenerationSettings()
    limit: int = 0
    cache: str | None = None
    config: str | None = None
    executor: ExecutorName = "local"
    ray_address: str | None = None
    ray_actors: int = 0
    controls: tuple[str, ...] = ()
    perturb_seed: int = 0
    faithfulness: FaithfulnessSettings = FaithfulnessSettings()

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ValueError("give at least one alpha")
        object.__setattr__(self, "alphas", tuple(sorted({check_alpha(a) for a in self.alphas})))
        if self.limit < 0:
            raise ValueError(f"limit={self.limit} must be 0 (all questions) or positive")
        self._check_executor()
        unknown = [name for name in self.controls if name not in CONTROLS]
        if unknown:
            raise InputError(f"unknown control(s) {unknown}; the controls are {list(CONTROLS)}")
        object.__setattr__(self, "controls", tuple(c for c in CONTROLS if c in self.controls))
        # Absolute, so a job started from any working directory writes where it was asked to.
        for name in ("cache", "config"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(Path(getattr(self, name)).resolve()))

    def _check_executor(self) -> None:
        if self.executor not in EXECUTORS:
            raise InputError(f"executor={self.executor!r} is not one of {list(EXECUTORS)}")
        if self.executor != "ray" and (self.ray_address is not None or self.ray_actors):
            raise InputError("a Ray address or actor count applies to the ray executor only: add "
                             "--executor ray, or drop --ray-address and --ray-actors")
        if self.ray_address not in (None, "auto"):
            split_address(self.ray_address)
        if self.ray_actors < 0:
            raise InputError(f"ray_actors={self.ray_actors} must be 0 (one per GPU, or per CPU) or "
                             f"positive")
        if self.executor == "ray" and self.score.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device={self.score.device!r} names one device, but Ray gives each "
                             f"actor its own: use --device auto (or cpu)")

    def as_dict(self) -> dict[str, Any]:
        return {"pair": self.pair, "dataset": self.dataset, "alphas": list(self.alphas),
                "selection": self.selection.as_dict(), "score": self.score.as_dict(),
                "generation": self.generation.as_dict(), "limit": self.limit, "cache": self.cache,
                "config": self.config, "executor": self.executor, "ray_address": self.ray_address,
                "ray_actors": self.ray_actors, "controls": list(self.controls),
                "perturb_seed": self.perturb_seed, "faithfulness": self.faithfulness.as_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRequest":
        return cls(pair=data["pair"], dataset=data["dataset"], alphas=tuple(data["alphas"]),
                   selection=SelectionSettings.from_dict(data["selection"]),
                   score=ScoreSettings.from_dict(data["score"]),
                   generation=GenerationSettings.from_dict(data["generation"]),
                   limit=data.get("limit", 0), cache=data.get("cache"), config=data.get("config"),
                   executor=data.get("executor", "local"), ray_address=data.get("ray_address"),
                   ray_actors=data.get("ray_actors", 0), controls=tuple(data.get("controls", ())),
                   perturb_seed=data.get("perturb_seed", 0),
                   faithfulness=FaithfulnessSettings.from_dict(data.get("faithfulness", {})))

    def to_file(self, path: str | os.PathLike) -> Path:
        """Write the request as JSON (atomically: a reader sees no half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        os.replace(temporary, path)
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "RunRequest":
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_dict(data)
        except OSError as error:
            raise ConfigError(f"cannot read the run request {path}: {error}") from error
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ConfigError(f"{path} is not a run request ({type(error).__name__}: {error}); write "
                              f"one with RunRequest.to_file") from error


def load_config(path: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None) -> Config:
    path = Path(path) if path else CONFIG_PATH
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read the pair config {path}: {error}") from error
    return Config(path, raw.get("pairs", {}), raw.get("series", {}), raw.get("datasets", {}),
                  None if cache is None else str(cache))


def configured(config_path: str | os.PathLike | None = None,
               cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a run can name: {"pairs": {name: "pair" | "series"}, "datasets": [names]}, the
    config's first, then those made from the browser that the cache keeps (None: the default
    cache), which "user_pairs" and "user_datasets" name again; "cache_problem" says why the
    cache's could not be read (None: they were)."""
    config = load_config(config_path, cache)
    try:
        made, made_datasets, problem = user_pair_declarations(cache), user_dataset_names(cache), None
    except CircuitdiffError as error:  # e.g. an older schema, which a run migrates first
        made, made_datasets, problem = {}, [], str(error)
    user_pairs = {name: kind for name, (kind, _) in made.items()
                  if name not in config.pairs and name not in config.series}
    user_datasets = [name for name in made_datasets if name not in config.datasets]
    return {"pairs": {**dict.fromkeys(config.pairs, "pair"), **dict.fromkeys(config.series, "series"),
                      **user_pairs},
            "datasets": list(config.datasets) + user_datasets,
            "user_pairs": list(user_pairs), "user_datasets": user_datasets, "cache_problem": problem}


# --- Pairs and datasets made from the browser, kept in the cache (core/user_pairs.py saves them) ---

def _user_rows(cache: str | os.PathLike | None, sql: str, params: list) -> list[tuple]:
    """Rows of a table of user-made entries; none where the cache or the table does not exist."""
    store = Store(cache)
    if not store.exists():
        return []
    with store.read() as con:
        # An empty database file gets its tables with its first write.
        if not fetch_one(con, "SELECT count(*) FROM information_schema.tables "
                              "WHERE table_name = 'user_pairs'")[0]:
            return []
        return con.execute(sql, params).fetchall()


def user_pair_declarations(cache: str | os.PathLike | None = None) -> dict[str, tuple[Kind, dict]]:
    """The pairs made from the browser: name -> (kind, what a pairs.toml entry would hold)."""
    return {name: (kind, json.loads(declaration)) for name, kind, declaration in _user_rows(
        cache, "SELECT name, kind, declaration FROM user_pairs ORDER BY created_at, name", [])}


def user_dataset_names(cache: str | os.PathLike | None = None) -> list[str]:
    return [name for (name,) in _user_rows(
        cache, "SELECT name FROM user_datasets ORDER BY created_at, name", [])]


def user_dataset(name: str, cache: str | os.PathLike | None = None) -> Dataset | None:
    """A dataset uploaded from the browser, read from the JSONL text the cache keeps; None where
    the cache has none of that name."""
    rows = _user_rows(cache, "SELECT source, rows FROM user_datasets WHERE name = ?", [name])
    if not rows:
        return None
    source, text = rows[0]
    return read_jsonl_bytes(text.encode("utf-8"), name, f"upload:{source}")


def model_entry(raw: dict, where: str) -> ModelEntry:
    """One model of a config entry; `where` names it in errors."""
    if "label" not in raw:
        raise ConfigError(f"{where}: every model needs a `label`")
    spec_fields = {k: v for k, v in raw.items() if k not in ("label", "algorithm", "step")}
    step = raw.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ConfigError(f"{where}: `step` is a training step, a positive integer; got {step!r}")
    return ModelEntry(raw["label"], ModelSpec.from_config(spec_fields, REPO_ROOT), raw.get("algorithm"),
                      step)


def get_pair(name: str, config: Config) -> PairConfig:
    """A pair or series of the config, else one made from the browser that the config's cache
    keeps."""
    if name in config.pairs:
        return pair_from_entry(name, "pair", config.pairs[name], str(config.path))
    if name in config.series:
        return pair_from_entry(name, "series", config.series[name], str(config.path))
    cache = Store(config.cache).path
    try:
        user_made, unreadable = user_pair_declarations(config.cache), ""
    except CircuitdiffError as error:  # a cache that cannot be read holds no pair a run can use
        user_made, unreadable = {}, f"; its user pairs cannot be read: {error}"
    if name not in user_made:
        raise ConfigError(f"unknown pair or series {name!r}; known pairs: {sorted(config.pairs)}, "
                          f"series: {sorted(config.series)} ({config.path}), pairs made from the "
                          f"browser: {sorted(user_made)} (the cache {cache}){unreadable}")
    kind, raw = user_made[name]
    return pair_from_entry(name, kind, raw, f"made from the browser, in the cache {cache}")


def pair_from_entry(name: str, kind: Kind, raw: dict, where: str) -> PairConfig:
    """The pair or series a config entry declares; `where` names the entry's home in errors."""
    posts = ([raw["post"]] if "post" in raw else []) if kind == "pair" else raw.get("posts", [])
    if not posts or "base" not in raw:
        raise ConfigError(f"{kind} {name!r} needs a base and at least one post model ({where})")
    for key in ("template", "max_new_tokens"):
        if key not in raw:
            raise ConfigError(f"{kind} {name!r} has no `{key}` ({where})")
    base = model_entry(raw["base"], f"{name}.base")
    post_entries = tuple(model_entry(p, f"{name}.post") for p in posts)
    steps = [p.step for p in post_entries]
    if base.step is not None or (any(s is not None for s in steps) and (
            None in steps or steps != sorted(set(steps)))):
        raise ConfigError(f"{kind} {name!r}: training steps belong to every post model of a series, "
                          f"increasing (the base is step 0); got {steps} ({where})")
    labels = [base.label] + [p.label for p in post_entries]
    # "base" is how the read model names a run's base model, whatever its label.
    if len(set(labels)) != len(labels) or "base" in labels:
        raise ConfigError(f"{kind} {name!r}: model labels {labels} must be distinct and not 'base' "
                          f"({where})")
    seed_null = None
    if "seed_null" in raw:
        if kind != "pair":
            raise ConfigError(f"series {name!r}: `seed_null` belongs to a pair (a post model "
                              f"trained again with another seed) ({where})")
        seed_null = model_entry(raw["seed_null"], f"{name}.seed_null")
        if seed_null.label in labels:
            raise ConfigError(f"pair {name!r}: the seed_null label {seed_null.label!r} is taken "
                              f"({where})")
    return PairConfig(name, kind, base, post_entries, raw["template"], int(raw["max_new_tokens"]),
                      raw.get("layers"), seed_null)


def get_dataset(name: str, config: Config, limit: int = 0) -> Dataset:
    """A dataset of the config, a JSONL path, else one uploaded from the browser that the config's
    cache keeps."""
    if name not in config.datasets and not is_path(name):
        uploaded = user_dataset(name, config.cache)
        if uploaded is not None:
            return uploaded.head(limit)
    return load_dataset(name, config.datasets, REPO_ROOT, limit=limit)
