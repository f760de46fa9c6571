"""Chat-template bridging on real tokenizers and realistic templates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from crossopd.core.tokens import ByteVocab
from crossopd.models.hub import load_hf_tokenizer
from crossopd.step.bridge import (
    ChatFormat,
    TeacherContext,
    TemplateError,
    align_bridged,
    build_teacher_request,
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
THINK_TEMPLATE = (  # Qwen3-style: ChatML with an empty reasoning block on assistant turns
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is 12 × 7? Answer briefly."}]
MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another one, in 中文?"},
]


@pytest.fixture(scope="session")
def smol_tok():
    return load_hf_tokenizer("smollm2")


@pytest.fixture(scope="session")
def gemma_chat(get_vocab):
    tok = load_hf_tokenizer("gemma3-270m")  # a fresh object: the template is ours
    tok.chat_template = GEMMA_TEMPLATE
    return ChatFormat.from_tokenizer(tok), tok


@pytest.fixture(scope="session")
def gemma_plain():
    tok = load_hf_tokenizer("gemma3-270m")
    assert not tok.chat_template  # the bundled Gemma 3 270M is a base model
    return ChatFormat.from_tokenizer(tok, plain_template="Question: {prompt}\nAnswer:",
                                     stop="\n\nQuestion:"), tok


@pytest.fixture(scope="session")
def llama3_chat():
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from crossopd import bundled

    path = bundled.bundled_path("llama3")
    enc = bundled.llama_tiktoken_encoding(path)
    converted = TikTokenConverter(vocab_file=str(path), pattern=enc._pat_str,
                                  extra_special_tokens=enc._special_tokens).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return ChatFormat.from_tokenizer(tok), tok


@pytest.fixture(scope="session")
def smol_chat(smol_tok):
    return ChatFormat.from_tokenizer(smol_tok)


def _sample(sv, text: str, stop_id: int | None) -> list[int]:
    ids = sv.encode_bytes(text.encode())
    return ids + ([stop_id] if stop_id is not None else [])


def _check_request(req, sv, tv, s_fmt, t_fmt, t_tok, student_markers):
    t_prompt = t_tok.decode(req.teacher_ids[: req.response_start])
    for marker in student_markers:  # the teacher never sees the student's markers
        assert marker not in t_prompt
    body = req.student_response if req.student_stop_index is None else \
        req.student_response[: req.student_stop_index]
    # response bytes identical on both sides (after the seam bytes the teacher's first
    # scored token may carry)
    t_bytes = tv.concat_bytes(req.teacher_ids[req.response_start : req.response_end])
    assert t_bytes[req.lead:] == sv.concat_bytes(body)
    a = align_bridged(req, sv, tv)
    assert a.coverage == 1.0
    if req.student_stop_index is not None:
        stop = a.num_chunks - 1
        assert a.student_chunk[req.student_stop_index] == stop
        stop_t = np.flatnonzero(a.teacher_chunk == stop) + req.response_start
        assert [req.teacher_ids[i] for i in stop_t] == t_fmt.end_of_turn_ids
    return a, t_prompt


@pytest.mark.parametrize("teacher", ["gemma_chat", "gemma_plain", "llama3_chat"])
def test_smollm2_student_to_each_teacher_format(request, get_vocab, smol_chat, teacher):
    t_fmt, t_tok = request.getfixturevalue(teacher)
    sv = get_vocab("smollm2")
    tv = get_vocab("llama3" if teacher == "llama3_chat" else "gemma3-270m")
    resp = _sample(sv, " 12 × 7 = 84. 你好 👩\u200d💻", smol_chat.end_of_turn_ids[0])
    req = build_teacher_request(MESSAGES, resp, smol_chat, t_fmt, sv, tv)
    a, t_prompt = _check_request(req, sv, tv, smol_chat, t_fmt, t_tok,
                                 ["<|im_start|>", "<|im_end|>"])
    assert "What is 12 × 7? Answer briefly." in t_prompt
    bos = t_tok.bos_token_id
    assert req.teacher_ids[0] == bos and req.teacher_ids[1] != bos  # exactly one BOS
    expected_end = {"gemma_chat": "<end_of_turn>", "gemma_plain": "\n\nQuestion:",
                    "llama3_chat": "<|eot_id|>"}[teacher]
    assert t_fmt.end_of_turn == expected_end
    if teacher == "gemma_chat":
        assert t_prompt.endswith("<start_of_turn>model\n")
    if teacher == "llama3_chat":
        assert t_prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gemma_student_to_smollm2_teacher(get_vocab, gemma_chat, smol_chat, smol_tok):
    g_fmt, _ = gemma_chat
    sv, tv = get_vocab("gemma3-270m"), get_vocab("smollm2")
    resp = _sample(sv, "Seven times twelve is 84.", g_fmt.end_of_turn_ids[0])
    req = build_teacher_request(MESSAGES, resp, g_fmt, smol_chat, sv, tv)
    a, t_prompt = _check_request(req, sv, tv, g_fmt, smol_chat, smol_tok,
                                 ["<start_of_turn>", "<end_of_turn>"])
    assert t_prompt.endswith("<|im_start|>assistant\n")


def test_think_template_end_marker_and_text_think_tags(get_vocab, smol_tok, gemma_plain):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tok.name_or_path)
    tok.chat_template = THINK_TEMPLATE
    fmt = ChatFormat.from_tokenizer(tok)
    assert fmt.end_of_turn == "<|im_end|>"  # found after the sentinel, past the <think> block
    # "<think>" is plain text for both sides here: it aligns like any other bytes
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    t_fmt, t_tok = gemma_plain
    resp = _sample(sv, "<think>\n7 × 12 = 84\n</think>\n\n84", fmt.end_of_turn_ids[0])
    req = build_teacher_request(MESSAGES, resp, fmt, t_fmt, sv, tv)
    _check_request(req, sv, tv, fmt, t_fmt, t_tok, ["<|im_start|>"])


def test_multi_turn_histories_render_per_side(get_vocab, smol_chat, gemma_chat):
    g_fmt, g_tok = gemma_chat
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    req = build_teacher_request(MULTI, _sample(sv, "Eleven.", 2), smol_chat, g_fmt, sv, tv)
    t_prompt = g_tok.decode(req.teacher_ids[: req.response_start])
    assert "<start_of_turn>model\nSeven.<end_of_turn>" in t_prompt
    assert t_prompt.count("<start_of_turn>") == 5 and "<|im_start|>" not in t_prompt
    s_prompt = smol_chat.render(MULTI)
    assert "<|im_start|>assistant\nSeven.<|im_end|>" in s_prompt and "<start_of_turn>" not in \
        s_prompt


def test_teacher_only_context_reaches_only_the_teacher(get_vocab, smol_chat, gemma_plain):
    t_fmt, t_tok = gemma_plain
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    ctx = TeacherContext(system="Grade strictly.")
    req = build_teacher_request(MESSAGES, _sample(sv, "84", 2), smol_chat, t_fmt, sv, tv,
                                context=ctx, reference="12 × 7 = 84")
    t_prompt = t_tok.decode(req.teacher_ids[: req.response_start])
    assert "Grade strictly." in t_prompt and "12 × 7 = 84" in t_prompt
    s_prompt = smol_chat.render(MESSAGES)
    assert "Grade strictly." not in s_prompt and "12 × 7 = 84" not in s_prompt


def test_response_cut_by_length_has_no_stop_chunk(get_vocab, smol_chat, gemma_plain):
    t_fmt, _ = gemma_plain
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    resp = sv.encode_bytes(b"The answer is 8")
    req = build_teacher_request(MESSAGES, resp, smol_chat, t_fmt, sv, tv)
    assert req.student_stop_index is None and req.stop_end == req.response_end
    a = align_bridged(req, sv, tv)
    assert a.coverage == 1.0 and (a.student_chunk >= 0).all()


def test_other_trailing_special_tokens_are_masked(get_vocab, smol_chat, gemma_plain):
    t_fmt, _ = gemma_plain
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    endoftext = 0  # a special token that is not SmolLM2's end of turn
    resp = sv.encode_bytes(b"84") + [endoftext]
    req = build_teacher_request(MESSAGES, resp, smol_chat, t_fmt, sv, tv)
    a = align_bridged(req, sv, tv)
    assert req.student_stop_index is None
    assert a.student_chunk[-1] == -1 and a.counts["special_student_tokens"] == 1


def test_teacher_context_overflow_gets_no_signal(get_vocab, smol_chat, gemma_plain):
    t_fmt, _ = gemma_plain
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    resp = sv.encode_bytes(b"a long answer " * 20) + [2]
    short = dataclasses.replace(t_fmt, max_length=50)  # a teacher with a 50-token context
    req = build_teacher_request(MESSAGES, resp, smol_chat, short, sv, tv)
    assert req.overflow
    a = align_bridged(req, sv, tv)
    assert a.num_chunks == 0 and (a.student_chunk == -1).all()


def test_template_errors_say_what_to_do(smol_chat):
    tok = load_hf_tokenizer("gemma3-270m")
    with pytest.raises(TemplateError, match="plain template"):
        ChatFormat.from_tokenizer(tok)
    with pytest.raises(TemplateError, match="stop string"):
        ChatFormat.from_tokenizer(tok, plain_template="Q: {prompt}\nA:")
    with pytest.raises(TemplateError, match="no \\{prompt\\} field"):
        ChatFormat.from_tokenizer(tok, plain_template="Q:", stop="\n")
    with pytest.raises(TemplateError, match="empty conversation"):
        smol_chat.render([])
    with pytest.raises(TemplateError, match="ends with an assistant turn"):
        smol_chat.render(MULTI[:3])


def test_student_stop_ids_come_from_the_template_end_of_turn(gemma_chat, llama3_chat, smol_chat):
    """Gemma's `<end_of_turn>` (id 106) is not among the tokenizer's special ids, yet it ends a
    Gemma-templated turn: sampling must stop there and the bridge must see a stop chunk."""
    fmt, tok = gemma_chat
    (end_id,) = fmt.end_of_turn_ids
    assert tok.convert_ids_to_tokens(end_id) == "<end_of_turn>"
    assert end_id in fmt.stop_ids
    l_fmt, l_tok = llama3_chat
    assert l_tok.convert_tokens_to_ids("<|eot_id|>") in l_fmt.stop_ids
    assert smol_chat.end_of_turn_ids[0] in smol_chat.stop_ids  # <|im_end|>


def test_generation_config_eos_list_adds_stop_ids(smol_tok):
    """Llama-3-Instruct-style models end turns on any of several ids listed in their generation
    config; each of them stops sampling."""
    fmt = ChatFormat.from_tokenizer(smol_tok, eos_ids=[7, 9])
    assert {7, 9} <= fmt.stop_ids and smol_tok.eos_token_id in fmt.stop_ids


def test_gemma_student_stop_chunk_pairs_end_of_turn(get_vocab, gemma_chat, smol_chat, smol_tok):
    fmt, tok = gemma_chat
    sv, tv = ByteVocab.from_pretrained(tok), ByteVocab.from_pretrained(smol_tok)
    resp = sv.encode_bytes(b"84") + [fmt.end_of_turn_ids[0]]
    req = build_teacher_request(MESSAGES, resp, fmt, smol_chat, sv, tv)
    assert req.student_stop_index == len(resp) - 1
    a = align_bridged(req, sv, tv)
    assert a.student_chunk[-1] == a.num_chunks - 1 and a.coverage == 1.0


# ---------------------------------------------------------------- the seam and the overlap
R1_TEMPLATE = (  # DeepSeek-R1-Distill style: the generation prompt opens the reasoning block
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n<think>\n' }}"
    "{% endif %}"
)
CHATML_THINK = (  # a ChatML student whose generation prompt also opens the reasoning block
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)


def _teacher_text(req, t_tok) -> tuple[str, str]:
    """(teacher prompt, teacher scored text) as the teacher's tokenizer reads them."""
    return (t_tok.decode(req.teacher_ids[: req.response_start]),
            t_tok.decode(req.teacher_ids[req.response_start : req.stop_end]))


