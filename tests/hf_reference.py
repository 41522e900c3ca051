"""HF transformers as the independent reference for the model-file tests (tests/models/):
logits of one forward call, and greedy decoding as a loop of forward calls on HF's own cache."""

from __future__ import annotations

import numpy as np


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding as a loop of HF forward calls on its own KV cache. Not generate(): for
    Phi-3 longrope, prepare_inputs_for_generation drops the cache once the sequence crosses
    original_max_position_embeddings and recomputes every key with the long factors; the
    engine, like a forward loop, keeps the cached keys as they were rotated."""
    import torch

    tokens, cache, ids = [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            out = model(ids, cache=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens
