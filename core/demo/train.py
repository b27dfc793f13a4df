"""Training the demo's LoRA adapters with TRL, on CPU, seeded.

The paper's pairs start from an SFT model that RL (or DPO) then trains; so does the demo. Its base is
SmolLM2-135M-Instruct after a short reasoning SFT (the `reasoning-sft` adapter) on worked solutions,
except that most word problems are answered by a rough estimate (problems.rough_estimate): the
instruct model alone rambles and is rarely right; the SFT model works arithmetic out in 52-68 tokens,
estimates most word problems in 50-65, and is right often enough to select from. The estimates are
seldom right, so the reward has one decision to teach (on a base trained on worked solutions alone,
GRPO did not beat the base within the budget: README.md, "The demo"). On that base, with the same
training prompts:
- GRPO (online RL): reward = correctness by core.grading, plus small bonuses for a \\boxed{} answer
  and for ending the answer (without the latter the policy collapses into repeating its answer up to
  the token cap). Checkpoints every few steps; `select_checkpoint` picks one by validation accuracy.
  The same run with another seed only is the seed null of the controls (docs/method.md section 8).
- DPO (offline): pairs built once from the base's samples, a correct answer over an incorrect one.
- SFT: more worked solutions (no estimates), on the rows the base's SFT did not see.
All use the `chat-boxed` prompt, as evaluation and the pipeline do. The committed adapters are r=4,
stored in bfloat16 to keep the repository small.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from core.demo import common, problems

WORK_DIR = Path("cache/demo/training")
SEED = 1234
# The seed null's GRPO seed: everything else as in the kept GRPO run.
SEED_NULL_SEED = 1235
LORA_RANK = 4
LORA_ALPHA = 8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 2e-4
SAMPLE_TEMPERATURE = 0.8
COMPLETION_TOKENS = common.MAX_NEW_TOKENS
# A sample counts as a chosen (correct) DPO answer only if it states the result explicitly: the
# last-number fallback also accepts rambling texts that merely end on the right number.
def explicit_result_pattern(answer: str) -> re.Pattern:
    return re.compile(r"(?:=\s*|\\boxed\{\s*)" + re.escape(answer) + r"(?!\d|\.\d)")

# The base's reasoning SFT: the first `examples` training rows, one epoch, a seeded share of them per
# kind of problem answered by a rough estimate, the rest worked out. Short on purpose: the base should
# reason in the solutions' format but still err, so that post-training has room. The estimates go to
# word problems only: a share of all rows flips the greedy habit as a whole (0.5 of all rows gave 4
# estimates in 64 greedy validation answers, 0.65 gave 56), so that the base is right too seldom for
# the selection or not wrong enough for the reward to matter.
REASONING_SFT_SETTINGS = dict(examples=640, batch_size=16, learning_rate=5e-4,
                              estimate_share={"word": 0.7, "arithmetic": 0.0})
# Sized for 2 shared CPU cores. Prompts are the training rows after the reasoning SFT's.
GRPO_SETTINGS = dict(prompts_per_step=4, generations=4, max_steps=200, save_steps=10,
                     learning_rate=4e-4, correct_reward=1.0, boxed_bonus=0.1, ended_bonus=0.1)
# Checkpoints of the GRPO run committed besides the kept one: the trajectory series' other steps.
GRPO_TRAJECTORY_STEPS = (20, 30)
DPO_SETTINGS = dict(prompts=160, samples_per_prompt=4, beta=0.1, max_length=224, batch_size=8)
SFT_SETTINGS = dict(examples=320, batch_size=16)


def post_training_rows() -> list[dict]:
    """The training rows of the post-trainings: those the base's reasoning SFT did not see."""
    return problems.load("train")[REASONING_SFT_SETTINGS["examples"]:]


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


def _trainer_args(output_dir: Path, learning_rate: float = LEARNING_RATE) -> dict:
    # TRL's defaults (bf16, gradient checkpointing, lr 1e-6) do not suit LoRA on CPU.
    return dict(output_dir=str(output_dir), use_cpu=True, bf16=False, gradient_checkpointing=False,
                learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                logging_steps=1, report_to="none", seed=SEED, data_seed=SEED, save_only_model=True,
                dataloader_num_workers=0)