def test_seam_found_from_the_template(gemma_plain, gemma_chat, smol_chat, llama3_chat):
    assert gemma_plain[0].seam == " "  # "Answer:" + " " + content
    assert gemma_chat[0].seam == ""
    assert smol_chat.seam == ""
    assert llama3_chat[0].seam == ""
    tok = load_hf_tokenizer("smollm2")
    tok.chat_template = THINK_TEMPLATE  # an empty <think></think> on past turns is not a seam
    assert ChatFormat.from_tokenizer(tok).seam == ""


@pytest.mark.parametrize("answer", ["25", "The answer is 25."])
def test_plain_teacher_gets_its_seam_for_a_chat_student(get_vocab, smol_chat, gemma_plain,
                                                        answer):
    # SmolLM2's ChatML answer starts right after "assistant\n"; glued onto the teacher's
    # "Answer:" it would read "Answer:25", a format error the student never made
    t_fmt, t_tok = gemma_plain
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    req = build_teacher_request(MESSAGES, _sample(sv, answer, smol_chat.end_of_turn_ids[0]),
                                smol_chat, t_fmt, sv, tv)
    prompt, scored = _teacher_text(req, t_tok)
    assert (prompt + scored).endswith("\nAnswer: " + answer + "\n\nQuestion:")
    a, _ = _check_request(req, sv, tv, smol_chat, t_fmt, t_tok, ["<|im_start|>"])
    # the teacher's tokens are its canonical ones for the whole text, seam included
    canonical = t_fmt.encode_prompt(t_fmt.render(MESSAGES) + " " + answer + "\n\nQuestion:")
    assert req.teacher_ids == canonical
    if answer.startswith("The"):  # Gemma spells " The" as one token: the seam rides along
        assert req.lead == 1 and t_tok.convert_ids_to_tokens(req.teacher_ids[req.response_start]) \
            == "\u2581The"
        assert a.student_chunk[0] == a.teacher_chunk[0] == 0
    else:  # digits stand alone: the seam token is prompt
        assert req.lead == 0 and prompt.endswith("Answer: ")


