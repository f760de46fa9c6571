"""Tiny Llama models with the real bundled tokenizers, built by the tests themselves (random
weights; seconds to build, fast to run): a student with SmolLM2's tokenizer, a cross-family
teacher with Gemma 3's, and a same-tokenizer teacher. Shared by tests/ and tests_verl/."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_model(tok, out: Path, seed: int, layers: int = 2, tie: bool = True,
               heads: int = 4) -> Path:
    """Hidden size 32 with ``heads`` heads (vLLM's CPU attention needs a head size of 32 or
    more: heads=1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=min(2, heads),
                      max_position_embeddings=512, tie_word_embeddings=tie,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_models(root: Path) -> dict[str, str]:
    from crossopd.models.hub import load_hf_tokenizer

    smol = load_hf_tokenizer("smollm2")
    gemma = load_hf_tokenizer("gemma3-270m")
    return {
        "student": str(tiny_model(smol, root / "student", 0)),
        "teacher": str(tiny_model(gemma, root / "teacher", 1)),
        "same_teacher": str(tiny_model(smol, root / "same_teacher", 2)),
    }
