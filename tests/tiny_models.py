"""Tiny Llama models with the real bundled tokenizers, built by the tests themselves (random
weights; seconds to build, fast to run): a student with SmolLM2's tokenizer, a cross-family
teacher with Gemma 3's, and a same-tokenizer teacher. Shared by tests/ and tests_verl/."""

from __future__ import annotations

from pathlib import Path

import torch

# A chat template with tool turns on Gemma's tokenizer (Gemma 3's own has none): calls written
# as JSON objects with "parameters", Llama 3's custom tool format, another syntax than Hermes
GEMMA_TOOLS = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<start_of_turn>model\n"
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}"
    "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}"
    "{% endfor %}<end_of_turn>\n"
    "{% elif m.role == 'tool' %}<start_of_turn>user\nTool result: {{ m.content }}<end_of_turn>\n"
    "{% else %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


CALL = {"type": "function", "function": {"name": "calc", "arguments": {"expr": "17*23"}}}
TOOL_TRAJECTORY = [{"role": "user", "content": "What is 17*23?"},
                   {"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "tool", "content": "391"},
                   {"role": "assistant", "content": "391"}]


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


def tiny_tool_teacher(root: Path) -> str:
    """A tiny teacher with Gemma 3's tokenizer and ``GEMMA_TOOLS``: it renders tool turns."""
    import copy

    from crossopd.models.hub import load_hf_tokenizer

    gemma = copy.copy(load_hf_tokenizer("gemma3-270m"))  # the loaded one is shared
    gemma.chat_template = GEMMA_TOOLS
    return str(tiny_model(gemma, root / "tool_teacher", seed=1))


def taught_tool_student(base: str, tok, syntax_of, out: Path, schema: dict | None = None
                        ) -> str:
    """The tiny student ``base`` with ``tok`` taught (200 steps) to call calc in the syntax
    ``syntax_of(fmt)`` and then answer (``TOOL_TRAJECTORY``), with ``schema`` (default:
    ``user_tools.calc``'s) in its prompt."""
    from user_tools import calc

    from crossopd.core.tokens import ByteVocab
    from crossopd.models.hub import load_hf_model
    from crossopd.step.bridge import ChatFormat
    from crossopd.step.multiturn import tool_schema
    from crossopd.step.trajectory import trajectory_from_messages

    fmt = ChatFormat.from_tokenizer(tok)
    _, prompt, traj = trajectory_from_messages(
        TOOL_TRAJECTORY, fmt, ByteVocab.from_pretrained(tok), syntax_of(fmt),
        [schema or tool_schema(calc)])
    ids = torch.tensor([prompt + traj.ids.tolist()])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    labels[0, len(prompt):][~torch.from_numpy(traj.student_mask)] = -100
    model = load_hf_model(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(200):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01, loss.item()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
