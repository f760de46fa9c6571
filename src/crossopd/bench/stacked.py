"""S small GPT-2 students of one shape as one stacked model, for training the students of a
``bench learn`` arm together: their parameters stacked on a leading student axis, a functional
forward pass over all of them at once (batched matmuls: one call per layer for every student,
where S separate models pay Python and kernel-launch overhead S times), a sampler on it in place
of Hugging Face ``generate``, and AdamW with per-student gradient clipping.

Each student stays the model it would be alone: its slice of every tensor only ever meets its
own slice (no reduction runs across the student axis), its random draws come from its own
generator, and a student that has finished its budget is frozen. ``tests/test_stacked.py``
checks the forward against Hugging Face's GPT-2 and a stacked run of 2 seeds against the 2
single runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Stack:
    """Stacked GPT-2 parameters (Hugging Face names without ``transformer.``, each
    ``[S, *shape]``) and the shape constants the forward pass needs."""

    params: dict[str, torch.Tensor]
    n_layer: int
    n_head: int
    eps: float

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @classmethod
    def of(cls, models: Sequence[Any]) -> Stack:
        """Leaf copies of ``models``' parameters (GPT-2, tied embeddings), stacked."""
        cfg = models[0].config
        if cfg.activation_function != "gelu_new" or not cfg.tie_word_embeddings:
            raise ValueError("Stack: a GPT-2 with gelu_new and tied embeddings is expected")
        states = [dict(m.transformer.named_parameters()) for m in models]
        params = {name: torch.stack([s[name].detach() for s in states]).clone()
                  .requires_grad_(True) for name in states[0]}
        return cls(params, cfg.n_layer, cfg.n_head, cfg.layer_norm_epsilon)

    def select(self, idx: list[int]) -> Stack:
        """Students ``idx`` (indexed from these parameters, so gradients reach them)."""
        if idx == list(range(self.size)):
            return self
        return Stack({k: v[idx] for k, v in self.params.items()}, self.n_layer, self.n_head,
                     self.eps)


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    # w, b: [S, D], broadcast over every axis between the student axis and the features
    shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (w.shape[1],)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * w.view(shape) + b.view(shape)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # GPT-2's Conv1D: x @ W + b, W: [S, in, out]; x: [S, N, T, in]. One product per student,
    # not one batched product: the weight gradient sums over N*T rows, and a batched kernel
    # orders that sum by how many students share the call (observed: 1e-7 apart at S=4), so
    # a student would not be the model it is alone
    s, n, t, _ = x.shape
    rows = x.reshape(s, n * t, -1).unbind(0)
    return torch.stack([torch.addmm(bk, xk, wk) for xk, wk, bk in
                        zip(rows, w.unbind(0), b.unbind(0))]).view(s, n, t, -1)