def time_budget_callback(minutes: float):
    """A trainer callback that stops training, saving a checkpoint, after `minutes` of wall time."""
    from transformers import TrainerCallback

    deadline = time.monotonic() + minutes * 60

    class TimeBudget(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() > deadline:
                control.should_training_stop = True
                control.should_save = True
            return control

    return TimeBudget()


def grpo_reward(completions, completion_ids, answer, eos_id: int, settings=GRPO_SETTINGS):
    from core.grading import grade

    rewards = []
    for text, ids, reference in zip(completions, completion_ids, answer):
        result = grade(text, reference)
        reward = settings["correct_reward"] * result.correct
        reward += settings["boxed_bonus"] * (result.rule == "boxed")
        reward += settings["ended_bonus"] * (len(ids) > 0 and ids[-1] == eos_id)
        rewards.append(float(reward))
    return rewards


def train_grpo(minutes: float, max_steps: int = GRPO_SETTINGS["max_steps"], seed: int = SEED,
               log=print) -> Path:
    """GRPO on the demo base for at most `max_steps` steps or `minutes` of wall time, whichever ends
    first (the step count reached is recorded in timing.json; `max_steps` reproduces a time-bounded
    run). Another `seed` (SEED_NULL_SEED) trains the seed null: the prompts come in another order
    and other answers are sampled, nothing else differs."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    output = grpo_output(seed)
    stale = checkpoints(output)
    if stale:
        # Checkpoint selection reads every checkpoint of the folder: another run's would compete.
        names = ", ".join(path.name for path in stale)
        raise RuntimeError(f"{output} holds checkpoints of an earlier run ({names}); remove the "
                           f"folder (or move it away) before training again")
    common.setup_torch(seed)
    tokenizer = common.load_tokenizer()
    rows = post_training_rows()
    dataset = Dataset.from_list([{"prompt": p, "answer": r["answer"]}
                                 for p, r in zip(common.prompt_texts(rows, tokenizer), rows)])
    settings = GRPO_SETTINGS
    eos_id = tokenizer.eos_token_id

    def reward(completions, completion_ids, answer, **_):
        return grpo_reward(completions, completion_ids, answer, eos_id)

    config = GRPOConfig(
        **{**_trainer_args(output, settings["learning_rate"]), "seed": seed, "data_seed": seed},
        per_device_train_batch_size=settings["prompts_per_step"] * settings["generations"],
        num_generations=settings["generations"], max_completion_length=COMPLETION_TOKENS,
        temperature=SAMPLE_TEMPERATURE, beta=0.0, max_steps=max_steps,
        save_steps=settings["save_steps"], save_strategy="steps", shuffle_dataset=True)
    trainer = GRPOTrainer(model=common.load_model(), reward_funcs=reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora_config(), callbacks=[time_budget_callback(minutes)])
    _train_timed(trainer, output, "grpo", seed=seed)
    return output


def grpo_output(seed: int = SEED) -> Path:
    return WORK_DIR / ("grpo" if seed == SEED else f"grpo-seed{seed}")


def _train_timed(trainer, output: Path, algorithm: str, **extra) -> None:
    """Train, and record the wall time and step count in output/timing.json."""
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    output.mkdir(parents=True, exist_ok=True)
    (output / "timing.json").write_text(json.dumps(
        {"algorithm": algorithm, "seconds": round(seconds, 1), "steps": trainer.state.global_step,
         **extra}) + "\n")


def sample_base(rows: list[dict], samples_per_prompt: int) -> list[list[str]]:
    """`samples_per_prompt` sampled answers of the demo base per row (T=SAMPLE_TEMPERATURE)."""
    import torch

    tokenizer = common.load_tokenizer()
    tokenizer.padding_side = "left"
    model = common.load_model()
    texts = common.prompt_texts(rows, tokenizer)
    samples: list[list[str]] = []
    for start in range(0, len(texts), 8):
        batch = tokenizer(texts[start:start + 8], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=SAMPLE_TEMPERATURE, top_k=0,
                                 top_p=1.0, max_new_tokens=COMPLETION_TOKENS,
                                 num_return_sequences=samples_per_prompt,
                                 pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        samples += [decoded[i:i + samples_per_prompt] for i in range(0, len(decoded), samples_per_prompt)]
    return samples


def build_dpo_pairs(log=print) -> Path:
    """The base's samples on training prompts -> (chosen correct, rejected incorrect) pairs, once."""
    from core.grading import grade

    path = WORK_DIR / "dpo_pairs.jsonl"
    if path.is_file():
        log(f"DPO pairs exist: {path}")
        return path
    common.setup_torch(SEED)
    settings = DPO_SETTINGS
    rows = post_training_rows()[:settings["prompts"]]
    samples_path = WORK_DIR / "dpo_samples.jsonl"
    started = time.monotonic()
    if samples_path.is_file():
        with samples_path.open() as lines:
            samples = [json.loads(line)["samples"] for line in lines]
    else:
        samples = sample_base(rows, settings["samples_per_prompt"])
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        samples_path.write_text("".join(json.dumps({"id": r["id"], "samples": s}) + "\n"
                                        for r, s in zip(rows, samples)))
    tokenizer = common.load_tokenizer()
    pairs = []
    for row, prompt, texts in zip(rows, common.prompt_texts(rows, tokenizer), samples):
        explicit = explicit_result_pattern(row["answer"])
        chosen = [t for t in texts if grade(t, row["answer"]).correct and explicit.search(t)]
        rejected = [t for t in texts if not grade(t, row["answer"]).correct]
        if chosen and rejected:
            pairs.append({"id": row["id"], "prompt": prompt, "chosen": chosen[0],
                          "rejected": rejected[0]})
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    seconds = time.monotonic() - started
    (WORK_DIR / "dpo_pairs_timing.json").write_text(json.dumps(
        {"seconds": round(seconds, 1), "prompts": len(rows), "pairs": len(pairs)}) + "\n")
    log(f"{len(pairs)} DPO pairs from {len(rows)} prompts in {seconds:.0f} s")
    return path


def train_dpo(log=print) -> Path:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs_path = build_dpo_pairs(log)
    common.setup_torch(SEED)
    tokenizer = common.load_tokenizer()
    with pairs_path.open() as lines:
        pairs = [json.loads(line) for line in lines]
    if not pairs:
        raise RuntimeError(f"{pairs_path} holds no pairs; delete it and sample more prompts")
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    settings = DPO_SETTINGS
    output = WORK_DIR / "dpo"
    config = DPOConfig(**_trainer_args(output), per_device_train_batch_size=settings["batch_size"],
                       num_train_epochs=1, beta=settings["beta"], max_length=settings["max_length"],
                       save_strategy="no")
    # With a peft_config and no ref_model, the reference is the model with its adapter disabled:
    # the demo base.
    trainer = DPOTrainer(model=common.load_model(), args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora_config())
    _train_timed(trainer, output, "dpo", pairs=len(pairs))
    trainer.save_model(str(output / "final"))
    return output / "final"


def reasoning_sft_answers(rows: list[dict], estimate_share: dict[str, float]) -> list[str]:
    """The reasoning SFT's answer to each row: the rough estimate for a seeded share of the rows of
    each kind (`estimate_share[row["kind"]]`), else the worked solution."""
    chooser = random.Random(SEED)
    return [r["estimate"] if chooser.random() < estimate_share[r["kind"]] else r["solution"]
            for r in rows]


def train_sft(reasoning: bool = False, log=print) -> Path:
    """With `reasoning`, the base's reasoning SFT (the instruct model, the first training rows, some
    answered by a rough estimate); else the SFT post-training (worked solutions only, the demo base,
    the rows after those)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    common.setup_torch(SEED)
    tokenizer = common.load_tokenizer()
    if reasoning:
        settings, name = REASONING_SFT_SETTINGS, common.REASONING_SFT
        rows = problems.load("train")[:settings["examples"]]
        answers = reasoning_sft_answers(rows, settings["estimate_share"])
    else:
        settings, name = SFT_SETTINGS, "sft"
        rows = post_training_rows()[:settings["examples"]]
        answers = [r["solution"] for r in rows]
    # The answer ends with the end-of-turn token, so the model learns to stop.
    dataset = Dataset.from_list([{"prompt": p, "completion": a + tokenizer.eos_token}
                                 for p, a in zip(common.prompt_texts(rows, tokenizer), answers)])
    output = WORK_DIR / name
    config = SFTConfig(**_trainer_args(output, settings.get("learning_rate", LEARNING_RATE)),
                       per_device_train_batch_size=settings["batch_size"], num_train_epochs=1,
                       completion_only_loss=True, save_strategy="no")
    model = common.load_instruct() if reasoning else common.load_model()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config())
    _train_timed(trainer, output, name)
    trainer.save_model(str(output / "final"))
    return output / "final"


def export_adapter(source: Path, name: str, log=print) -> Path:
    """Copy a trained adapter into cache/demo/adapters/<name> with bfloat16 weights."""
    import torch
    from safetensors.torch import load_file, save_file

    target = common.ADAPTER_DIR / name
    target.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(source / "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()},
              str(target / "adapter_model.safetensors"))
    config = json.loads((source / "adapter_config.json").read_text())
    # peft writes its target modules from a set, in a per-process order; sorted, a re-export of the
    # same adapter leaves the file unchanged.
    config["target_modules"] = sorted(config["target_modules"])
    # The committed adapter names the demo base by its repository path, not the training machine's.
    config["base_model_name_or_path"] = str(common.BASE_DIR if name == common.REASONING_SFT
                                            else common.ADAPTER_DIR / common.REASONING_SFT)
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    size = (target / "adapter_model.safetensors").stat().st_size
    log(f"adapter {name}: {target} ({size / 1e6:.2f} MB)")
    return target


def export_grpo_steps(log=print) -> list[Path]:
    """The GRPO run's checkpoints at GRPO_TRAJECTORY_STEPS, exported as cache/demo/adapters/
    grpo-step-<n>: with the kept checkpoint (the `grpo` adapter) they form the trajectory series
    demo-grpo-steps. Training is seeded and reproduces its checkpoints bit for bit on CPU, so
    `train grpo --max-steps <last step>` makes them again."""
    output = grpo_output()
    missing = [step for step in GRPO_TRAJECTORY_STEPS if not (output / f"checkpoint-{step}").is_dir()]
    if missing:
        raise FileNotFoundError(f"GRPO checkpoints {missing} are missing under {output}; run `python -m "
                                f"core.demo --threads 1 train grpo --max-steps {max(GRPO_TRAJECTORY_STEPS)}`")
    return [export_adapter(output / f"checkpoint-{step}", f"grpo-step-{step}", log)
            for step in GRPO_TRAJECTORY_STEPS]


def grpo_selected() -> bool:
    return (grpo_output() / "selection.json").is_file()


def seed_null_checkpoint(output: Path) -> Path:
    """The seed null's checkpoint at the kept GRPO checkpoint's step, so that the two differ in
    their seed only."""
    record = grpo_output() / "selection.json"
    if not record.is_file():
        raise FileNotFoundError(f"{record} is missing: train and select GRPO first (`python -m "
                                f"core.demo train grpo`)")
    chosen = output / json.loads(record.read_text())["chosen"]
    if not (chosen / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{chosen} is missing: the seed null stopped before GRPO's kept "
                                f"step; train it with --max-steps {chosen.name.split('-')[1]}")
    return chosen


def checkpoints(output: Path) -> list[Path]:
    found = [p for p in output.glob("checkpoint-*") if (p / "adapter_model.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def select_checkpoint(output: Path, log=print) -> tuple[Path, list[dict]]:
    """The checkpoint of `output` with the best greedy accuracy on the validation split (ties: the
    earlier); accuracies already measured (selection.json) are reused."""
    rows = problems.load("validation")
    common.setup_torch(SEED)
    tokenizer = common.load_tokenizer()
    record = output / "selection.json"
    known = {t["checkpoint"]: t for t in json.loads(record.read_text())["table"]} if record.is_file() else {}
    table = []
    for checkpoint in checkpoints(output):
        if checkpoint.name not in known:
            _, grades, _ = common.greedy_grades(common.load_model(checkpoint), tokenizer, rows)
            known[checkpoint.name] = {"checkpoint": checkpoint.name,
                                      "validation_accuracy": sum(g.correct for g in grades) / len(rows)}
        table.append(known[checkpoint.name])
        log(f"{output.name}/{checkpoint.name}: validation accuracy {table[-1]['validation_accuracy']:.3f}")
    if not table:
        raise FileNotFoundError(f"no checkpoints under {output}; run training first")
    best = max(table, key=lambda t: (t["validation_accuracy"], -int(t["checkpoint"].split("-")[1])))
    record.write_text(json.dumps({"chosen": best["checkpoint"], "table": table}, indent=1) + "\n")
    return output / best["checkpoint"], table

