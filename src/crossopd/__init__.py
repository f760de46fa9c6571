"""crossopd: on-policy distillation across LLM families with exact cross-tokenizer alignment."""

from crossopd.align import Alignment, align
from crossopd.credit import assign_credit
from crossopd.tokens import ByteVocab, UnsupportedTokenizerError

__all__ = ["Alignment", "ByteVocab", "UnsupportedTokenizerError", "align", "assign_credit"]
__version__ = "0.1.0"
