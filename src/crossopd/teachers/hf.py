"""In-process Hugging Face teacher: batched, memory-bounded scoring.

The full ``[batch, length, vocab]`` log-softmax is never built: the decoder's hidden states for
the scored positions go through the output head a few rows at a time, sized so one block of
logits stays under ``logits_budget_bytes`` (Gemma's 262k vocabulary makes a naive 1k-token
log-softmax about 1 GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from crossopd.teachers import check_spans


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
        self.softcap = getattr(cfg, "final_logit_softcapping", None)

    @classmethod
    def from_pretrained(cls, src: Any, device: str | None = None, dtype: Any = None,
                        **kwargs: Any) -> HFTeacher:
        from crossopd.loaders import load_hf_model

        return cls(load_hf_model(src, dtype=dtype, device=device or default_device()), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def score(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        check_spans(sequences, spans)
        out: list[np.ndarray | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        batch: list[int] = []
        for i in order:  # similar lengths together: little padding
            longest = max(len(sequences[i]), *(len(sequences[j]) for j in batch)) if batch else \
                len(sequences[i])
            if batch and longest * (len(batch) + 1) > self.max_batch_tokens:
                self._score_batch(sequences, spans, batch, out)
                batch = []
            batch.append(i)
        if batch:
            self._score_batch(sequences, spans, batch, out)
        return out  # type: ignore[return-value]

    def _score_batch(self, sequences, spans, batch: list[int], out: list) -> None:
        length = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding keeps positions 0..n-1 for every row
            ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i], dtype=torch.long)
            mask[row, : len(sequences[i])] = 1
        hidden = self.model.get_decoder()(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state
        rows, cols, targets = [], [], []
        for row, i in enumerate(batch):
            start, end = spans[i]
            pos = torch.arange(start, end)
            rows.append(torch.full_like(pos, row))
            cols.append(pos - 1)  # position p is predicted from the hidden state at p - 1
            targets.append(ids[row, start:end])
        h = hidden[torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)]
        logps = self.token_logprobs(h, torch.cat(targets).to(self.device))
        offset = 0
        for i in batch:
            n = spans[i][1] - spans[i][0]
            out[i] = logps[offset : offset + n]
            offset += n

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """log softmax(head(hidden))[target] for each row, a block of rows at a time."""
        head = self.model.get_output_embeddings()
        rows = max(1, self.logits_budget_bytes // (4 * self.vocab_size))
        result = torch.empty(hidden.shape[0], dtype=torch.float64)
        for lo in range(0, hidden.shape[0], rows):
            logits = head(hidden[lo : lo + rows]).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            tgt = targets[lo : lo + rows]
            picked = logits.gather(1, tgt[:, None])[:, 0]
            result[lo : lo + rows] = (picked - torch.logsumexp(logits, dim=-1)).double().cpu()
        return result.numpy()
