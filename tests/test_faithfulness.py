"""Edge ablation and circuit recovery against forward passes edited by hand, and against EAP."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ablation import ablated_loss, source_outputs
from core.adapters import adapter_for
from core.eap import forward_loss, score_samples
from core import pipeline
from core.config import RunRequest
from core.errors import InputError, NotFoundError
from core.faithfulness import (ablated_losses, circuit_recovery, compare_recovery, edge_ablation,
                               faithfulness_report, read_run_samples, recovery_area, recovery_f,
                               run_faithfulness, stratified_edges)
from core.faithfulness_stats import agreement, held_out_strength, recovery_k
from core.generation import generate_greedy
from core.grading import extract_answer
from core.graph import ResidualGraph
from core.models import load_causal_lm
from core.query import ResultCache
from core.settings import MetricSettings, ScoreSettings, SelectionSettings
from core.store import Store
from core.synthetic import build_tiny_model, tiny_tokenizer
from core.templates import get_template
from tiny_models import random_samples, tiny_model

ARCHITECTURES = ("llama", "qwen2", "gpt2")


def real_edges(graph):
    return [(int(s), int(d)) for s, d in zip(*np.nonzero(graph.real_edge_mask))]


@pytest.mark.parametrize("granularity", ["qkv", "module"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_delta_equals_a_forward_pass_with_the_edge_removed_by_hand(architecture, granularity):
    model = tiny_model(architecture, seed=ARCHITECTURES.index(architecture))
    sample = random_samples(1, seed=3, min_answer=6)[0]
    graph = ResidualGraph(2, granularity)
    edges = real_edges(graph)
    # Copies of 4: edges in one batch must not see each other's removal.
    delta = edge_ablation(model, sample, graph, edges, copies=4)
    with torch.no_grad(), adapter_for(model).exact_precision(model):
        sources = source_outputs(model, sample)
        clean = float(forward_loss(model, [sample])[0])
        by_hand = [ablated_loss(model, sample, graph, s, d, 1.0, sources) - clean for s, d in edges]
    for (s, d), value, expected in zip(edges, delta, by_hand):
        assert abs(value - expected) <= 1e-9, f"{graph.src_names[s]}->{graph.dst_names[d]}"
    assert np.abs(delta).max() > 0.1, "removing whole module outputs must change the loss"


@pytest.mark.parametrize("granularity", ["qkv", "module"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_scaled_ablation_is_the_intervention_eap_linearises(architecture, granularity):
    """(L(H_d - e O_s) - L(H_d + e O_s)) / 2e through the ablation's own path is W to 1e-6."""
    model = tiny_model(architecture, seed=ARCHITECTURES.index(architecture))
    sample = random_samples(1, seed=3, min_answer=6)[0]
    result = score_samples(model, [sample], ScoreSettings(granularity=granularity))
    edges = real_edges(result.graph)
    eps = 1e-5
    slope = (edge_ablation(model, sample, result.graph, edges, scale=eps)
             - edge_ablation(model, sample, result.graph, edges, scale=-eps)) / (2 * eps)
    for (s, d), value in zip(edges, slope):
        expected = result.scores[0, s, d]
        error = abs(value - expected)
        assert error <= 1e-6 * abs(expected) or error <= 1e-9, (
            f"{result.graph.src_names[s]}->{result.graph.dst_names[d]}: ablation slope {value!r} vs "
            f"eap {expected!r}")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_slot_reads_exactly_its_kept_sources(architecture):
    """Removing many edges at once: every branch input is the sum of the outputs of the sources it
    keeps, as computed in that same intervened pass (checked by hooks of the test's own)."""
    model = tiny_model(architecture, n_layers=3, seed=4)
    sample = random_samples(1, seed=9)[0]
    graph = ResidualGraph(3, "module")
    removed = graph.real_edge_mask & (np.random.default_rng(0).random(graph.real_edge_mask.shape) < 0.5)
    assert 0 < removed.sum() < graph.n_edges
    adapter = adapter_for(model)
    outputs, inputs, handles = {}, {}, []

    def keep(store, key, output):
        store[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    layers = adapter.layers(model)
    handles.append(layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: keep(outputs, 0, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True))
    for l, layer in enumerate(layers):
        parts = adapter.parts(layer)
        for module, src in ((parts.attn, graph.attn_src(l)), (parts.mlp, graph.mlp_src(l))):
            handles.append(module.register_forward_hook(lambda m, a, out, src=src: keep(outputs, src, out)))
        for norm, dst in ((parts.attn_norm, graph.attn_dst(l)), (parts.mlp_norm, graph.mlp_dst(l))):
            # A forward hook sees the arguments the norm ran on, after every pre-hook.
            handles.append(norm.register_forward_hook(
                lambda m, args, out, dst=dst: keep(inputs, dst, args[0])))
    handles.append(adapter.final_norm(model).register_forward_hook(
        lambda m, args, out: keep(inputs, graph.logits_dst, args[0])))
    try:
        ablated_losses(model, sample, graph, removed[None].astype(float))
    finally:
        for handle in handles:
            handle.remove()
    for dst in range(graph.n_dst):
        kept = [s for s in range(graph.n_src) if graph.real_edge_mask[s, dst] and not removed[s, dst]]
        expected = sum((outputs[s] for s in kept), torch.zeros_like(inputs[dst]))
        assert torch.allclose(inputs[dst], expected, rtol=1e-9, atol=1e-9), graph.dst_names[dst]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_recovery_ends_are_exact_and_mean_what_they_say(architecture):
    model = tiny_model(architecture, seed=2)
    samples = random_samples(3, seed=21)
    result = score_samples(model, samples)
    curve = circuit_recovery(model, samples, result.graph, held_out_strength(np.abs(result.scores)),
                             copies=5)
    assert curve.f[0] == 0 and curve.f[-1] == 1
    assert curve.n_kept[0] == 0 and curve.n_kept[-1] == result.graph.n_edges
    assert np.all(np.diff(curve.n_kept) >= 0)
    adapter = adapter_for(model)
    with torch.no_grad(), adapter.exact_precision(model):
        # Nothing removed: the plain loss. Every edge removed: the final norm reads zero.
        np.testing.assert_allclose(curve.losses[-1], forward_loss(model, samples).numpy(), rtol=1e-12)
        zero = torch.zeros(1, model.config.hidden_size, dtype=model.dtype)
        log_probs = torch.log_softmax(model.get_output_embeddings()(adapter.final_norm(model)(zero))[0], -1)
    for loss, sample in zip(curve.losses[0], samples):
        expected = -log_probs[list(sample.answer_ids[:sample.t_cut])].mean()
        assert loss == pytest.approx(float(expected), abs=1e-9)
    log_k = np.log(curve.fractions[1:])
    assert curve.area == pytest.approx(np.trapezoid(curve.f[1:], log_k) / (log_k[-1] - log_k[0]))
    assert curve.k == recovery_k(curve.fractions, curve.f)


def test_each_samples_circuits_are_ranked_by_the_other_half():
    """Sample 0 (half 0) keeps the top edges of half 1's mean |W|; its losses do not change when
    its own half's scores change, and equal a recovery curve ranked by that mean alone."""
    model = tiny_model("llama", seed=3)
    samples = random_samples(4, seed=8)
    graph = ResidualGraph(2, "qkv")
    abs_scores = np.abs(score_samples(model, samples).scores)
    cross = circuit_recovery(model, samples, graph, held_out_strength(abs_scores), copies=8)
    other_half = abs_scores[1::2].mean(0)
    alone = circuit_recovery(model, samples[:1], graph, other_half[None], copies=8)
    np.testing.assert_array_equal(cross.losses[:, 0], alone.losses[:, 0])
    changed = abs_scores.copy()
    changed[0::2] = np.random.default_rng(0).random(changed[0::2].shape)  # half 0's own scores
    again = circuit_recovery(model, samples, graph, held_out_strength(changed), copies=8)
    np.testing.assert_array_equal(again.losses[:, 0::2], cross.losses[:, 0::2])
    assert not np.array_equal(again.losses[:, 1::2], cross.losses[:, 1::2])


def test_results_do_not_depend_on_the_copies_per_pass():
    model = tiny_model("llama")
    sample = random_samples(1, seed=5)[0]
    graph = ResidualGraph(2, "qkv")
    edges = real_edges(graph)[::3]
    np.testing.assert_allclose(edge_ablation(model, sample, graph, edges, copies=1),
                               edge_ablation(model, sample, graph, edges, copies=5), rtol=0, atol=1e-12)


def test_stratified_edges_are_the_top_half_by_strength_and_a_seeded_draw_of_the_rest():
    graph = ResidualGraph(2, "qkv")
    scores = graph.dense(np.random.default_rng(1).normal(size=graph.n_edges))
    chosen = stratified_edges(scores, graph, 7, np.random.default_rng(3))
    top = [(s, d) for s, d, stratum in chosen if stratum == "top"]
    drawn = [(s, d) for s, d, stratum in chosen if stratum == "random"]
    assert len(top) == 4 and len(drawn) == 3 and len(set(top + drawn)) == 7
    magnitudes = sorted(np.abs(graph.edges(scores)), reverse=True)
    assert sorted(abs(scores[e]) for e in top) == sorted(magnitudes[:4])
    assert chosen == stratified_edges(scores, graph, 7, np.random.default_rng(3))
    assert len(stratified_edges(scores, graph, 1000, np.random.default_rng(3))) == graph.n_edges


def test_a_non_edge_is_refused_by_name():
    graph = ResidualGraph(2, "qkv")
    with pytest.raises(ValueError, match=r"m1->a0<q> is not a real edge"):
        edge_ablation(tiny_model("llama"), random_samples(1)[0], graph,
                      [(graph.src_index("m1"), graph.dst_index("a0<q>"))])


def write_samples(path, samples):
    path.write_text("".join(json.dumps({"id": s.id, "prompt_ids": list(s.prompt_ids),
                                        "answer_ids": list(s.answer_ids), "t_cut": s.t_cut}) + "\n"
                            for s in samples))


def test_cli_writes_edges_correlations_and_recovery(tmp_path):
    model = tiny_model("llama", dtype=torch.float32, seed=6)
    model.save_pretrained(tmp_path / "model")
    samples = random_samples(3, seed=17, min_answer=4)
    write_samples(tmp_path / "samples.jsonl", samples)
    out = tmp_path / "faith" / "report.json"
    completed = subprocess.run(
        [sys.executable, "-m", "core", "faithfulness", "--model", str(tmp_path / "model"),
         "--samples", str(tmp_path / "samples.jsonl"), "--edges", "6", "--out", str(out), "--seed", "2",
         "--granularity", "module"],
        capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    assert report["granularity"] == "module" and report["dtype"] == "float32"
    assert report["halves"] == [0, 1, 0]
    rows = report["edges"]
    assert len(rows) == 18 and {r["sample_id"] for r in rows} == {"s0", "s1", "s2"}
    assert [r["stratum"] for r in rows[:6]] == ["top"] * 3 + ["random"] * 3
    direct = score_samples(model, samples, ScoreSettings(granularity="module"))
    graph = direct.graph
    # Cross-fitted: s0 and s2 (half 0) ablate the top 3 edges of s1's |W|, s1 those of s0 and s2's.
    for sample, ranking in (("s0", [1]), ("s1", [0, 2]), ("s2", [1])):
        strength = graph.edges(np.abs(direct.scores[ranking]).mean(0))
        top = {graph.edge_names[e] for e in np.argsort(-strength, kind="stable")[:3]}
        assert {f"{r['src']}->{r['dst']}" for r in rows
                if r["sample_id"] == sample and r["stratum"] == "top"} == top
    for row in rows:
        i, s, d = int(row["sample_id"][1:]), graph.src_index(row["src"]), graph.dst_index(row["dst"])
        assert row["w"] == pytest.approx(direct.scores[i, s, d], rel=1e-4, abs=1e-6)
    first = [(graph.src_index(r["src"]), graph.dst_index(r["dst"])) for r in rows[:6]]
    np.testing.assert_allclose([r["delta"] for r in rows[:6]],
                               edge_ablation(model, samples[0], graph, first), rtol=1e-4, atol=1e-6)
    from scipy import stats

    top = [r for r in rows if r["stratum"] == "top"]
    spearman = np.mean([stats.spearmanr(*[[r[name] for r in top if r["sample_id"] == sample]
                                          for name in ("w", "delta")]).statistic
                        for sample in ("s0", "s1", "s2")])
    assert report["agreement"]["top"]["spearman"]["value"] == pytest.approx(spearman)
    assert report["agreement"] == json.loads(json.dumps(agreement(
        ["s0", "s1", "s2"], *([r[name] for r in rows] for name in ("sample_id", "stratum", "w",
                                                                    "delta")))))
    recovery = report["recovery"]
    assert recovery["f"][0] == 0 and recovery["f"][-1] == 1 and recovery["fractions"][1] == 0.001
    assert np.array(recovery["losses"]).shape == (len(recovery["fractions"]), 3)
    assert 0.001 <= recovery["k"] <= 1


def test_cli_refuses_a_directory_as_out_before_loading_anything(tmp_path):
    write_samples(tmp_path / "s.jsonl", random_samples(1))
    completed = subprocess.run(
        [sys.executable, "-m", "core", "faithfulness", "--model", str(tmp_path / "nowhere"),
         "--samples", str(tmp_path / "s.jsonl"), "--edges", "4", "--out", str(tmp_path)],
        capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith(f"error: --out {tmp_path} is a directory")


# --- base vs post recovery --------------------------------------------------------------------

FRACTIONS = np.array([0.0, 0.01, 0.1, 1.0])


def recovery_losses(seed, n_questions=7):
    """[K, n] losses falling from 'every edge removed' to 'none removed', per question."""
    rng = np.random.default_rng(seed)
    empty, full = 5 + rng.random(n_questions), 1 + rng.random(n_questions)
    steps = np.sort(rng.random((len(FRACTIONS) - 2, n_questions)), axis=0)[::-1]
    return np.vstack([empty, full + steps * (empty - full), full])


def test_recovery_ends_are_exact_in_every_bootstrap_replicate():
    losses = recovery_losses(0)
    draws = np.random.default_rng(1).integers(0, losses.shape[1], size=(500, losses.shape[1]))
    f = recovery_f(losses[:, draws])
    assert f.shape == (len(FRACTIONS), 500)
    assert (f[0] == 0).all() and (f[-1] == 1).all()
    assert recovery_area(FRACTIONS, f).shape == (500,)


def test_identical_losses_give_a_zero_width_area_difference():
    losses = recovery_losses(2)
    comparison = compare_recovery(FRACTIONS, {"base": losses, "post": losses.copy()}, "base")
    assert comparison["area_difference"]["post"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    assert comparison["models"]["base"] == comparison["models"]["post"]
    low, high = comparison["models"]["base"]["area_interval"]
    assert low < comparison["models"]["base"]["area"] < high, "distinct questions must spread the area"
    f_low, f_high = comparison["models"]["base"]["f_interval"]
    assert f_low[0] == f_high[0] == 0 and f_low[-1] == f_high[-1] == 1


def test_area_difference_is_paired_over_questions():
    """A post that keeps each question's full-circuit loss but recovers later than the base needs more
    edges for the same recovery: a negative area difference whose interval excludes 0, and the point
    values are the plain curves' areas."""
    base = recovery_losses(3)
    post = base.copy()
    post[1:-1] = base[0] - 0.5 * (base[0] - base[1:-1])  # half the recovery at every inner k
    settings = MetricSettings(bootstrap=300, seed=4)
    comparison = compare_recovery(FRACTIONS, {"base": base, "post": post}, "base", settings)
    assert comparison["bootstrap"] == 300 and comparison["n_questions"] == base.shape[1]
    for label, losses in (("base", base), ("post", post)):
        assert comparison["models"][label]["area"] == recovery_area(FRACTIONS, recovery_f(losses))
    difference = comparison["area_difference"]["post"]
    assert difference["difference"] == comparison["models"]["post"]["area"] - comparison["models"]["base"]["area"]
    assert difference["interval"][1] < 0
    with pytest.raises(ValueError, match="one shape"):
        compare_recovery(FRACTIONS, {"base": base, "post": post[:, :3]}, "base")


# --- run mode: a run of the cache, its models loaded from their recorded specs -------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A cache holding one run of a tiny base and post (float32, qkv) on answers they generated."""
    root = tmp_path_factory.mktemp("faithfulness_run")
    tokenizer = tiny_tokenizer()
    build_tiny_model(root / "base", tokenizer, seed=0)
    build_tiny_model(root / "post", tokenizer, seed=1, perturb_from=root / "base", perturbation=0.003)
    questions = [f"What is {a} plus {b}" for a in range(3) for b in range(3)]
    template = get_template("deepseek-math")
    prompts = [template.render(q, tokenizer)[1] for q in questions]
    answers = generate_greedy(load_causal_lm(str(root / "base")), tokenizer, prompts, 12,
                              template.stop_strings)
    with open(root / "data.jsonl", "w") as f:
        for i, (q, a) in enumerate(zip(questions, answers)):
            reference = extract_answer(tokenizer.decode(a, skip_special_tokens=True))
            f.write(json.dumps({"id": f"q{i}", "question": q, "answer": reference}) + "\n")
    (root / "pairs.toml").write_text(f"""
[pairs.tiny]
base = {{ path = "{root / 'base'}", label = "tiny-base" }}
post = {{ path = "{root / 'post'}", label = "tiny-post", algorithm = "GRPO" }}
template = "deepseek-math"
max_new_tokens = 12

[datasets.tiny]
jsonl = "{root / 'data.jsonl'}"
""")
    request = RunRequest(pair="tiny", dataset="tiny", alphas=(0.1, 0.5), cache=str(root / "c.duckdb"),
                         config=str(root / "pairs.toml"),
                         selection=SelectionSettings(n=6, beta=0.0, gamma=10.0, delta=2.0))
    summary = pipeline.run(request, log=lambda text: None)
    return root, summary.run_key


def test_run_samples_are_the_runs_own_answers_cut_at_its_t_cut(tiny_run):
    root, run_key = tiny_run
    run = read_run_samples(Store(root / "c.duckdb"), run_key, 0.5, 2)
    assert [m.label for m in run.models] == ["tiny-base", "tiny-post"]
    assert [m.role for m in run.models] == ["base", "post"]
    with Store(root / "c.duckdb").read() as con:
        t_cut = con.execute("SELECT t_cut FROM run_alphas WHERE run_key = ? AND alpha = 0.5",
                            [run_key]).fetchone()[0]
        for model in run.models:
            rows = con.execute("""
                SELECT rs.question_id, g.prompt_ids, g.answer_ids FROM run_samples rs
                JOIN generations g USING (generation_key)
                WHERE rs.run_key = ? AND rs.label = ? ORDER BY rs.position LIMIT 2""",
                               [run_key, model.label]).fetchall()
            assert [(s.id, list(s.prompt_ids), list(s.answer_ids), s.t_cut) for s in model.samples] == [
                (q, p, a, min(t_cut, len(a))) for q, p, a in rows]
    assert run.t_cut == t_cut and run.question_ids == [s.id for s in run.models[1].samples]
    assert str(run.models[0].spec) == str(root / "base")


def test_run_mode_scores_equal_the_cached_scores_and_compares_recovery(tiny_run):
    """At the run's own settings, each model's W for the ablated edges are the scores the run stored
    for those answers: the right tokens, cut at the right place, from the right model."""
    root, run_key = tiny_run
    run = read_run_samples(Store(root / "c.duckdb"), run_key, 0.5, 3)
    report = run_faithfulness(run, ScoreSettings(), edges_per_sample=5, seed=1, log=lambda text: None)
    cache = ResultCache.open(root / "c.duckdb")
    graph = cache.graph(run_key)
    assert report["method"] == {"name": "eap"} and report["questions"] == run.question_ids
    for label, model_report in report["models"].items():
        edges, ids = cache.sample_edges(run_key, 0.5, label)
        stored = dict(zip(ids, graph.dense(edges)))
        assert len(model_report["edges"]) == 15
        for row in model_report["edges"]:
            expected = stored[row["sample_id"]][graph.src_index(row["src"]), graph.dst_index(row["dst"])]
            assert row["w"] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    comparison = report["recovery_comparison"]
    assert comparison["base"] == "tiny-base" and comparison["n_questions"] == 3
    for label in ("tiny-base", "tiny-post"):
        assert comparison["models"][label]["area"] == pytest.approx(report["models"][label]["recovery"]["area"])
    assert set(comparison["area_difference"]) == {"tiny-post"}


def test_run_mode_with_eap_ig_compares_delta_with_eap_ig_scores(tiny_run, tmp_path):
    root, run_key = tiny_run
    out = tmp_path / "ig.json"
    completed = subprocess.run(
        [sys.executable, "-m", "core", "faithfulness", "--run", run_key, "--alpha", "0.5", "--cache",
         str(root / "c.duckdb"), "--questions", "2", "--edges", "4", "--method", "eap-ig",
         "--ig-steps", "3", "--dtype", "float64", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "area tiny-post - tiny-base:" in completed.stdout
    report = json.loads(out.read_text())
    assert report["method"] == {"name": "eap-ig", "ig_steps": 3, "ig_baseline": "zero"}
    run = read_run_samples(Store(root / "c.duckdb"), run_key, 0.5, 2)
    model = load_causal_lm(str(root / "base"), dtype="float64")
    settings = ScoreSettings(method="eap-ig", ig_steps=3, dtype="float64")
    direct = score_samples(model, run.models[0].samples, settings)
    eap = score_samples(model, run.models[0].samples, ScoreSettings(dtype="float64"))
    graph = direct.graph
    base_rows = report["models"]["tiny-base"]["edges"]
    for row in base_rows:
        i, s, d = run.question_ids.index(row["sample_id"]), graph.src_index(row["src"]), graph.dst_index(row["dst"])
        assert row["w"] == pytest.approx(direct.scores[i, s, d], rel=1e-9, abs=1e-12)
    assert any(row["w"] != pytest.approx(eap.scores[run.question_ids.index(row["sample_id"]),
                                                     graph.src_index(row["src"]),
                                                     graph.dst_index(row["dst"])], rel=1e-6)
               for row in base_rows), "EAP-IG's scores must not be EAP's"


def test_run_mode_errors_name_what_is_wrong(tiny_run, tmp_path):
    root, run_key = tiny_run
    store = Store(root / "c.duckdb")
    with pytest.raises(NotFoundError, match="has no run 'nope'.*python -m core ls"):
        read_run_samples(store, "nope", 0.5, 2)
    with pytest.raises(InputError, match=r"has no alpha 0.3; its alphas are \[0.1, 0.5\]"):
        read_run_samples(store, run_key, 0.3, 2)
    run = read_run_samples(store, run_key, 0.5, 1)
    changed = root / "changed"
    build_tiny_model(changed, tiny_tokenizer(), seed=5)
    moved = type(run)(run.run_key, run.name, run.alpha, run.t_cut, [
        type(m)(m.label, m.role, type(m.spec)("local", str(changed)), m.fingerprint, m.samples)
        for m in run.models])
    with pytest.raises(InputError, match="tiny-base .* files changed since the run"):
        run_faithfulness(moved, ScoreSettings(), 2, 0, log=lambda text: None)
    completed = subprocess.run(
        [sys.executable, "-m", "core", "faithfulness", "--run", run_key, "--model", str(root / "base"),
         "--edges", "2", "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.strip().endswith("give either --model with --samples, or --run with --alpha")


def test_one_sample_cannot_be_cross_fitted():
    with pytest.raises(InputError, match="needs at least 2 samples; got 1"):
        faithfulness_report(tiny_model("llama"), random_samples(1), ScoreSettings(), 4, 0)
