"""ByteVocab on real tokenizers: exact bytes per id, encode_bytes, errors for unsupported kinds."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crossopd import ByteVocab, UnsupportedTokenizerError
from crossopd.core.vocabs.hf_json import in_context_encoder_json

from conftest import REAL
from reference import decoded_bytes
from strategies import texts

pytestmark = pytest.mark.core  # the array core: `pytest -m core`


def spellable(v: ByteVocab, data: bytes) -> bytes:
    """What the vocabulary can spell of ``data``: all of it, except bytes that a byte-level
    vocabulary has no token for (SmolLM2 lacks 0xF1, for one)."""
    if v.unk_id is not None or (v.byte_ids >= 0).all():
        return data
    return bytes(b for b in data if v.byte_ids[b] >= 0)


BYTE_CAPABLE = ("gemma3-270m", "llama3", "mistral-v3", "cl100k", "tekken", "mistral-v1")


@pytest.mark.parametrize("name", REAL)
@given(text=texts())
def test_token_bytes_match_decode(get_vocab, name, text):
    v = get_vocab(name)
    ids = v.encode_bytes(text.encode("utf-8"))
    joined = b"".join(v.token_bytes(ids))
    assert joined == v.concat_bytes(ids) == spellable(v, text.encode("utf-8"))
    dec = decoded_bytes(v, ids)
    if dec is not None:
        assert joined == dec


@pytest.mark.parametrize("name", REAL)
def test_every_id_round_trips_through_decode(get_vocab, name):
    """Single tokens that decode cleanly decode to exactly their table bytes."""
    v = get_vocab(name)
    rng = np.random.default_rng(0)
    ids = rng.choice(v.vocab_size, size=min(3000, v.vocab_size), replace=False)
    checked = 0
    for i in ids.tolist():
        if v.special[i]:
            assert v.token_bytes([i]) == [b""]
            continue
        dec = decoded_bytes(v, [i])
        if dec is not None:
            assert v.token_bytes([i])[0] == dec, (i, v.token_bytes([i]), dec)
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("name", BYTE_CAPABLE)
@given(data=st.binary(max_size=64))
def test_encode_bytes_spells_any_bytes(get_vocab, name, data):
    v = get_vocab(name)
    assert v.concat_bytes(v.encode_bytes(data)) == data


def test_byte_level_vocab_without_some_bytes_leaves_them_out(get_vocab):
    """SmolLM2 has no token for 0xFF (never valid UTF-8): the byte cannot be spelled."""
    v = get_vocab("smollm2")
    assert v.byte_ids[0xFF] == -1
    assert v.concat_bytes(v.encode_bytes(b"a\xffb")) == b"ab"


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
def test_no_dummy_prefix_mid_context(get_vocab, name):
    v = get_vocab(name)
    assert v.dummy_prefix
    ids = v.encode_bytes(b"Hello world")
    assert v.token_bytes(ids)[0] == b"Hello"
    assert v.concat_bytes(v.encode_bytes(b" Hello")) == b" Hello"


@pytest.mark.parametrize(
    "name,marker",
    [
        ("smollm2", "<|im_end|>"),
        ("gemma3-270m", "<end_of_turn>"),
        ("llama3", "<|eot_id|>"),
        ("cl100k", "<|endoftext|>"),
    ],
)
def test_special_token_text_stays_text(get_vocab, name, marker):
    v = get_vocab(name)
    ids = v.encode_bytes(f"say {marker} now".encode())
    assert not v.special[ids].any()
    assert v.concat_bytes(ids) == f"say {marker} now".encode()


def test_special_tokens_have_no_bytes(get_vocab):
    v = get_vocab("smollm2")
    im_end = v.backend.token_to_id("<|im_end|>")
    assert v.special[im_end] and v.token_bytes([im_end]) == [b""]


def test_ids_outside_vocabulary_are_rejected(get_vocab):
    v = get_vocab("smollm2")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        v.check_ids([1, v.vocab_size], "student")


# ---------------------------------------------------------------- tokenizers built in the test
def _train(
    model, pre, decoder, normalizer=None, corpus=None, special=("<s>", "</s>"), alphabet=None
):
    from tokenizers import Tokenizer, trainers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre
    tok.decoder = decoder
    if normalizer is not None:
        tok.normalizer = normalizer
    corpus = corpus or ["hello world, the quick brown fox 123 456", "jumps over the lazy dog"] * 20
    if type(model).__name__ == "BPE":
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=list(special), initial_alphabet=alphabet or []
        )
    elif type(model).__name__ == "WordPiece":
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"])
    else:
        trainer = trainers.UnigramTrainer(vocab_size=100, special_tokens=list(special))
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_wordpiece_is_rejected_with_a_clear_error():
    from tokenizers import decoders, models, pre_tokenizers

    tok = _train(
        models.WordPiece(unk_token="[UNK]"), pre_tokenizers.Whitespace(), decoders.WordPiece()
    )
    with pytest.raises(UnsupportedTokenizerError, match="WordPiece"):
        ByteVocab.from_pretrained(tok)


def test_metaspace_with_dummy_prefix_built_in_test():
    from tokenizers import decoders, models, pre_tokenizers

    tok = _train(
        models.BPE(byte_fallback=True, unk_token="<unk>"),
        pre_tokenizers.Metaspace(prepend_scheme="first"),
        decoders.Metaspace(prepend_scheme="first"),
        special=("<unk>", "<s>"),
    )
    # byte fallback needs the <0xNN> pieces in the vocabulary
    tok.add_tokens([f"<0x{b:02X}>" for b in range(256)])
    v = ByteVocab.from_pretrained(tok)
    assert v.kind == "metaspace" and v.dummy_prefix
    ids = v.encode_bytes(b"hello world")
    assert v.concat_bytes(ids) == b"hello world"  # no leading space mid-context
    assert tok.encode("hello world").tokens[0].startswith("▁")  # the tokenizer itself adds one


def test_byte_level_bpe_built_in_test_round_trips():
    from tokenizers import decoders, models, pre_tokenizers

    tok = _train(
        models.BPE(),
        pre_tokenizers.ByteLevel(add_prefix_space=True),
        decoders.ByteLevel(),
        alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    v = ByteVocab.from_pretrained(tok)
    assert v.kind == "byte_level"
    rnd = random.Random(0)
    for _ in range(50):
        data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(30)))
        assert v.concat_bytes(v.encode_bytes(data)) == data


def test_in_context_encoder_json_drops_prefix_and_post_processor():
    doc = {
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"},
        "post_processor": {"type": "TemplateProcessing"},
        "model": {"type": "BPE", "vocab": {}},
    }
    out = in_context_encoder_json(doc)
    assert [n["type"] for n in out["normalizer"]["normalizers"]] == ["Replace"]
    assert out["pre_tokenizer"]["prepend_scheme"] == "never"
    assert out["post_processor"] is None
    assert doc["pre_tokenizer"]["prepend_scheme"] == "always"  # input untouched


def test_gguf_tokenizer_cache_is_reused(get_vocab, tmp_path, monkeypatch):
    from crossopd import bundled
    from crossopd.core.vocabs.gguf import gguf_tokenizer_dir

    path = bundled.smollm2_gguf()
    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path))
    first = gguf_tokenizer_dir(path)
    mtime = (first / "tokenizer.json").stat().st_mtime_ns
    assert gguf_tokenizer_dir(path) == first
    assert (first / "tokenizer.json").stat().st_mtime_ns == mtime
    assert not [p for p in first.parent.iterdir() if ".tmp" in p.name]

    # The same bytes elsewhere (a new virtual environment, a fresh clone) reuse the entry; a
    # different file gets its own.
    import shutil

    copy = tmp_path / "elsewhere" / path.name
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    assert gguf_tokenizer_dir(copy) == first
    with copy.open("ab") as f:
        f.write(b"\0")
    from crossopd.files import file_digest

    assert file_digest(copy) != file_digest(path)


def _char_level_copy(src, dst):
    """``src``'s tokenizer as a converter that lost its merges writes it: BPE without merges
    (every word in single characters)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    for marker in dst.glob("sound-tf*"):
        marker.unlink()
    spec = json.loads((dst / "tokenizer.json").read_text())
    spec["model"]["merges"] = []
    (dst / "tokenizer.json").write_text(json.dumps(spec))


