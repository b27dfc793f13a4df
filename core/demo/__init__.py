"""The embedded demo: SmolLM2-135M-Instruct after a short reasoning SFT (the base) and LoRA adapters
post-trained from it on CPU (GRPO, its seed null, DPO, SFT), on offline arithmetic problems with worked
solutions, run through the project's own pipeline.

Steps (`python -m core.demo <command>`): prepare-base (convert the instruct model into cache/models/),
problems (write the committed problem splits), train reasoning-sft|grpo|grpo-seed-null|dpo|sft (write
the committed adapters), export-steps (GRPO's trajectory checkpoints), run (the pipeline on the demo's
pairs, `--part pairs|extras`), start (the same as a background job), evaluate (held-out accuracies from
the runs' graded answers).
"""
