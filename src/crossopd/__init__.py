"""crossopd: on-policy distillation across LLM families with exact cross-tokenizer alignment.

The public Python surface (docs/architecture.md): ``ByteVocab``, ``align``, ``assign_credit``
and ``Alignment`` here, and the credit-rule registry users extend as ``crossopd.credit``.
"""

import sys

from crossopd.core import credit
from crossopd.core.align import Alignment, align
from crossopd.core.credit import assign_credit
from crossopd.core.tokens import ByteVocab, UnsupportedTokenizerError

# ``crossopd.credit`` is the registry's public path (``from crossopd.credit import
# register_rule``); the module itself lives in the core layer
sys.modules.setdefault("crossopd.credit", credit)

__all__ = ["Alignment", "ByteVocab", "UnsupportedTokenizerError", "align", "assign_credit",
           "credit"]
__version__ = "0.1.0"
