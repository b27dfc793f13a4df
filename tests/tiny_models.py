"""Tiny random causal LMs of every supported architecture, built in the test (no download)."""

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 64


def tiny_model(architecture: str, n_layers: int = 2, hidden: int = 32, dtype=torch.float64, seed: int = 0,
               sliding_window: int | None = None):
    """A random model with frozen weights in eval mode. Init is wider than HF's default so scores are
    well above rounding noise. `sliding_window` applies to Mistral."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif architecture == "qwen2":
        # Qwen2: q/k/v biases; tied embeddings as in the small Qwen2 models.
        model = Qwen2ForCausalLM(Qwen2Config(**{**common, "tie_word_embeddings": True}))
    elif architecture == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**common, "sliding_window": sliding_window}))
    elif architecture == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=n_layers, n_head=4,
                                           n_positions=128, initializer_range=0.2,
                                           bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(architecture)
    model.requires_grad_(False)
    return model.to(dtype).eval()


ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2")


def random_samples(n: int, seed: int = 1, min_prompt: int = 3, max_prompt: int = 9,
                   min_answer: int = 2, max_answer: int = 12):
    """Samples of varied lengths, so a batch needs padding."""
    from core.eap import Sample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        p = int(torch.randint(min_prompt, max_prompt + 1, (1,), generator=g))
        a = int(torch.randint(min_answer, max_answer + 1, (1,), generator=g))
        t_cut = int(torch.randint(1, a + 1, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (p + a,), generator=g).tolist()
        samples.append(Sample(f"s{i}", tuple(ids[:p]), tuple(ids[p:]), t_cut))
    return samples
