"""Synthetic result caches, written through core/store.py exactly as the pipeline writes a real run.

- `build_fixture_cache`: small (2 pairs, 1 dataset, 2 alphas, 8 samples, 2-3 layers) for tests.
- `build_trajectory_fixture`: the fixture cache and a series with training steps whose planted edges
  change more at every step (the trajectory views' known answer).
- `build_synthetic_cache`: the paper's grid (4 pairs x 3 datasets x 4 alphas x 2 models x 100
  samples, 28-32 layers: some 36 M scores) for benchmarks.

Scores are random but shaped like real ones (heavy-tailed, signed; the post-trained model somewhat
stronger and more spread), so every query and metric returns meaningful-looking data. Nothing here
claims to be a measurement: model labels start with `synthetic-`.
"""

from __future__ import annotations

import json

import numpy as np

from core import keys, metrics
from core.datasets import Dataset, Question
from core.graph import ResidualGraph
from core.runstore import RunStore
from core.settings import GenerationSettings, MetricSettings, ScoreSettings, SelectionSettings
from core.store import Store

PAIR_NAMES = ("deepseek", "mistral", "distill-qwen", "qwen25-dpo")
ALGORITHMS = ("GRPO", "PPO", "GRPO", "DPO")
DATASET_NAMES = ("math", "gsm8k", "college_math")
# Synthetic answers are keyed as if generated with this template.
TEMPLATE = "chat-boxed"


def build_synthetic_cache(path, n_pairs: int = 4, n_datasets: int = 3,
                          alphas=(0.03, 0.1, 0.3, 0.5), n_samples: int = 100,
                          layer_counts=(30, 32, 28, 28), seed: int = 0,
                          metric_settings: MetricSettings = MetricSettings()) -> list[str]:
    """Fill the cache at `path` with a grid of runs; returns their run keys."""
    if n_pairs > len(PAIR_NAMES) or n_datasets > len(DATASET_NAMES):
        raise ValueError(f"at most {len(PAIR_NAMES)} pairs and {len(DATASET_NAMES)} datasets")
    if len(layer_counts) < n_pairs:
        raise ValueError(f"layer_counts={layer_counts} names fewer layer counts than n_pairs={n_pairs}")
    runs = RunStore(Store(path))
    rng = np.random.default_rng(seed)
    run_keys = []
    with runs.store.writer_lock(wait=True):
        for d in range(n_datasets):
            dataset = _dataset(DATASET_NAMES[d], n_questions=n_samples * 2, rng=rng)
            for p in range(n_pairs):
                run_keys.append(_write_run(runs, PAIR_NAMES[p], ALGORITHMS[p],
                                           [f"synthetic-{PAIR_NAMES[p]}-post"], dataset, alphas,
                                           n_samples, layer_counts[p], rng, metric_settings))
    return run_keys


def build_fixture_cache(path, metric_settings: MetricSettings = MetricSettings()) -> list[str]:
    """A small cache for tests: a pair (2 layers) and a series with two post models (3 layers), one
    dataset, alphas 0.1 and 0.3, 8 samples each."""
    runs = RunStore(Store(path))
    rng = np.random.default_rng(1)
    with runs.store.writer_lock(wait=True):
        dataset = _dataset("fixture", n_questions=12, rng=rng)
        return [_write_run(runs, "fixture-pair", "GRPO", ["synthetic-rl"], dataset, (0.1, 0.3), 8, 2,
                           rng, metric_settings),
                _write_run(runs, "fixture-series", "GRPO", ["synthetic-grpo", "synthetic-dpo"],
                           dataset, (0.1, 0.3), 8, 3, rng, metric_settings)]


