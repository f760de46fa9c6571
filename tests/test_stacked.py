"""``bench.stacked``: S GPT-2 students as one stacked model. Its forward pass against Hugging
Face's GPT-2, its log-probs against the step library's ``score_sequences``, its greedy sampler
against ``generate``, its optimizer against ``torch.optim.AdamW`` with ``clip_grad_norm_`` on
each model alone, and an OPD arm of 2 seeds trained together against the 2 seeds alone."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from crossopd.bench.learn import PRESETS, load_models, splits
from crossopd.bench.learn_arms import run_opd, run_opd_seeds
from crossopd.bench.learn_task import generate_texts, new_model
from crossopd.bench.stacked import (
    Stack,
    StackedAdamW,
    hidden_states,
    logits,
    pad_rows,
    sample,
    sequence_logprobs,
)
from crossopd.models.scoring import score_sequences


@pytest.fixture(scope="module")
def pair0():
    pairs, _, _ = load_models(PRESETS["quick"], progress=lambda m: None)
    return pairs[0]


def _students(n: int, width: int = 32, layers: int = 2):
    return [new_model(50, seed, width, layers).eval() for seed in range(n)]


@pytest.mark.parametrize("left", [False, True])
def test_forward_is_hugging_faces_gpt2(left):
    models = _students(3)
    rng = np.random.default_rng(0)
    rows = [[rng.integers(3, 50, size=rng.integers(2, 9)).tolist() for _ in range(4)]
            for _ in models]
    ids, mask = pad_rows(rows, 0, left=left)
    got = logits(Stack.of(models), hidden_states(Stack.of(models), ids, mask))
    for k, m in enumerate(models):
        pos = (mask[k].cumsum(-1) - 1).clamp(min=0)
        want = m(input_ids=ids[k], attention_mask=mask[k], position_ids=pos).logits
        real = mask[k].bool()
        torch.testing.assert_close(got[k][real], want[real], atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_are_score_sequences():
    models = _students(2)
    rng = np.random.default_rng(1)
    seqs = [[rng.integers(3, 50, size=rng.integers(4, 12)).tolist() for _ in range(3)]
            for _ in models]
    spans = [[(2, len(s)) for s in student] for student in seqs]
    got = sequence_logprobs(Stack.of(models), seqs, spans, pad_id=0, temperature=0.7)
    for k, m in enumerate(models):
        want = score_sequences(m, seqs[k], spans[k], pad_id=0, temperature=0.7)
        for g, w in zip(got[k], want):
            torch.testing.assert_close(g.float(), w, atol=1e-5, rtol=1e-5)


def test_greedy_sampling_is_generate(pair0):
    student, tok = pair0["student"]
    _, _, test = splits(PRESETS["quick"])
    problems = [p for p, _, _ in test[:12]]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in problems]
    got = sample(Stack.of([student]), [ids], 24, [tok.eos_token_id], tok.pad_token_id)[0]
    texts = [tok.decode(r[:-1] if r[-1] == tok.eos_token_id else r, skip_special_tokens=True)
             for r in got]
    assert texts == generate_texts(student, tok, problems, 24, sample=False)


def test_sampling_draws_from_each_students_own_generator():
    models = _students(2)
    prompts = [[[5, 6, 7]] * 4, [[8, 9]] * 4]

    def draw(idx):
        st = Stack.of([models[k] for k in idx])
        return sample(st, [prompts[k] for k in idx], 10, [1], 0,
                      [torch.Generator().manual_seed(k) for k in idx])

    both, alone = draw([0, 1]), [draw([0])[0], draw([1])[0]]
    assert all(np.array_equal(a, b) for k in range(2) for a, b in zip(both[k], alone[k]))
    assert any(len(r) > 1 for r in both[0])


def test_stacked_adamw_is_adamw_with_clipping_per_model():
    """The same gradients into both: the stacked optimizer against torch's AdamW after
    ``clip_grad_norm_``, per model, with a frozen student in the second step."""
    models = _students(3)
    singles = [copy.deepcopy(m) for m in models]
    st = Stack.of(models)
    opt = StackedAdamW(st, lr=1e-2)
    opts = [torch.optim.AdamW(m.transformer.parameters(), lr=1e-2) for m in singles]
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 50.0, 0.001])  # student 1's gradient is clipped, 2's is not
    for active in ([1, 1, 1], [1, 0, 1], [1, 1, 1]):
        grads = {name: torch.randn(p.shape, generator=gen) * scale.view(-1, *[1] * (p.dim() - 1))
                 for name, p in st.params.items()}
        for name, p in st.params.items():
            p.grad = grads[name].clone()
        norms = opt.step(torch.tensor(active, dtype=torch.bool))
        for k, m in enumerate(singles):
            for name, p in m.transformer.named_parameters():
                p.grad = grads[name][k].clone()
            norm = torch.nn.utils.clip_grad_norm_(m.transformer.parameters(), 1.0)
            assert float(norms[k]) == pytest.approx(float(norm), rel=1e-5)
            if active[k]:
                opts[k].step()
            opts[k].zero_grad()
    assert all(p.grad is None for p in st.params.values())
    for k, m in enumerate(singles):
        for name, p in m.transformer.named_parameters():
            torch.testing.assert_close(st.params[name][k], p, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arm", [dict(), dict(oracle=True), dict(one_to_one=True)])
def test_two_seeds_together_are_the_two_seeds_alone(pair0, arm):
    preset = dataclasses.replace(PRESETS["quick"], budget_tokens=900, opd_batch=8, evals=2)
    train, _, test = splits(preset)
    test = test[:40]
    both = run_opd_seeds(pair0, "teacher_x", "proportional", preset, [0, 1], train, test,
                         keep_weights=True, **arm)
    for seed, together in zip([0, 1], both):
        alone = run_opd_seeds(pair0, "teacher_x", "proportional", preset, [seed], train, test,
                              keep_weights=True, **arm)[0]
        assert together["tokens"] == alone["tokens"] >= 900
        assert [c[0] for c in together["curve"]] == [c[0] for c in alone["curve"]]
        np.testing.assert_array_equal(together["correct"], alone["correct"])
        for name, w in together["weights"].items():
            torch.testing.assert_close(w, alone["weights"][name], atol=1e-5, rtol=0)
        if arm.get("one_to_one"):
            assert together["m_n_masked_tokens"] == alone["m_n_masked_tokens"] > 0
    # the two students saw different prompts and draws, and learned
    start = Stack.of([pair0["student"][0]]).params
    assert any((both[0]["weights"][k] - both[1]["weights"][k]).abs().max() > 1e-4
               for k in start)
    assert any((both[0]["weights"][k] - start[k][0]).abs().max() > 1e-4 for k in start)
    assert run_opd(pair0, "teacher_x", "proportional", preset, 1, train, test,
                   **arm)["tokens"] == both[1]["tokens"]
