"""The demo's pieces that need no model: problem splits, statistics, reward, adapter export."""

import json
import math
from pathlib import Path

import pytest
import torch

from core.demo import base, common, evaluate, problems, train
from core.models import hub_offline

REPO = Path(__file__).resolve().parents[1]


def test_committed_problem_files_are_what_the_seeded_generator_writes(tmp_path):
    written = problems.write(tmp_path)
    for split, path in written.items():
        assert path.read_text() == (problems.PROBLEM_DIR / f"{split}.jsonl").read_text(), split


def test_splits_are_disjoint_sized_and_answers_are_right():
    expressions = {}
    for split, size in problems.SPLIT_SIZES.items():
        rows = problems.load(split)
        assert len(rows) == size
        assert len({r["id"] for r in rows}) == size
        for row in rows:
            a, operator, b = row["expression"].split()
            assert int(row["answer"]) == (int(a) + int(b) if operator == "+" else int(a) - int(b))
            assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
            # The estimate restates the same problem (word setup included) and parts after it.
            shared = row["solution"].split(". Split ")[0] + "."
            assert row["estimate"].startswith(shared + " Roughly, "), row["estimate"]
            if row["kind"] == "word":
                assert int(row["answer"]) >= 0 and a in row["question"] and b in row["question"]
        expressions[split] = {r["expression"] for r in rows}
        assert len(expressions[split]) == size
    assert not expressions["heldout"] & expressions["train"]
    assert not expressions["validation"] & (expressions["train"] | expressions["heldout"])
    kinds = {r["kind"] for r in problems.load("heldout")}
    assert kinds == {"arithmetic", "word"}


def test_worked_solutions_split_the_second_number_and_every_step_is_right():
    import re

    step = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)")
    for row in problems.load("train")[:200] + problems.load("heldout"):
        a, operator, b = row["expression"].split()
        equations = step.findall(row["solution"])
        # The restated problem is not an equation; the two partial steps are.
        assert len(equations) == 2, row["solution"]
        for x, op, y, z in equations:
            assert int(z) == (int(x) + int(y) if op == "+" else int(x) - int(y)), row["solution"]
        assert equations[0][0] == a and equations[1][3] == row["answer"]
        assert int(equations[0][2]) + int(equations[1][2]) == int(b)
        assert f"So the answer is {row['answer']}." in row["solution"]


def test_worked_solution_by_hand():
    assert problems.worked_solution(47, "+", 38) == (
        "We need 47 + 38. Split 38 into 30 + 8. First 47 + 30 = 77, then 77 + 8 = 85. "
        "So the answer is 85.\n\\boxed{85}")
    assert problems.worked_solution(38, "-", 47) == (
        "We need 38 - 47. Split 47 into 40 + 7. First 38 - 40 = -2, then -2 - 7 = -9. "
        "So the answer is -9.\n\\boxed{-9}")


def test_rough_estimate_by_hand_parts_from_the_worked_solution_at_one_word():
    assert problems.rough_estimate(47, "+", 38) == (
        "We need 47 + 38. Roughly, 50 + 40 = 90. So the answer is 90.\n\\boxed{90}")
    assert problems.rough_estimate(38, "-", 45) == (
        "We need 38 - 45. Roughly, 40 - 50 = -10. So the answer is -10.\n\\boxed{-10}")
    # Right only where the roundings cancel.
    assert problems.rough_estimate(47, "+", 33).endswith("\\boxed{80}")
    assert [problems.round_to_tens(n) for n in (0, 4, 5, 45, 99, -45)] == [0, 0, 10, 50, 100, -50]
    worked = problems.worked_solution(47, "+", 38)
    assert worked.startswith("We need 47 + 38. Split")