def build_controls_fixture(path, metric_settings: MetricSettings = MetricSettings()) -> dict[str, str]:
    """The fixture cache with the controls of its pair (docs/method.md section 8): position parts
    and norms with every score of the pair, cross scores (each model on the other's answers), and
    a null run (the pair's base vs a synthetic null model, a weaker change) linked as its 'perturb'
    control. Returns the run keys by name: pair, series, null."""
    runs = RunStore(Store(path))
    rng = np.random.default_rng(1)
    with runs.store.writer_lock(wait=True):
        dataset = _dataset("fixture", n_questions=12, rng=rng)
        pair = _write_run(runs, "fixture-pair", "GRPO", ["synthetic-rl"], dataset, (0.1, 0.3), 8, 2,
                          rng, metric_settings, controls=True)
        null = _write_run(runs, "fixture-pair-null", "perturb", ["synthetic-null"], dataset,
                          (0.1, 0.3), 8, 2, rng, metric_settings, controls=True,
                          base_label="synthetic-fixture-pair-base", post_strength=0.02)
        runs.write_control(pair, "synthetic-rl", "perturb", null)
        series = _write_run(runs, "fixture-series", "GRPO", ["synthetic-grpo", "synthetic-dpo"],
                            dataset, (0.1, 0.3), 8, 3, rng, metric_settings)
    return {"pair": pair, "series": series, "null": null}


# The trajectory fixture's checkpoints (training steps; unevenly spaced, as checkpoints often are)
# and its planted edges: the factor on each model's scores, base first. Every other edge changes
# by sampling noise only.
TRAJECTORY_STEPS = (100, 200, 400)
# A step changes a planted edge's strength by 2-2.5x: several times the noise of a mean of 8 samples.
PLANTED_EDGES = {"input->a2<v>": (1.0, 2.5, 6.0, 15.0), "a0->m1": (1.0, 2.0, 5.0, 12.0),
                 "m0->logits": (1.0, 0.4, 0.16, 0.06)}


def build_trajectory_fixture(path, metric_settings: MetricSettings = MetricSettings()
                             ) -> dict[str, str]:
    """`build_fixture_cache`, and the series "fixture-steps" (3 layers, alphas 0.1 and 0.3, 8
    samples) of a base and checkpoints at TRAJECTORY_STEPS: the PLANTED_EDGES, the run's strongest
    edges, grow (or weaken) at every step; the others move by noise only. Returns the run keys by
    name: pair, series, steps."""
    pair, series = build_fixture_cache(path, metric_settings)
    runs = RunStore(Store(path))
    rng = np.random.default_rng(1)  # the fixture's dataset again
    with runs.store.writer_lock(wait=True):
        dataset = _dataset("fixture", n_questions=12, rng=rng)
        steps = _write_run(runs, "fixture-steps", "GRPO",
                           [f"synthetic-step-{step}" for step in TRAJECTORY_STEPS], dataset,
                           (0.1, 0.3), 8, 3, rng, metric_settings, post_strength=0.0,
                           steps=TRAJECTORY_STEPS, planted=PLANTED_EDGES)
    return {"pair": pair, "series": series, "steps": steps}


def _dataset(name: str, n_questions: int, rng: np.random.Generator) -> Dataset:
    operands = rng.integers(2, 99, size=(n_questions, 2))
    return Dataset(name, "synthetic", tuple(Question(f"{name}-{i}", f"What is {a} + {b}?", str(a + b))
                                            for i, (a, b) in enumerate(operands.tolist())))


