"""Batched greedy generation against the definition of greedy decoding: one prompt at a time, the
argmax of a full forward pass over prompt + answer so far, no cache, no padding."""

import pytest
import torch

from core import generation
from core.generation import eos_token_ids, generate_greedy_detailed, shared_prefix_length
from tests.tiny_models import ARCHITECTURES, VOCAB, tiny_model

MAX_NEW = 10


class _Tokenizer:
    """What generation needs of a tokenizer: token i reads as the one character chr(0x100 + i)."""
    pad_token_id = VOCAB - 1

    def __init__(self, eos: int):
        self.eos_token_id = eos

    def __len__(self):
        return VOCAB

    def decode(self, ids) -> str:
        return "".join(chr(0x100 + i) for i in ids)

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


def reference_answer(model, prompt: list[int], eos: set[int], max_new: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt):]


def prompts_of_mixed_lengths(n: int = 6) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB - 1, (2 + 3 * i,), generator=generator).tolist() for i in range(n)]


def eos_ending_some_answers_early(model, prompts) -> int:
    """A token that the answers produce after their first step in some answers and not in others, so
    that rows of one batch end at different steps."""
    answers = [reference_answer(model, p, eos_token_ids(model, _Tokenizer(None)), MAX_NEW)
               for p in prompts]
    for token in range(VOCAB - 1):
        ending = [token in a[1:] and token not in a[:1] for a in answers]
        if any(ending) and not all(ending) and not any(token == a[0] for a in answers):
            return token
    pytest.fail("no token ends some answers early; choose other prompts")


def tiny(architecture: str):
    # Mistral with a sliding window shorter than the longer prompts: its cache keeps the window only.
    return tiny_model(architecture, sliding_window=6 if architecture == "mistral" else None)


def prompts_with_a_shared_prefix(n: int = 6, prefix: int = 5) -> list[list[int]]:
    """A chat template's shape: every prompt starts with the same tokens (a system turn)."""
    shared = torch.randint(0, VOCAB - 1, (prefix,), generator=torch.Generator().manual_seed(4)).tolist()
    return [shared + rest for rest in prompts_of_mixed_lengths(n)]


@pytest.mark.parametrize("prefill_tokens", [generation.PREFILL_TOKENS, 12], ids=["one-pass", "sliced"])
@pytest.mark.parametrize("prompts", [prompts_of_mixed_lengths, prompts_with_a_shared_prefix],
                         ids=["distinct", "shared-prefix"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_batched_greedy_answers_equal_unbatched_uncached_argmax_decoding(architecture, prompts,
                                                                         prefill_tokens, monkeypatch):
    """Also with the prompts' prefill in slices of 2 positions (12 tokens over 6 prompts)."""
    monkeypatch.setattr(generation, "PREFILL_TOKENS", prefill_tokens)
    model = tiny(architecture)
    prompts = prompts()
    eos = eos_ending_some_answers_early(model, prompts)
    tokenizer = _Tokenizer(eos)
    eos_ids = eos_token_ids(model, tokenizer)
    expected = [reference_answer(model, p, eos_ids, MAX_NEW) for p in prompts]
    got = generate_greedy_detailed(model, tokenizer, prompts, MAX_NEW, batch_size=len(prompts))
    for prompt, answer, generated in zip(prompts, expected, got):
        ended = answer[-1] in eos_ids
        assert list(generated.answer_ids) == (answer[:-1] if ended else answer), prompt
        assert generated.finish_reason == ("eos" if ended else "length")
    assert {g.finish_reason for g in got} == {"eos", "length"}, "rows should end at different steps"


def test_the_shared_prefix_stops_short_of_each_prompts_last_token():
    assert shared_prefix_length(prompts_with_a_shared_prefix()) == 5
    assert shared_prefix_length(prompts_of_mixed_lengths()) == 0
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix_length([[7], [7, 8]]) == 0


def test_a_models_generation_config_does_not_change_greedy_answers():
    """`generate` merges a model's generation_config (here a repetition penalty) into greedy
    decoding; the project's greedy answers are the argmax alone, as the vLLM backend's are."""
    model = tiny("llama")
    prompts = prompts_of_mixed_lengths(3)
    plain = generate_greedy_detailed(model, _Tokenizer(VOCAB - 1), prompts, MAX_NEW, batch_size=3)
    model.generation_config.repetition_penalty = 5.0
    penalised = generate_greedy_detailed(model, _Tokenizer(VOCAB - 1), prompts, MAX_NEW, batch_size=3)
    assert penalised == plain
    eos = eos_token_ids(model, _Tokenizer(VOCAB - 1))
    assert [list(g.answer_ids) for g in plain] == [
        [t for t in reference_answer(model, p, eos, MAX_NEW) if t not in eos] for p in prompts]


def test_an_answer_stops_being_generated_at_its_stop_string():
    """Generation ends the step a stop string appears: the answer is cut before it, and the model
    runs no further step (the prefill, then one step per answer token)."""
    model = tiny("llama")
    prompt = prompts_of_mixed_lengths(1)[0]
    tokenizer = _Tokenizer(VOCAB - 1)
    full = reference_answer(model, prompt, {VOCAB - 1}, MAX_NEW)
    k = next(k for k in range(2, len(full)) if full[k] not in full[:k] and full[k] != VOCAB - 1)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    [generation] = generate_greedy_detailed(model, tokenizer, [prompt], MAX_NEW,
                                            stop_strings=(tokenizer.decode(full[k - 1:k + 1]),))
    assert list(generation.answer_ids) == full[:k - 1] and generation.finish_reason == "stop"
    assert len(calls) == 1 + k
