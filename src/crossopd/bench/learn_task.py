"""The learning benchmark's task and models, built here on CPU: three-term addition with a worked
solution and an exact checker, two tokenizers trained on it that disagree on digit boundaries,
small GPT-2 models, supervised training, and greedy/sampled generation for evaluation."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from crossopd.models.sampling import left_pad


# ------------------------------------------------------------------------------------ the task
def make_problem(rng: random.Random, digits: int = 2) -> tuple[str, str, int]:
    """(prompt, worked solution, answer) for a three-term addition."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b, c = (rng.randint(lo, hi) for _ in range(3))
    s = a + b
    return f"{a}+{b}+{c}=", f"{a}+{b}={s},{s}+{c}={s + c}", s + c


_FINAL = re.compile(r"=(\d+)\s*$")


def check_answer(response: str, answer: int) -> bool:
    """Exact: the response's last ``=N`` must be the answer (nothing may follow but spaces)."""
    m = _FINAL.search(response)
    return m is not None and int(m.group(1)) == answer


_WORKED = re.compile(r"^(\d+)\+(\d+)=(\d+),(\d+)\+(\d+)=(\d+)\s*$")
ANSWER_KINDS = ("correct", "wrong_first_sum", "wrong_copy", "wrong_last_sum",
                "malformed_ended", "malformed_no_end")


def answer_kind(prompt: str, response: str, answer: int, ended: bool) -> str:
    """Where a response to ``a+b+c=`` goes wrong, one of ``ANSWER_KINDS``: correct; the worked
    solution's first step ``a+b=s`` wrong; its second step not starting from that ``s`` and
    ``c``; only ``s+c`` wrong; or not of the form ``a+b=s,s+c=t`` at all, split by whether the
    student ended its turn (``ended``) or ran to the token cap."""
    if check_answer(response, answer):  # the benchmark's own checker decides what is correct
        return "correct"
    a, b, c = (int(x) for x in prompt.rstrip("=").split("+"))
    m = _WORKED.match(response)
    if m is None:
        return "malformed_ended" if ended else "malformed_no_end"
    a1, b1, s1, s2, c2, _ = (int(x) for x in m.groups())
    if (a1, b1) != (a, b) or s1 != a + b:
        return "wrong_first_sum"
    if (s2, c2) != (s1, c):
        return "wrong_copy"
    return "wrong_last_sum"


def make_split(n: int, seed: int, exclude: set[str] = frozenset(), digits: int = 2,
               problem: Callable[[random.Random], tuple[str, str, int]] | None = None):
    """``n`` distinct problems (by prompt) from ``problem`` (default: ``make_problem`` with
    ``digits``), none of them in ``exclude``."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        p = problem(rng) if problem else make_problem(rng, digits)
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


# ------------------------------------------------------------------------------ tokenizers
TEMPLATE = "{{ messages[-1]['content'] }}"  # the prompt is the problem text itself


def _wrap(tok_obj: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=tok_obj, eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    t.chat_template = TEMPLATE
    return t


def _pre_tokenizer(own: Any, isolate: str | None) -> Any:
    """``own``, after splitting off every match of the regex ``isolate`` (no merge crosses one)."""
    from tokenizers import Regex, pre_tokenizers

    if isolate is None:
        return own
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(isolate), "isolated"), own])


def train_teacher_tokenizer(corpus: list[str], vocab_size: int = 300,
                            isolate: str | None = None) -> Any:
    """Byte-level BPE without the split regex: merges run across digits, so numbers become
    multi-digit tokens. ``isolate``: a regex whose matches no merge crosses (a chat template's
    role markers, so a conversation tokenized whole and turn by turn agree)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), isolate)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(tok)