def _write_run(runs: RunStore, name: str, algorithm: str, post_labels: list[str], dataset: Dataset,
               alphas, n_samples: int, n_layers: int, rng: np.random.Generator,
               metric_settings: MetricSettings, controls: bool = False,
               base_label: str | None = None, post_strength: float = 0.2, steps=None,
               planted: dict[str, tuple[float, ...]] | None = None) -> str:
    """A run; with `controls`, its scores carry position parts and norms, and each post model is
    also scored on the base's answers and the base on each post model's (cross scores). `steps`:
    the post models' training steps. `planted`: edge name -> a factor per model (base first) on
    that edge's scores, the edge made as strong as the run's strongest."""
    graph = ResidualGraph(n_layers, "qkv")
    selection, score, generation = SelectionSettings(n=n_samples), ScoreSettings(), GenerationSettings()
    gen_key = keys.generation_settings_key(TEMPLATE, generation.max_new_tokens, generation)
    labels = [base_label or f"synthetic-{name}-base"] + post_labels
    model_keys = {label: keys.model_key({"kind": "synthetic", "label": label}, str(n_layers))
                  for label in labels}
    kind = "pair" if len(post_labels) == 1 else "series"
    run_key = keys.run_key(name, kind, model_keys, dataset.key, gen_key, selection, score)
    chosen = dataset.questions[:n_samples]
    generation_keys = {label: [keys.generation_key(model_keys[label], q.key, gen_key) for q in chosen]
                       for label in labels}
    lengths = {label: rng.integers(150, 400, size=len(chosen)) for label in labels}
    t_bar = float(min(v.mean() for v in lengths.values()))
    t_cuts = {float(a): max(int(np.floor(a * t_bar)), 1) for a in alphas}
    runs.write_inputs([{"model_key": key, "label": label, "spec": json.dumps({"kind": "synthetic"}),
                        "fingerprint": key, "architecture": "synthetic", "n_layers": n_layers,
                        "tokenizer_fingerprint": "synthetic"} for label, key in model_keys.items()],
                      dataset, [])
    runs.write_generations([{
        "generation_key": g_key, "model_key": model_keys[label], "question_key": q.key,
        "dataset_key": dataset.key, "question_id": q.id, "gen_key": gen_key,
        "prompt_ids": rng.integers(0, 1000, size=40).tolist(),
        "answer_ids": rng.integers(0, 1000, size=int(length)).tolist(),
        "answer_text": f"Adding the numbers gives {q.reference}. \\boxed{{{q.reference}}}",
        "finish_reason": "eos", "seconds": 0.0, "backend": "synthetic"}
        for label in labels
        for g_key, q, length in zip(generation_keys[label], chosen, lengths[label])])
    runs.write_grades([{"generation_key": g_key, "extracted": q.reference, "correct": True,
                        "rule": "boxed"}
                       for label in labels for g_key, q in zip(generation_keys[label], chosen)])
    runs.write_run(
        {"run_key": run_key, "name": name, "kind": kind, "dataset_key": dataset.key,
         "dataset_name": dataset.name, "gen_key": gen_key,
         "gen_settings": json.dumps(generation.as_dict()), "selection_key": selection.key(),
         "selection": json.dumps(selection.as_dict()), "score_key": score.key(),
         "score": json.dumps(score.as_dict()), "n_layers": n_layers, "granularity": "qkv",
         "n_candidates": len(dataset.questions), "n_selected": len(chosen), "t_bar": t_bar,
         "selection_report": json.dumps({"synthetic": True})},
        [{"label": label, "role": "base" if i == 0 else "post", "model_key": model_keys[label],
          "algorithm": None if i == 0 else algorithm, "position": i,
          "step": None if i == 0 or steps is None else steps[i - 1]}
         for i, label in enumerate(labels)],
        [{"label": label, "question_id": q.id, "position": position, "generation_key": g_key}
         for label in labels
         for position, (g_key, q) in enumerate(zip(generation_keys[label], chosen))],
        t_cuts)

    for alpha, t_cut in t_cuts.items():
        # Edge structure shared by the models of a run; the post models are stronger and noisier.
        edge_scale = rng.lognormal(mean=-7.0, sigma=1.5, size=graph.n_edges)
        planted_index = [graph.edge_names.index(name) for name in planted or {}]
        edge_scale[planted_index] = edge_scale.max()
        edges = {label: _synthetic_edges(edge_scale, len(chosen), rng,
                                         strength=1.0 + post_strength * i)
                 for i, label in enumerate(labels)}
        for index, factors in zip(planted_index, (planted or {}).values()):
            for label, factor in zip(labels, factors):
                edges[label][:, index] *= factor
        # (scorer, tokens) -> vectors: own scores, and with controls the cross scores, whose
        # weights sit between the two models' (each model's strength on the other's tokens).
        scored = {(label, label): edges[label] for label in labels}
        if controls:
            for label in labels[1:]:
                between = 1.0 + post_strength * labels.index(label) / 2
                for scorer, tokens in ((label, labels[0]), (labels[0], label)):
                    scored[scorer, tokens] = _synthetic_edges(edge_scale, len(chosen), rng,
                                                              strength=between)
        for (scorer, tokens), vectors in scored.items():
            runs.write_scores(run_key, [{
                "generation_key": g_key, "t_cut": t_cut, "score_key": score.key(),
                "model_key": model_keys[scorer], "dataset_key": dataset.key, "question_id": q.id,
                "loss": float(rng.uniform(0.5, 2.0)), "seconds": float(rng.uniform(0.5, 2.0)),
                "n_scored_tokens": t_cut,
                "scored_text": f"Adding the numbers gives {q.reference}"[:t_cut],
                **(_synthetic_norms(rng) if controls else {})}
                for g_key, q in zip(generation_keys[tokens], chosen)], vectors,
                _synthetic_parts(vectors, rng) if controls else None)
        for label in labels[1:]:
            comparison = metrics.compare_models(graph.dense(edges[labels[0]]),
                                                graph.dense(edges[label]), graph, metric_settings)
            runs.write_metrics(run_key, label, alpha, metric_settings, comparison.to_dict())
    return run_key


