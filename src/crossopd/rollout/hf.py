"""Sampling from the student with Hugging Face ``generate`` (KV cache, batched, left padding).

The sampled ids are kept exactly as sampled, cut after the first end-of-turn token; they are
never decoded and re-tokenized. Sampling uses the model's full distribution (temperature and
top-p as configured, no top-k), since the reverse-KL signal is defined under that policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with every prompt right-aligned, as ``generate`` needs."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: set[int],
    pad_id: int,
    batch_size: int = 16,
) -> list[np.ndarray]:
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
            temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_ids), pad_token_id=pad_id,
        )
        for row in gen[:, width:].cpu().numpy():
            hits = np.flatnonzero(np.isin(row, list(stop_ids)))
            out.append(row[: hits[0] + 1] if hits.size else row)
    return out
