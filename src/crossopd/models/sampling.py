"""Sampling from the student with Hugging Face ``generate`` (KV cache, batched, left padding).

The sampled ids are kept exactly as sampled, cut after the first end-of-turn token; they are
never decoded and re-tokenized. The policy is ``softmax(logits / temperature)``, optionally cut
to its top-p nucleus, and nothing else: every setting of the model's own generation config that
would change the distribution (repetition penalty, top-k, n-gram bans, ...) is neutralised, with
a warning, because the reverse-KL signal and the log-probs the update uses are defined under
the policy that sampled.
"""

from __future__ import annotations

import copy
import warnings
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


# generation-config fields that change the sampled distribution, and their neutral values
NEUTRAL_SAMPLING = {
    "top_k": 0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None,
    "renormalize_logits": False, "guidance_scale": None, "watermarking_config": None,
    "diversity_penalty": 0.0, "num_beams": 1, "num_beam_groups": 1, "low_memory": None,
}


def sampling_config(model: Any, temperature: float, top_p: float, **fixed: Any) -> Any:
    """A copy of the model's generation config that samples from ``softmax(logits / T)`` (top-p
    nucleus when ``top_p < 1``) and nothing else. Warns about each setting it neutralised."""
    gc = copy.deepcopy(model.generation_config)
    changed = []
    for key, neutral in NEUTRAL_SAMPLING.items():
        value = getattr(gc, key, None)
        if value is not None and value != neutral:  # None: unset, the library default
            changed.append(f"{key}={value!r}")
        setattr(gc, key, neutral)
    if changed:
        warnings.warn("the student's generation config would change the sampled distribution; "
                      f"ignored for rollouts: {', '.join(changed)}", UserWarning, stacklevel=2)
    gc.do_sample, gc.temperature, gc.top_p = True, temperature, top_p
    for key, value in fixed.items():  # max_new_tokens, eos_token_id, pad_token_id
        setattr(gc, key, value)
    return gc


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
    greedy: bool = False,
) -> list[np.ndarray]:
    """Continuations of ``prompts``, each cut after its first stop id; ``greedy`` takes the
    most likely token instead of sampling (evaluation, not rollouts to train on)."""
    device = next(model.parameters()).device
    config = sampling_config(model, temperature, top_p, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(stop_ids), pad_token_id=pad_id)
    config.do_sample = not greedy
    out: list[np.ndarray] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
        )
        for row in gen[:, width:].cpu().numpy():
            hits = np.flatnonzero(np.isin(row, list(stop_ids)))
            out.append(row[: hits[0] + 1] if hits.size else row)
    return out