def _synthetic_parts(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Position parts [n, 3, n_edges] (first token, rest of the prompt, answer) summing to
    `vectors`: random positive shares of each score, the first token's the largest (a sink)."""
    shares = rng.random((vectors.shape[0], 3, vectors.shape[1])) * np.array([3.0, 1.0, 1.0])[:, None]
    shares /= shares.sum(axis=1, keepdims=True)
    return (shares * vectors[:, None, :]).astype(np.float32)


def _synthetic_norms(rng: np.random.Generator) -> dict[str, float]:
    return {"logit_grad_norm": float(rng.uniform(0.1, 1.0)),
            "logits_slot_grad_norm": float(rng.uniform(0.1, 1.0)),
            "residual_norm": float(rng.uniform(5.0, 10.0))}


def _synthetic_edges(edge_scale: np.ndarray, n: int, rng: np.random.Generator,
                     strength: float) -> np.ndarray:
    """Heavy-tailed signed scores [n, n_edges]: a per-edge scale shared by samples (structure) times
    per-sample log-normal noise."""
    noise = rng.lognormal(mean=0.0, sigma=0.5 * strength, size=(n, len(edge_scale)))
    signs = np.where(rng.random((n, len(edge_scale))) < 0.5, -1.0, 1.0)
    return (strength * edge_scale * noise * signs).astype(np.float32)



# --- Tiny random models, for tests of the pipeline without downloads ---------------------------

TINY_WORDS = ("User:", "Assistant:", "Please", "reason", "step", "by", "step,", "and", "put", "your",
              "final", "answer", "within", "\\boxed{}.", "What", "is", "plus", "the", "=", "so")


def tiny_tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level tokenizer (digits, a few words, specials) built locally: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [str(d) for d in range(10)] + list(TINY_WORDS) \
        + list(extra_words)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_tiny_model(folder, tokenizer, seed: int = 0, n_layers: int = 2, perturb_from=None,
                     perturbation: float = 0.0):
    """Save a random Llama (hidden 16) with `tokenizer` to `folder` (safetensors). With
    `perturb_from` (another model folder) its weights are those plus Gaussian noise of scale
    `perturbation`: a 'post-trained' model that mostly answers like its base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    if perturb_from is not None:
        model = LlamaForCausalLM.from_pretrained(perturb_from, use_safetensors=True)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(perturbation * torch.randn_like(parameter))
    else:
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