def train_student_tokenizer(corpus: list[str], vocab_size: int = 120,
                            isolate: str | None = None) -> Any:
    """SentencePiece-style BPE (``▁`` for space) with byte fallback; digits always split;
    ``isolate`` as ``train_teacher_tokenizer``'s."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = _pre_tokenizer(pre_tokenizers.Digits(individual_digits=True), isolate)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size + 256, special_tokens=["<pad>", "</s>", "<unk>", *byte_tokens]))
    # the byte pieces belong to the model vocabulary (byte fallback), not to the special tokens
    doc = json.loads(tok.to_str())
    doc["added_tokens"] = [a for a in doc["added_tokens"] if a["content"] not in byte_tokens]
    return _wrap(Tokenizer.from_str(json.dumps(doc)))


# ------------------------------------------------------------------------------ models
def new_model(vocab_size: int, seed: int, width: int, layers: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=width, n_layer=layers,
                     n_head=4, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                     tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


def encode_pair(tok: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, r


def supervised_train(model: Any, pairs: Sequence[tuple[list[int], ...]], steps: int,
                     lr: float, batch: int, seed: int,
                     stop: Callable[[int], bool] | None = None, check_every: int = 50) -> int:
    """Cross-entropy on response tokens (prompt masked). Returns response tokens trained on.
    Each row is (prompt ids, response ids) or (prompt ids, response ids, which response tokens
    to train on: a trajectory's environment tokens are not). ``stop(step)``, asked every
    ``check_every`` steps with the model in eval mode, ends training early when it returns True
    (a teacher trained to a target accuracy)."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    seen = 0
    for step in range(steps):
        if stop is not None and step and step % check_every == 0:
            model.eval()
            if stop(step):
                break
            model.train()
        idx = rng.integers(0, len(pairs), size=batch)
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, i in enumerate(idx):
            p, resp = pairs[i][:2]
            ids[r, : len(p) + len(resp)] = torch.tensor(p + resp)
            target = torch.tensor(resp)
            if len(pairs[i]) > 2:
                keep = torch.tensor(pairs[i][2], dtype=torch.bool)
                target = torch.where(keep, target, -100)
                seen += int(keep.sum())
            else:
                seen += len(resp)
            labels[r, len(p): len(p) + len(resp)] = target
            mask[r, : len(p) + len(resp)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return seen


@torch.inference_mode()
def generate_texts(model: Any, tok: Any, prompts: list[str], max_new_tokens: int,
                   sample: bool) -> list[str]:
    """Continuations of ``prompts`` (greedy, or sampled from the full distribution), cut at EOS."""
    return generate_ended(model, tok, prompts, max_new_tokens, sample)[0]


def generate_ended(model: Any, tok: Any, prompts: list[str], max_new_tokens: int,
                   sample: bool) -> tuple[list[str], list[bool]]:
    """``generate_texts``, and for each continuation whether it ended (EOS before the cap)."""
    texts, ended = [], []
    for lo in range(0, len(prompts), 64):
        ids_list = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[lo: lo + 64]]
        ids, mask = left_pad(ids_list, tok.pad_token_id)
        width = ids.shape[1]
        extra = {"do_sample": True, "top_k": 0} if sample else {"do_sample": False}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             **extra)
        for row in out[:, width:].tolist():
            ended.append(tok.eos_token_id in row)
            if ended[-1]:
                row = row[: row.index(tok.eos_token_id)]
            texts.append(tok.decode(row, skip_special_tokens=True))
    return texts, ended


def correct_answers(model: Any, tok: Any, problems: list[tuple[str, str, int]],
                    max_new_tokens: int = 24) -> np.ndarray:
    """Greedy decoding, exact answer check: one bool per problem."""
    texts = generate_texts(model, tok, [p[0] for p in problems], max_new_tokens, sample=False)
    return np.array([check_answer(t, p[2]) for t, p in zip(texts, problems)])


def accuracy(model: Any, tok: Any, problems: list[tuple[str, str, int]],
             max_new_tokens: int = 24) -> float:
    return float(correct_answers(model, tok, problems, max_new_tokens).mean())