def test_student_that_writes_the_seam_is_scored_once(get_vocab, smol_chat, gemma_plain):
    t_fmt, t_tok = gemma_plain
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    req = build_teacher_request(MESSAGES, _sample(sv, " 25", None), smol_chat, t_fmt, sv, tv)
    prompt, scored = _teacher_text(req, t_tok)
    assert prompt.endswith("\nAnswer:") and scored == " 25"


@pytest.mark.parametrize("answer,expected", [("25", "Answer:25"), (" 25", "Answer: 25")])
def test_shared_plain_format_scores_the_response_as_written(get_vocab, answer, expected):
    # both formats leave the space after "Answer:" to the model: a student that skips it is
    # judged on what it wrote, and the teacher's context is the student's own
    tok = load_hf_tokenizer("smollm2")
    fmt = ChatFormat.from_tokenizer(tok, plain_template="Question: {prompt}\nAnswer:",
                                    stop="\n\nQuestion:")
    sv = get_vocab("smollm2")
    req = build_teacher_request(MESSAGES, _sample(sv, answer, None), fmt, fmt, sv, sv)
    prompt, scored = _teacher_text(req, tok)
    assert (prompt + scored).endswith(expected)
    assert req.teacher_ids[: req.response_start] == fmt.prompt_ids(MESSAGES)