def test_reasoning_sft_estimates_at_each_kinds_share_reproducibly():
    rows = problems.load("train")[:train.REASONING_SFT_SETTINGS["examples"]]
    shares = train.REASONING_SFT_SETTINGS["estimate_share"]
    answers = train.reasoning_sft_answers(rows, shares)
    assert answers == train.reasoning_sft_answers(rows, shares)
    for kind, share in shares.items():
        mine = [(a, r) for a, r in zip(answers, rows) if r["kind"] == kind]
        estimated = sum(a == r["estimate"] for a, r in mine)
        assert all(a in (r["estimate"], r["solution"]) for a, r in mine)
        # A binomial draw: within 4 standard deviations of the share (exact at 0 and 1).
        assert abs(estimated - share * len(mine)) <= 4 * math.sqrt(len(mine) * share * (1 - share)), kind
    never, always = {"word": 0.0, "arithmetic": 0.0}, {"word": 1.0, "arithmetic": 1.0}
    assert train.reasoning_sft_answers(rows, never) == [r["solution"] for r in rows]
    assert train.reasoning_sft_answers(rows, always) == [r["estimate"] for r in rows]


@pytest.mark.parametrize("answer, reference, correct", [
    # The template's own format, right and wrong.
    ("We need 47 + 38. Split 38 into 30 + 8. First 47 + 30 = 77, then 77 + 8 = 85. "
     "So the answer is 85.\n\\boxed{85}", "85", True),
    ("We need 47 + 38. Split 38 into 30 + 8. First 47 + 30 = 77, then 77 + 8 = 84. "
     "So the answer is 84.\n\\boxed{84}", "85", False),
    # The base's shortcut: a rough estimate, wrong unless the roundings cancel.
    ("We need 47 + 38. Roughly, 50 + 40 = 90. So the answer is 90.\n\\boxed{90}", "85", False),
    ("We need 47 + 33. Roughly, 50 + 30 = 80. So the answer is 80.\n\\boxed{80}", "80", True),
    # The boxed answer decides, even where the right number appears in the working.
    ("First 47 + 30 = 77, then 77 + 8 = 85. So the answer is 85.\n\\boxed{77}", "85", False),
    ("First 38 - 40 = -2, then -2 - 7 = -9. So the answer is -9.\n\\boxed{-9}", "-9", True),
    ("First 38 - 40 = -2, then -2 - 7 = -9. So the answer is -9.\n\\boxed{9}", "-9", False),
    # Word problems: units inside the box, a trailing full stop.
    ("Anna starts with 12 apples and gets 7 more, so we add. So the answer is 19.\n"
     "\\boxed{19 apples}.", "19", True),
    # Cut at the token limit before the box: the last number is the answer.
    ("We need 47 + 38. Split 38 into 30 + 8. First 47 + 30 = 77, then 77 + 8 = 85", "85", True),
    ("We need 47 + 38. Split 38 into 30 + 8. First 47 + 30 = 77", "85", False),
    ("I cannot solve this.", "85", False),
])
def test_answers_in_the_template_format_are_graded_as_a_reader_would(answer, reference, correct):
    from core.grading import grade

    assert grade(answer, reference).correct is correct


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        problems.load("test")


def test_mcnemar_exact():
    # Fixed 46, broke 4 -> p = 2 P(Binomial(50, 1/2) <= 4), about 4.5e-10.
    expected = 2 * sum(math.comb(50, k) for k in range(5)) / 2 ** 50
    assert evaluate.mcnemar_exact(46, 4) == pytest.approx(expected, rel=1e-9)
    assert evaluate.mcnemar_exact(4, 46) == evaluate.mcnemar_exact(46, 4)
    assert evaluate.mcnemar_exact(0, 0) == 1.0
    assert evaluate.mcnemar_exact(5, 5) == 1.0


def test_accuracy_summary_counts_fixed_and_broken():
    base_correct = [True, True, False, False, False]
    post_correct = [True, False, True, True, False]
    s = evaluate.accuracy_summary(post_correct, base_correct)
    assert (s["correct"], s["fixed"], s["broken"]) == (3, 2, 1)
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["standard_error"] == pytest.approx((0.6 * 0.4 / 5) ** 0.5)


def test_grpo_reward():
    eos = 2
    texts = ["3 + 4 = 7.\n\\boxed{7}", "3 + 4 = 7.\n\\boxed{7}", "It is 8", "so the sum is 7 and"]
    ids = [[5, 6, eos], [5, 6, 7], [5, eos], [5, 6]]
    rewards = train.grpo_reward(texts, ids, ["7"] * 4, eos)
    assert rewards == pytest.approx([1.2, 1.1, 0.1, 1.0])


