"""SentencePiece ``.model`` files (Mistral v1-v7, Llama 2) and ``SentencePieceProcessor``s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crossopd.core.vocabs.spec import BYTE_TOKEN, UnsupportedTokenizerError, VocabSpec


def from_sentencepiece_file(path: Path, name: str = "") -> VocabSpec:
    return from_sp_proto(Path(path).read_bytes(), name=name or str(path))


def from_sp_proto(serialized: bytes, name: str) -> VocabSpec:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(serialized)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError family
        raise UnsupportedTokenizerError(
            f"{name}: not a SentencePiece model, tiktoken rank file, GGUF or tokenizer JSON ({e})"
        ) from e
    if not proto.pieces:
        raise UnsupportedTokenizerError(f"{name}: SentencePiece model has no pieces")
    full = spm.SentencePieceProcessor(model_proto=serialized)
    dummy = bool(proto.normalizer_spec.add_dummy_prefix)
    # The in-context encoder: no dummy prefix, whitespace runs kept as they are.
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    enc = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    pieces, unk_id = pieces_from_sentencepiece(proto)
    return VocabSpec(
        pieces,
        enc.encode,
        full.decode,
        kind="sentencepiece",
        name=name,
        dummy_prefix=dummy,
        unk_id=unk_id,
        backend=full,
    )


# ------------------------------------------------------------------ bytes per id, per kind


def pieces_from_sentencepiece(model_proto: Any) -> tuple[list[bytes | None], int | None]:
    """Pieces from a SentencePiece ModelProto (types: 1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte)."""
    pieces: list[bytes | None] = []
    unk_id = None
    for i, p in enumerate(model_proto.pieces):
        if p.type == 6:
            m = BYTE_TOKEN.match(p.piece)
            pieces.append(bytes([int(m.group(1), 16)]) if m else None)
        elif p.type in (2, 3, 5):
            pieces.append(None)
            if p.type == 2:
                unk_id = i
        else:
            pieces.append(p.piece.replace("▁", " ").encode("utf-8"))
    return pieces, unk_id
