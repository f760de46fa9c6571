"""The scored policy is the sampled policy: log-probs at the rollout temperature, and no sampling
setting inherited silently from a model's generation config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossopd.models.sampling import sample, sampling_config
from crossopd.models.scoring import score_sequences


def _tiny_lm(vocab: int = 12):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a peaked next-token distribution, where temperature matters
        model.lm_head.weight.mul_(40.0)
    return model


def test_sampled_frequencies_match_exp_old_logps_at_temperature_half():
    model = _tiny_lm()
    prompt = [2, 5, 7]
    n = 3000
    torch.manual_seed(0)
    first = [int(r[0]) for r in sample(model, [prompt] * n, max_new_tokens=1, temperature=0.5,
                                        top_p=1.0, stop_ids={1}, pad_id=0, batch_size=1000)]
    tokens = sorted(set(first))
    logps = score_sequences(model, [prompt + [t] for t in tokens], [(3, 4)] * len(tokens),
                            temperature=0.5)
    logps = [lp.detach() for lp in logps]
    expected = np.exp([float(lp[0]) for lp in logps])
    freq = np.array([first.count(t) / n for t in tokens])
    # binomial standard error at n = 3000 is at most 0.009: 0.04 is > 4 sigma
    np.testing.assert_allclose(freq, expected, atol=0.04)
    assert expected.sum() > 0.97  # the sampled tokens carry (almost) all the mass


def test_model_generation_config_cannot_change_the_sampled_policy():
    model = _tiny_lm()
    model.generation_config.repetition_penalty = 1.05  # as Qwen2.5-Instruct ships
    model.generation_config.top_k = 20
    model.generation_config.no_repeat_ngram_size = 3
    with pytest.warns(UserWarning, match="repetition_penalty.*1.05"):
        gc = sampling_config(model, temperature=0.7, top_p=0.9)
    assert (gc.repetition_penalty, gc.top_k, gc.no_repeat_ngram_size) == (1.0, 0, 0)
    assert (gc.temperature, gc.top_p, gc.do_sample) == (0.7, 0.9, True)
    assert model.generation_config.repetition_penalty == 1.05  # the model is left as it was