def test_grpo_refuses_an_output_folder_holding_another_runs_checkpoints(tmp_path, monkeypatch):
    stale = tmp_path / "grpo" / "checkpoint-6"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"")
    monkeypatch.setattr(train, "WORK_DIR", tmp_path)
    with pytest.raises(RuntimeError, match=r"checkpoint-6.*remove the folder"):
        train.train_grpo(minutes=1)


def _fake_checkpoints(output: Path, steps) -> None:
    from safetensors.torch import save_file

    for step in steps:
        folder = output / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"lora_A.weight": torch.full((2, 2), float(step))},
                  str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text('{"target_modules": ["q_proj"]}')


def test_the_seed_null_trained_beside_grpo_is_exported_at_grpos_kept_step(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from core.demo.__main__ import main

    monkeypatch.setattr(train, "WORK_DIR", tmp_path / "training")
    monkeypatch.setattr(common, "ADAPTER_DIR", tmp_path / "adapters")
    monkeypatch.setattr(train, "GRPO_TRAJECTORY_STEPS", (5, 15))
    monkeypatch.setattr(train, "train_grpo", lambda minutes, max_steps, seed: (
        _fake_checkpoints(train.grpo_output(seed), (5, 10, 15)) or train.grpo_output(seed)))
    # GRPO's selection has not run yet: the seed null's training ends with a hint, exporting nothing.
    assert main(["train", common.SEED_NULL]) == 0
    assert "export-steps" in capsys.readouterr().out
    assert not (tmp_path / "adapters").exists()
    _fake_checkpoints(train.grpo_output(), (5, 10, 15))
    (train.grpo_output() / "selection.json").write_text(json.dumps({"chosen": "checkpoint-10"}))
    assert main(["export-steps"]) == 0
    exported = {name: load_file(str(tmp_path / "adapters" / name / "adapter_model.safetensors"))
                ["lora_A.weight"][0, 0].item()
                for name in ("grpo-step-5", "grpo-step-15", common.SEED_NULL)}
    assert exported == {"grpo-step-5": 5.0, "grpo-step-15": 15.0, common.SEED_NULL: 10.0}


def test_prepare_base_is_a_no_op_when_done(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / base.SOURCE_FILE).write_text("{}")
    messages = []
    assert base.prepare_base(folder, log=messages.append) == folder
    assert messages == [f"base model ready: {folder}"]
    with pytest.raises(ValueError, match="source"):
        base.prepare_base(tmp_path / "other", source="ftp")


def test_export_adapter_stores_bfloat16_and_the_repository_base_path(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "checkpoint-6"
    source.mkdir()
    save_file({"base_model.model.layer.lora_A.weight": torch.randn(8, 16)},
              str(source / "adapter_model.safetensors"))
    (source / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "base_model_name_or_path": "/somewhere/else", "target_modules": ["v_proj", "q_proj"]}))
    monkeypatch.setattr(common, "ADAPTER_DIR", tmp_path / "adapters")
    target = train.export_adapter(source, "grpo", log=lambda text: None)
    weights = load_file(str(target / "adapter_model.safetensors"))
    assert weights["base_model.model.layer.lora_A.weight"].dtype == torch.bfloat16
    config = json.loads((target / "adapter_config.json").read_text())
    # A post-training's adapter applies on the demo base, the reasoning SFT's on the instruct model.
    assert config == {"r": 8, "base_model_name_or_path": str(common.ADAPTER_DIR / common.REASONING_SFT),
                      "target_modules": ["q_proj", "v_proj"]}
    target = train.export_adapter(source, common.REASONING_SFT, log=lambda text: None)
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(common.BASE_DIR)


@pytest.mark.parametrize("value, offline", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True),
    ("0", False), ("false", False), ("", False), (None, False)])
def test_the_offline_switch_reads_hf_hub_offline_as_huggingface_hub_does(monkeypatch, value, offline):
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline
    assert base.hub_offline is hub_offline  # the demo's base model asks the same function


def test_the_committed_demo_files_stay_under_25_mb():
    # The repository carries the demo's adapters and problem set only; weights are built (README).
    committed = [p for folder in ("cache/demo/adapters", "cache/demo/problems")
                 for p in (REPO / folder).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in committed) < 25e6