@pytest.fixture(scope="session")
def gemma_r1():
    tok = load_hf_tokenizer("gemma3-270m")
    tok.chat_template = R1_TEMPLATE
    return ChatFormat.from_tokenizer(tok), tok


def test_think_opening_in_teacher_prompt_is_not_repeated(get_vocab, smol_chat, gemma_r1):
    t_fmt, t_tok = gemma_r1
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    text = "<think>\nSeven twelves.</think>\n84"
    req = build_teacher_request(MESSAGES, _sample(sv, text, smol_chat.end_of_turn_ids[0]),
                                smol_chat, t_fmt, sv, tv)
    prompt, scored = _teacher_text(req, t_tok)
    assert (prompt + scored).count("<think>") == 1
    assert prompt.endswith("<start_of_turn>model\n") and scored.startswith(text)
    _check_request(req, sv, tv, smol_chat, t_fmt, t_tok, ["<|im_start|>"])
    # a student that does not open a reasoning block gets the teacher's own opening
    req = build_teacher_request(MESSAGES, _sample(sv, "84", None), smol_chat, t_fmt, sv, tv)
    prompt, scored = _teacher_text(req, t_tok)
    assert prompt.endswith("model\n<think>\n") and scored == "84"


def test_think_repeated_after_own_opening_is_kept(get_vocab, gemma_r1):
    # the student's own prompt already opened the block: writing <think> again is the
    # student's choice, and the teacher sees it, as the student did
    t_fmt, t_tok = gemma_r1
    tok = load_hf_tokenizer("smollm2")
    tok.chat_template = CHATML_THINK
    s_fmt = ChatFormat.from_tokenizer(tok)
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    req = build_teacher_request(MESSAGES, _sample(sv, "<think>\nHm.</think>\n84", None),
                                s_fmt, t_fmt, sv, tv)
    prompt, scored = _teacher_text(req, t_tok)
    assert (prompt + scored).count("<think>") == 2


def test_response_overlap_definition():
    from crossopd.step.bridge import response_overlap

    assert response_overlap(b"Answer: ", b" 25", b"Answer:") == 1
    assert response_overlap(b"model\n<think>\n", b"<think>\nx", b"assistant\n") == 8
    assert response_overlap(b"model\n", b"\nx", b"assistant\n") == 0  # student's own newline
    assert response_overlap(b"ab", b"cd", b"") == 0
    # never cut the prefix inside a UTF-8 character
    assert response_overlap("x\u00e9".encode(), b"\xa9y", b"") == 0
