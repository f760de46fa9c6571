"""In-process Hugging Face teacher: batched, memory-bounded scoring (``crossopd.models.scoring``).

Gemma's 262k vocabulary makes a naive 1k-token log-softmax about 1 GB; blocks of rows through the
output head keep it to ``logits_budget_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from crossopd.models.scoring import check_head, score_sequences
from crossopd.teachers import TeacherError, check_spans


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class HFTeacher:
    def __init__(
        self,
        model: Any,
        max_batch_tokens: int = 8192,
        logits_budget_bytes: int = 64 * 2**20,
        pad_id: int = 0,
    ) -> None:
        self.model = model.eval()
        self.max_batch_tokens = max_batch_tokens
        self.logits_budget_bytes = logits_budget_bytes
        self.pad_id = pad_id
        cfg = model.config
        self.max_length = getattr(cfg, "max_position_embeddings", None)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        check_head(self.model)

    @classmethod
    def from_pretrained(cls, src: Any, device: str | None = None, dtype: Any = None,
                        **kwargs: Any) -> HFTeacher:
        from crossopd.models.hub import load_hf_model

        return cls(load_hf_model(src, dtype=dtype, device=device or default_device()), **kwargs)

    @torch.inference_mode()
    def score(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        check_spans(sequences, spans)
        out = score_sequences(
            self.model, sequences, spans, max_batch_tokens=self.max_batch_tokens,
            logits_budget_bytes=self.logits_budget_bytes, pad_id=self.pad_id,
        )
        result = [x.double().cpu().numpy() for x in out]
        for i, lp in enumerate(result):
            bad = np.flatnonzero(~np.isfinite(lp))
            if bad.size:  # as the HTTP client does: a broken teacher is an error, not "unaligned"
                raise TeacherError(
                    f"teacher returned non-finite log-probs for sequence {i} at positions "
                    f"{(bad + spans[i][0]).tolist()[:5]} (of {len(sequences[i])} tokens): check "
                    "the teacher's weights and dtype"
                )
        return result
