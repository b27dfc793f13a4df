"""Batched greedy generation (docs/method.md section 5).

Prompts arrive as token ids (rendered once by core.templates) and answers leave as token ids, exactly
as generated, so attribution later runs on the very sequences the model produced, never re-tokenised.
An answer ends before the first EOS token, or before the first stop string; the EOS token and the
stop string's tokens are not part of the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from core.vocab import DType, FinishReason

# Generated tokens decoded per stop-string check.
STOP_WINDOW = 24


@dataclasses.dataclass(frozen=True)
class Generation:
    answer_ids: tuple[int, ...]
    finish_reason: FinishReason


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a turn: the model's generation config may list several."""
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    return ids


def generate_greedy(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_strings: Sequence[str] = (), batch_size: int = 8,
                    progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Greedy answers to `prompt_ids`, as token ids, in the order of the prompts."""
    return [list(g.answer_ids) for g in generate_greedy_detailed(
        model, tokenizer, prompt_ids, max_new_tokens, stop_strings, batch_size, progress)]


def generate_greedy_detailed(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                             max_new_tokens: int, stop_strings: Sequence[str] = (),
                             batch_size: int = 8,
                             progress: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Like `generate_greedy`, with the reason each answer ended.

    Prompts are left-padded and batched longest first (similar lengths share a batch, so little
    compute goes to padding); `progress(done, total)` is called after each batch.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("an empty prompt was given; every prompt needs at least one token")
    eos = eos_token_ids(model, tokenizer)
    if not eos:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS "
                         "token; set tokenizer.eos_token before generating")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)

    completing = _stop_completing_tokens(tokenizer, stop_strings) if stop_strings else set()

    def stopped(answer: list[int]) -> bool:
        # Only a token that can complete a stop string is worth decoding for. The window holds any
        # stop string of a few tokens; finish_answer cuts exactly afterwards.
        if answer[-1] not in completing:
            return False
        text = tokenizer.decode(answer[-STOP_WINDOW:])
        return any(s in text for s in stop_strings)

    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[Generation | None] = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        answers = _greedy_batch(model, [prompt_ids[i] for i in batch], max_new_tokens, eos, pad_id,
                                stopped if stop_strings else None)
        for i, answer in zip(batch, answers):
            results[i] = finish_answer(answer, tokenizer, eos, stop_strings)
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return results  # type: ignore[return-value]


def _stop_completing_tokens(tokenizer, stop_strings: Sequence[str]) -> set[int]:
    """The token ids after which a stop string can newly appear in an answer's text: those whose
    own text holds a stop string's last character, or part of a character (byte-level tokens). A
    token missing here only delays the early stop; the answer is cut by `finish_answer` anyway."""
    last_characters = {s[-1] for s in stop_strings}
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return {i for i, text in enumerate(texts)
            if "\ufffd" in text or any(c in text for c in last_characters)}


def _greedy_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: set[int],
                  pad_id: int, stopped: Callable[[list[int]], bool] | None) -> list[list[int]]:
    """Greedy continuations of `prompts`, each through its first EOS token, the step at which
    `stopped` holds, or max_new_tokens.

    Decoding is the argmax of the logits and nothing else: a model's generation_config (sampling,
    repetition penalty), which `generate` would merge in, does not apply. A finished row leaves the
    batch and the KV cache at once, so decoding costs the tokens generated, not the batch's size
    times its longest answer as with `generate` (benchmarks/bench_demo_throughput.py).
    """
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention[row, width - len(ids):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    # Left padding: a row's positions count its own tokens, as `generate` counts them.
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    eos_ids = torch.tensor(sorted(eos), device=device)
    cache = DynamicCache(config=model.config)
    answers: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the answers still being generated, in batch order
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position,
                       cache=cache, use_cache=True, logits_to_keep=1).logits
        position = position[:, -1:]
        for step in range(max_new_tokens):
            tokens = logits[:, -1].argmax(-1)
            for row, token in zip(rows, tokens.tolist()):
                answers[row].append(token)
            going = ~torch.isin(tokens, eos_ids)
            if stopped is not None:
                going &= torch.tensor([not stopped(answers[row]) for row in rows], device=device)
            if step == max_new_tokens - 1 or not going.any():
                break
            if not going.all():
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                attention, tokens, position = attention[keep], tokens[keep], position[keep]
                rows = [rows[k] for k in keep.tolist()]
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
            position = position + 1
            logits = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=position,
                           cache=cache, use_cache=True).logits
    return answers


def finish_answer(new_ids: Sequence[int], tokenizer, eos: set[int],
                  stop_strings: Sequence[str] = ()) -> Generation:
    """Cut generated ids at the first EOS or stop string; the marker itself is dropped."""
    ids = list(new_ids)
    reason: FinishReason = "length"
    for index, token in enumerate(ids):
        if token in eos:
            ids, reason = ids[:index], "eos"
            break
    if stop_strings:
        text = tokenizer.decode(ids)
        hits = [pos for pos in (text.find(s) for s in stop_strings) if pos >= 0]
        if hits:
            ids, reason = ids[:_tokens_before(ids, tokenizer, min(hits))], "stop"
    return Generation(tuple(ids), reason)


def _tokens_before(ids: list[int], tokenizer, char_pos: int) -> int:
    """The largest k such that the text of ids[:k] ends at or before character `char_pos`.

    Decoded length grows with the prefix, so a binary search needs O(log n) decodes.
    """
    low, high = 0, len(ids)
    while low < high:
        mid = (low + high + 1) // 2
        if len(tokenizer.decode(ids[:mid])) <= char_pos:
            low = mid
        else:
            high = mid - 1
    return low


def generate_vllm(spec, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                  stop_strings: Sequence[str] = (), dtype: DType = "bfloat16") -> list[Generation]:
    """The same answers with vLLM (greedy), cut at EOS or a stop string like the HF backend.
    `spec` is a core.models.ModelSpec; an adapter is served as a LoRA on its base."""
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError:
        raise ValueError("gen_backend=vllm was asked for but vLLM is not installed; install it "
                         "(pip install vllm) or use --gen-backend hf") from None
    lora = None
    model_spec = spec
    if spec.kind == "adapter":
        from vllm.lora.request import LoRARequest

        model_spec, lora = spec.base, LoRARequest("adapter", 1, spec.path)
    llm = vllm.LLM(model=model_spec.path, revision=model_spec.revision, dtype=dtype,
                   tokenizer=spec.tokenizer_source(), trust_remote_code=False,
                   enable_lora=lora is not None, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                 stop=list(stop_strings) or None, include_stop_str_in_output=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                           lora_request=lora)
    eos = {tokenizer.eos_token_id} - {None}
    try:
        from transformers import GenerationConfig

        configured = GenerationConfig.from_pretrained(model_spec.path).eos_token_id
        eos.update([configured] if isinstance(configured, int) else configured or [])
    except OSError:
        pass  # no generation_config.json: the tokenizer's EOS is the only one
    return [finish_answer(list(o.outputs[0].token_ids), tokenizer, eos, stop_strings)
            for o in outputs]
