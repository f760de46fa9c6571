"""Memory-bounded log-probs of realised tokens under a causal LM (teacher scoring and the
student's own log-probs in training).

The full ``[batch, length, vocab]`` log-softmax is never built: the decoder's hidden states for
the scored positions go through the output head a block of rows at a time, sized so one block of
logits stays under ``logits_budget_bytes``. With ``grad=True`` each block is checkpointed, so the
backward pass recomputes its logits instead of keeping them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def _block_logprobs(head: Any, scale: float, softcap: float | None, temperature: float,
                    h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def head_transform(model: Any) -> tuple[float, float | None]:
    """(multiplier, soft-cap) the model's own forward applies to ``head(hidden)``: Cohere's
    ``logit_scale``, Granite's ``1 / logits_scaling``, Gemma's final soft-capping. ``check_head``
    refuses models whose head does something else."""
    cfg = model.config
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    scale /= float(getattr(cfg, "logits_scaling", None) or 1.0)
    return scale, getattr(cfg, "final_logit_softcapping", None)


def head_size(head: Any) -> int:
    """The output layer's vocabulary size. The layer's own size, not its weight's: under ZeRO-3
    a weight outside its layer's forward is an empty shard (the layer's hooks gather it when it
    runs)."""
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


def head_logprobs(model: Any, hidden: torch.Tensor, targets: torch.Tensor,
                  logits_budget_bytes: int, grad: bool = False,
                  temperature: float = 1.0) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[target] for each row of ``hidden`` ([n, d]), in
    blocks."""
    head = model.get_output_embeddings()
    vocab = head_size(head)
    scale, softcap = head_transform(model)
    rows = max(1, logits_budget_bytes // (4 * vocab))
    parts = []
    for lo in range(0, hidden.shape[0], rows):
        h, t = hidden[lo : lo + rows], targets[lo : lo + rows]
        if grad:
            parts.append(checkpoint(_block_logprobs, head, scale, softcap, temperature, h, t,
                                    use_reentrant=False))
        else:
            parts.append(_block_logprobs(head, scale, softcap, temperature, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so each padded batch (rows x longest row) stays within ``max_tokens``;
    similar lengths go together so there is little padding. A row longer than the budget gets
    a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:  # ascending, so lengths[i] is the width of the batch it joins
        if cur and lengths[i] * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def score_sequences(
    model: Any,
    sequences: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    *,
    max_batch_tokens: int = 8192,
    logits_budget_bytes: int = 64 * 2**20,
    pad_id: int = 0,
    grad: bool = False,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Per sequence, float32 log-probs of ``ids[p]`` given ``ids[:p]`` for p in its span, under
    the distribution ``softmax(logits / temperature)`` (the one a rollout sampled from).

    Sequences are batched by length (right padding, so positions are 0..n-1 in every row)."""
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for batch in token_budget_batches([len(s) for s in sequences], max_batch_tokens):
        length = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        rows, cols = [], []
        for r, i in enumerate(batch):
            ids[r, : len(sequences[i])] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            mask[r, : len(sequences[i])] = 1
            start, end = spans[i]
            pos = torch.arange(start, end)
            rows.append(torch.full_like(pos, r))
            cols.append(pos - 1)  # position p is predicted from the hidden state at p - 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        r_idx, c_idx = torch.cat(rows).to(device), torch.cat(cols).to(device)
        logps = head_logprobs(model, hidden[r_idx, c_idx], ids[r_idx, c_idx + 1],
                              logits_budget_bytes, grad=grad, temperature=temperature)
        offset = 0
        for i in batch:
            n = spans[i][1] - spans[i][0]
            out[i] = logps[offset : offset + n]
            offset += n
    return out  # type: ignore[return-value]


@torch.no_grad()
def check_head(model: Any, tolerance: float = 1e-3) -> None:
    """Score a short probe through the decoder + head path and through the model's own forward;
    refuse the model when they differ (an output transformation ``head_transform`` does not
    know would make every log-prob silently wrong)."""
    vocab = head_size(model.get_output_embeddings())
    probe = [(7 * k + 3) % vocab for k in range(8)]
    (ours,) = score_sequences(model, [probe], [(1, len(probe))])
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([probe], device=device)).logits[0, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(probe[1:], device=device)[:, None])
    tol = tolerance if next(model.parameters()).dtype == torch.float32 else 50 * tolerance
    # NaN where the forward gives NaN too is consistent (scoring then names the sequence)
    if not torch.isclose(ours, ref[:, 0], rtol=0.0, atol=tol, equal_nan=True).all():
        diff = float((ours - ref[:, 0]).abs().nan_to_num(float("inf")).max())
        raise ValueError(
            f"crossopd cannot reproduce the output head of {type(model).__name__}: its forward's "
            f"log-probs differ from the decoder + head path by {diff:.3g} (an unknown logit "
            "scaling or soft-capping?); such a model would be scored wrongly, so it is refused"
        )