def _embed(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # per student, for the reason of _linear (an embedding's gradient sums repeated ids)
    return torch.stack([F.embedding(i, tk) for i, tk in zip(ids.unbind(0), table.unbind(0))])


# per layer, the keys and values ``[S, N, heads, T, head_dim]`` of every position so far
Past = list[tuple[torch.Tensor, torch.Tensor]]


def forward_block(st: Stack, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                  past: Past | None = None) -> tuple[torch.Tensor, Past]:
    """Hidden states ``[S, N, t, D]`` of a block of ``t`` new tokens ``ids`` at ``positions``
    (both ``[S, N, t]``), attending causally to themselves and to every earlier position in
    ``past``; ``key_mask`` ``[S, N, T_past + t]`` is 1 on real tokens. Returns the states and
    the keys and values with the block's appended (a sampler's cache)."""
    p, (s, n, t) = st.params, ids.shape
    x = _embed(p["wte.weight"], ids) + _embed(p["wpe.weight"], positions)
    d = x.shape[-1]
    hd = d // st.n_head
    t_past = past[0][0].shape[-2] if past else 0
    causal = torch.arange(t_past + t)[None, :] <= (t_past + torch.arange(t))[:, None]
    allowed = causal & key_mask.bool()[:, :, None, None, :]  # [S, N, 1, t, T_past + t]
    new_past: Past = []
    for i in range(st.n_layer):
        h = _ln(x, p[f"h.{i}.ln_1.weight"], p[f"h.{i}.ln_1.bias"], st.eps)
        qkv = _linear(h, p[f"h.{i}.attn.c_attn.weight"], p[f"h.{i}.attn.c_attn.bias"])
        q, k, v = (z.view(s, n, t, st.n_head, hd).transpose(2, 3) for z in qkv.split(d, -1))
        if past:
            k, v = torch.cat([past[i][0], k], -2), torch.cat([past[i][1], v], -2)
        new_past.append((k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        a = torch.matmul(scores.softmax(-1), v).transpose(2, 3).reshape(s, n, t, d)
        x = x + _linear(a, p[f"h.{i}.attn.c_proj.weight"], p[f"h.{i}.attn.c_proj.bias"])
        h = _ln(x, p[f"h.{i}.ln_2.weight"], p[f"h.{i}.ln_2.bias"], st.eps)
        h = F.gelu(_linear(h, p[f"h.{i}.mlp.c_fc.weight"], p[f"h.{i}.mlp.c_fc.bias"]),
                   approximate="tanh")
        x = x + _linear(h, p[f"h.{i}.mlp.c_proj.weight"], p[f"h.{i}.mlp.c_proj.bias"])
    return _ln(x, p["ln_f.weight"], p["ln_f.bias"], st.eps), new_past


def hidden_states(st: Stack, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states ``[S, N, T, D]`` of every student's ``ids`` ``[S, N, T]``, with
    ``mask`` 1 on real tokens (padding on either side; positions count real tokens, as
    ``generate`` numbers a left-padded row)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return forward_block(st, ids, positions, mask)[0]


def logits(st: Stack, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits from hidden states ``[S, ..., D]`` (the head is the tied embedding)."""
    w = st.params["wte.weight"]  # [S, V, D]; per student, for the reason of _linear
    flat = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
    out = torch.stack([hk @ wk.T for hk, wk in zip(flat.unbind(0), w.unbind(0))])
    return out.view(*hidden.shape[:-1], w.shape[1])


def pad_rows(rows: Sequence[Sequence[Sequence[int]]], pad_id: int, left: bool,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per student a list of N id lists -> (ids, mask) ``[S, N, T]``, padded on one side to
    ``width`` (default: the longest row). A fixed width keeps a student's arithmetic the same
    whatever the other students' rows are (a longer padded row is summed in another order)."""
    longest = max((len(r) for student in rows for r in student), default=0)
    if width is None or width < longest:
        width = longest
    ids = torch.full((len(rows), len(rows[0]), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, student in enumerate(rows):
        for j, r in enumerate(student):
            lo = width - len(r) if left else 0
            ids[k, j, lo: lo + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[k, j, lo: lo + len(r)] = 1
    return ids, mask


@torch.no_grad()
def sample(st: Stack, prompts: Sequence[Sequence[Sequence[int]]], max_new_tokens: int,
           stop_ids: Sequence[int], pad_id: int,
           generators: Sequence[torch.Generator] | None = None, temperature: float = 1.0,
           width: int | None = None) -> list[list[np.ndarray]]:
    """Per student, a continuation of each of its prompts, cut after its first stop id:
    sampled from ``softmax(logits / temperature)`` with student k's draws from
    ``generators[k]`` (``max_new_tokens`` uniforms per prompt, drawn up front, so a student's
    draws do not depend on when the others finish), or greedy without ``generators``.
    ``width``: the prompts' padded width (``pad_rows``)."""
    ids, mask = pad_rows(prompts, pad_id, left=True, width=width)
    s, n, _ = ids.shape
    done = torch.zeros(s, n, dtype=torch.bool)
    stops = torch.as_tensor(sorted(stop_ids), dtype=torch.long)
    if generators is not None:
        uniforms = torch.stack([torch.rand(max_new_tokens, n, generator=g, dtype=torch.float64)
                                for g in generators])  # [S, steps, N]
    new = []
    h, past = forward_block(st, ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
    for step in range(max_new_tokens):
        last = logits(st, h[:, :, -1])  # [S, N, V]
        if generators is None:
            tok = last.argmax(-1)
        else:
            probs = (last.double() / temperature).softmax(-1)
            cdf = probs.cumsum(-1)
            u = uniforms[:, step] * cdf[..., -1]
            tok = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1)
            tok = tok.clamp(max=probs.shape[-1] - 1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        new.append(tok)
        position = mask.sum(-1, keepdim=True)  # real tokens before this one
        mask = torch.cat([mask, (~done).long().unsqueeze(-1)], -1)
        done |= torch.isin(tok, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        h, past = forward_block(st, tok.unsqueeze(-1), position, mask, past)
    out = torch.stack(new, -1).numpy() if new else np.zeros((s, n, 0), dtype=np.int64)
    result = []
    for k in range(s):
        rows = []
        for j in range(n):
            row = out[k, j]
            ends = np.flatnonzero(np.isin(row, stops.numpy()))
            rows.append(row[: ends[0] + 1] if ends.size else row)
        result.append(rows)
    return result


def sequence_logprobs(st: Stack, sequences: Sequence[Sequence[Sequence[int]]],
                      spans: Sequence[Sequence[tuple[int, int]]], pad_id: int,
                      temperature: float = 1.0, width: int | None = None
                      ) -> list[list[torch.Tensor]]:
    """Per student and sequence, float64 log-probs of the tokens in its span (right padding to
    ``width``, as ``pad_rows``; differentiable in the stacked parameters)."""
    ids, mask = pad_rows(sequences, pad_id, left=False, width=width)
    lp = (logits(st, hidden_states(st, ids, mask)).double() / temperature).log_softmax(-1)
    # position p is predicted from position p - 1
    picked = lp[:, :, :-1].gather(-1, ids[:, :, 1:].unsqueeze(-1)).squeeze(-1)
    return [[picked[k, j, a - 1: b - 1] for j, (a, b) in enumerate(spans[k])]
            for k in range(len(sequences))]


class StackedAdamW:
    """``torch.optim.AdamW`` (its defaults: betas 0.9 / 0.999, eps 1e-8, weight decay 0.01) on
    stacked parameters, each student with its own step count, its own gradient clipping by
    global norm (as ``clip_grad_norm_`` on its model alone) and a flag that freezes it."""

    def __init__(self, st: Stack, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, grad_clip: float = 1.0) -> None:
        self.st, self.lr, self.betas, self.eps = st, lr, betas, eps
        self.wd, self.grad_clip = weight_decay, grad_clip
        self.m = {k: torch.zeros_like(p) for k, p in st.params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in st.params.items()}
        self.steps = torch.zeros(st.size, dtype=torch.float64)

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> torch.Tensor:
        """One update of the ``active`` students (bool ``[S]``); returns every student's
        gradient norm before clipping. Gradients are cleared."""
        grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p))
                 for k, p in self.st.params.items()}
        # float64 sums: a float32 row sum's order can depend on where the row starts in
        # memory, and a one-ulp change of the clip scale would make the student's update
        # depend on its place in the stack
        norm = torch.stack([g.reshape(g.shape[0], -1).double().pow(2).sum(-1)
                            for g in grads.values()]).sum(0).sqrt()
        scale = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0).float()
        self.steps += active.double()
        b1, b2 = self.betas
        t = self.steps.clamp(min=1)
        for k, p in self.st.params.items():
            view = (-1,) + (1,) * (p.dim() - 1)
            on = active.view(view)
            g = grads[k] * scale.view(view)
            m = torch.where(on, b1 * self.m[k] + (1 - b1) * g, self.m[k])
            v = torch.where(on, b2 * self.v[k] + (1 - b2) * g * g, self.v[k])
            self.m[k], self.v[k] = m, v
            c1 = (1 - b1 ** t).to(p.dtype).view(view)
            c2 = (1 - b2 ** t).to(p.dtype).view(view)
            new = p * (1 - self.lr * self.wd) - self.lr * (m / c1) / ((v / c2).sqrt() + self.eps)
            p.copy_(torch.where(on, new, p))
            p.grad = None
        return norm
