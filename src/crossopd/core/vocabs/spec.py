"""What a tokenizer reader produces: the bytes of every id and the tokenizer's own codec."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnsupportedTokenizerError(ValueError):
    """The tokenizer cannot be mapped to exact bytes per token id."""


@dataclass
class VocabSpec:
    """Everything ``ByteVocab`` needs: bytes per id (``None`` = special) and the codec."""

    pieces: list[bytes | None]
    encode_text: Callable[[str], list[int]]  # in context: no dummy prefix, no BOS/EOS
    decode: Callable[[list[int]], str]
    kind: str
    name: str = ""
    dummy_prefix: bool = False
    unk_id: int | None = None
    backend: Any = None

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
