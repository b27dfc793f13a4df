"""Prompt templates of the paper's model pairs (docs/method.md section 5) and of the demo.

A template turns a question into prompt token ids. The ids are stored as produced and reused for
generation and scoring, never re-tokenised.
"""

from __future__ import annotations

import dataclasses

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    name: str
    # A format string with {question}, or None to use the tokenizer's own chat template.
    text: str | None
    # Suffix appended to the question inside the user turn of a chat template.
    user_suffix: str = ""
    # Extra stop strings beyond the tokenizer's EOS.
    stop_strings: tuple[str, ...] = ()

    def render(self, question: str, tokenizer) -> tuple[str, list[int]]:
        """The prompt text and its token ids."""
        if self.text is None:
            messages = [{"role": "user", "content": question + self.user_suffix}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # Chat templates already contain their special tokens.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = self.text.format(question=question)
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return text, list(ids)


TEMPLATES = {t.name: t for t in (
    PromptTemplate(
        "deepseek-math",
        "User: {question}\n" + BOXED_INSTRUCTION.replace("{", "{{").replace("}", "}}") + "\n\nAssistant:",
        stop_strings=("User:",)),
    PromptTemplate("mistral", "[INST] {question}[/INST]"),
    PromptTemplate(
        "qwen25-math-cot",
        "<|im_start|>system\n" + BOXED_INSTRUCTION.replace("{", "{{").replace("}", "}}")
        + "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
        stop_strings=("<|im_end|>",)),
    # The demo: the model's own chat template, with the paper's instruction after the question.
    PromptTemplate("chat-boxed", None, user_suffix="\n" + BOXED_INSTRUCTION),
)}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}") from None
