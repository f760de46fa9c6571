"""GGUF tokenizers, converted to ``tokenizer.json`` by transformers once and cached on disk.

The conversion is transformers' and differs between its versions, so each version's result is
cached apart. Some versions convert a tokenizer wrongly (transformers 5.10 turns Gemma 3's
SentencePiece-style BPE into a Unigram model without merges, which spells every word in single
characters and adds no BOS): such a conversion is never used. A sound conversion by another
version of transformers already in the cache is used instead; without one, the error says how
to make it.
"""

from __future__ import annotations

from pathlib import Path

from crossopd.files import atomic_dir_write, cache_dir, file_digest


class TokenizerConversionError(RuntimeError):
    """The installed transformers converts this GGUF tokenizer wrongly."""


PROBE = "The quick brown fox jumps over the lazy dog, and then it sleeps."


def tokenizer_sound(directory: Path) -> bool:
    """False for a converted tokenizer that, loaded by this transformers, spells plain English
    in single characters although its vocabulary has longer tokens (what a conversion that lost
    the merges does). Checked once per transformers version; a marker file keeps the answer."""
    from importlib.metadata import version

    if not (directory / "tokenizer.json").exists():
        return False
    marker = directory / f"sound-tf{version('transformers')}"
    if marker.exists():
        return marker.read_text().strip() == "yes"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    pieces = [t.replace("\u2581", "").replace("\u0120", "") for t in tok.tokenize(PROBE)]
    longer = any(len(t) > 1 and not t.startswith("<") for t in tok.get_vocab())
    sound = not longer or any(len(p) > 1 for p in pieces)
    marker.write_text("yes\n" if sound else "no\n")
    return sound


def _version_key(path: Path) -> tuple[int, ...]:
    tail = path.name.rsplit("-tf", 1)[-1]
    return tuple(int(p) if p.isdigit() else 0 for p in tail.split("."))


def gguf_tokenizer_dir(path: Path) -> Path:
    """The GGUF file's tokenizer converted by transformers, cached on disk (conversion is slow)."""
    from importlib.metadata import version

    stem = f"{path.stem}-{file_digest(path)}"
    target = cache_dir() / "tokenizers" / f"{stem}-tf{version('transformers')}"
    if not (target / "tokenizer.json").exists():

        def write(tmp: Path) -> None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            tok.save_pretrained(str(tmp))

        atomic_dir_write(target, write)
    if tokenizer_sound(target):
        return target
    others = sorted((d for d in (cache_dir() / "tokenizers").glob(f"{stem}-tf*")
                     if d != target and tokenizer_sound(d)), key=_version_key, reverse=True)
    if others:
        return others[0]
    raise TokenizerConversionError(
        f"transformers {version('transformers')} converts the tokenizer of {path.name} without "
        "its BPE merges (every word would become single characters). Convert it once with a "
        "newer transformers sharing this cache (crossopd's main environment: `.venv/bin/python "
        f"-c \"from crossopd.models.hub import load_hf_tokenizer; load_hf_tokenizer('{path}')\"`); "
        "crossopd then uses that conversion here too")