def test_a_gguf_conversion_that_spells_words_in_characters_is_never_used(tmp_path, monkeypatch):
    """Some transformers versions convert a GGUF tokenizer without its merges (5.10 does so for
    Gemma 3): crossopd uses a sound conversion of another version from the cache instead, and
    without one says how to make it; the result is remembered per transformers version."""
    from importlib.metadata import version

    from crossopd import bundled
    from crossopd.core.vocabs.gguf import (
        TokenizerConversionError,
        gguf_tokenizer_dir,
        tokenizer_sound,
    )

    path = bundled.smollm2_gguf()
    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path / "real"))
    good = gguf_tokenizer_dir(path)
    assert tokenizer_sound(good)
    assert (good / f"sound-tf{version('transformers')}").read_text() == "yes\n"
    broken = tmp_path / "broken"
    _char_level_copy(good, broken)
    assert not tokenizer_sound(broken)

    cache = tmp_path / "cache" / "tokenizers"
    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path / "cache"))
    stem = good.name.rsplit("-tf", 1)[0]
    _char_level_copy(good, cache / good.name)  # this version's conversion: broken
    with pytest.raises(TokenizerConversionError, match="without its BPE merges.*\\.venv/bin"):
        gguf_tokenizer_dir(path)
    import shutil

    shutil.copytree(good, cache / f"{stem}-tf4.0.0")  # another version's: sound
    shutil.copytree(good, cache / f"{stem}-tf4.10.0")
    assert gguf_tokenizer_dir(path) == cache / f"{stem}-tf4.10.0"  # the newest sound one


def test_unknown_source_error_names_the_options():
    with pytest.raises(FileNotFoundError, match="bundled name"):
        ByteVocab.from_pretrained("./no/such/tokenizer")


def test_lossy_normaliser_is_respelled_with_byte_tokens():
    """A teacher whose normaliser rewrites text (NFKC, lowercase) still gets ids spelling the
    exact bytes: the changed stretches are spelled with byte-fallback tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for ch in "▁abcdefghijklmnopqrstuvwxyz0123456789½":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    v = ByteVocab.from_pretrained(tok)
    assert v.kind == "metaspace"
    for text in ("ﬁne Hello", "Ⅻ and ½", "plain text", "ÀB\u0301"):
        data = text.encode()
        assert v.concat_bytes(v.encode_bytes(data)) == data, text
    ids = v.encode_bytes("ﬁne".encode())
    assert [v.token_bytes([i])[0] for i in ids] == [b"\xef", b"\xac", b"\x81", b"n", b"e"]
