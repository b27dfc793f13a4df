"""The embedded demo: SmolLM2-135M-Instruct and three LoRA adapters post-trained from it on CPU
(GRPO, DPO, SFT), on offline arithmetic problems, run through the project's own pipeline.

Steps (`python -m core.demo <command>`): prepare-base (convert the base model into cache/models/),
problems (write the committed problem splits), train grpo|dpo|sft (write the committed adapters),
evaluate (held-out accuracies), run (the pipeline on the three demo pairs).
"""
