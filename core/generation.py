"""Batched greedy generation (docs/method.md section 5).

Prompts arrive as token ids (rendered once by core.templates) and answers leave as token ids, exactly
as generated, so attribution later runs on the very sequences the model produced, never re-tokenised.
An answer ends before the first EOS token, or before the first stop string; the EOS token and the
stop string's tokens are not part of the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from core.vocab import DType, FinishReason

# Generated tokens decoded per stop-string check.
STOP_WINDOW = 24
# Prompt tokens (rows x positions) per forward pass of the prompts' prefill.
PREFILL_TOKENS = 2048


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


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """The tokens every prompt of a batch starts with (a chat template's system turn), short of each
    prompt's last token, whose logits start the answer."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _growing_cache(model) -> DynamicCache:
    """A DynamicCache whose full-attention layers are GrowingLayer (sliding-window layers, which drop
    old positions, stay as they are)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in buffers with room to spare, doubled
    when full, so a decoding step writes its one position where DynamicLayer copies the whole cache
    into a new tensor (those copies took 29% of 40 decoding steps of the demo's 160 prompts on 2 CPU
    cores, under torch.profiler). `keys` and `values` are views of the filled part."""

    is_croppable = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            capacity = max(end, 2 * length)
            self.key_buffer = _grown(self.key_buffer, key_states, length, capacity)
            self.value_buffer = _grown(self.value_buffer, value_states, length, capacity)
        self.key_buffer[:, :, length:end] = key_states
        self.value_buffer[:, :, length:end] = value_states
        self._set_buffers(self.key_buffer, self.value_buffer, end)
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        length = self.get_seq_length()
        if length > 0:
            self._set_buffers(self.key_buffer.repeat_interleave(repeats, dim=0),
                              self.value_buffer.repeat_interleave(repeats, dim=0), length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows `indices` (ascending), moved to the front of the same buffers: only the
        filled part is copied, and the room to grow stays."""
        length = self.get_seq_length()
        if length > 0:
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[:len(indices), :, :length] = buffer[indices, :, :length]
            self._set_buffers(self.key_buffer[:len(indices)], self.value_buffer[:len(indices)], length)

    def _set_buffers(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """The buffers, and `keys` and `values` as views of their first `length` positions (the
        cache's length, which get_seq_length reads off `keys`)."""
        self.key_buffer, self.value_buffer = keys, values
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]


def _grown(buffer: torch.Tensor | None, states: torch.Tensor, length: int,
           capacity: int) -> torch.Tensor:
    """A buffer of `capacity` positions for rows shaped like `states`, holding the first `length`
    positions of `buffer`."""
    grown = states.new_empty((*states.shape[:2], capacity, states.shape[-1]))
    if buffer is not None:
        grown[:, :, :length] = buffer[:, :, :length]
    return grown


def _greedy_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: set[int],
                  pad_id: int, stopped: Callable[[list[int]], bool] | None) -> list[list[int]]:
    """Greedy continuations of `prompts`, each through its first EOS token, the step at which
    `stopped` holds, or max_new_tokens.

    Decoding is the argmax of the logits and nothing else: a model's generation_config (sampling,
    repetition penalty), which `generate` would merge in, does not apply. The prompts' shared prefix
    (a chat template's system turn) is computed once and its cache copied to every row; each row's
    rest is padded on its left, so padding sits between the prefix and the rest, masked, and
    positions count a row's own tokens. A finished row leaves the batch and the KV cache at once, so
    decoding costs the tokens generated, not the batch's size times its longest answer as with
    `generate` (benchmarks/bench_demo_throughput.py).
    """
    device = next(model.parameters()).device
    cache = _growing_cache(model)
    # A sliding window counts cache positions, padding included: padding after the prefix would
    # push real tokens out of it, so such models pad on the left only.
    full_attention = all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    shared = shared_prefix_length(prompts) if len(prompts) > 1 and full_attention else 0
    rests = [p[shared:] for p in prompts]
    width = max(len(r) for r in rests)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), shared + width), dtype=torch.long)
    attention[:, :shared] = 1
    for row, ids in enumerate(rests):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention[row, shared + width - len(ids):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    eos_ids = torch.tensor(sorted(eos), device=device)
    answers: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the answers still being generated, in batch order
    with torch.no_grad():
        if shared:
            model.base_model(input_ids=input_ids.new_tensor([list(prompts[0][:shared])]),
                             position_ids=position[:1, :shared], cache=cache, use_cache=True)
            cache.batch_repeat_interleave(len(prompts))
        # The rests in slices of about PREFILL_TOKENS tokens (whole prompts' activations outgrow the
        # CPU's caches: 1.35x slower for the demo's 160 prompts at once than 16 at a time).
        positions_per_pass = max(1, PREFILL_TOKENS // len(prompts))
        for start in range(0, width, positions_per_pass):
            stop = min(start + positions_per_pass, width)
            # The last position's logits, by index: its copy is contiguous, where the slice that
            # logits_to_keep=1 takes sends the LM head down a batched path (1.03 s against 0.12 s
            # for the demo's 160 prompts).
            last = torch.tensor([stop - start - 1], device=device)
            logits = model(input_ids=input_ids[:, start:stop],
                           attention_mask=attention[:, :shared + stop],
                           position_ids=position[:, shared + start:shared + stop], cache=cache,
                           use_cache=True, logits_to_keep=last).logits
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
