"""Hypothesis strategies for text that stresses tokenizers."""

from __future__ import annotations

import unicodedata

from hypothesis import strategies as st

HARD = [
    "👨\u200d👩\u200d👧\u200d👦",
    "👩\u200d💻",
    "🇫🇷",
    "👋🏽",
    "❤\ufe0f",
    "机器学习",
    "東京の天気",
    "안녕하세요",
    "مرحبا بالعالم",
    "שלום",
    "e\u0301",
    "ñ",
    "Å",
    "\r\n",
    "\t",
    "    ",
    "\n\n\n",
    "<think>",
    "</think>",
    "<|im_end|>",
    "<end_of_turn>",
    " the",
    "Hello",
    "1234567890",
    "3.14159",
    "naïve",
    "ﬁ",
    "Ⅻ",
    "½",
    "\u00a0",
    "\u200b",
    "𝔘𝔫𝔦",
    "ẞ",
]

_chars = st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\ufffd\x00")


@st.composite
def texts(draw, max_parts: int = 12) -> str:
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(HARD),
                st.text(alphabet=_chars, max_size=8),
                st.from_regex(r"[0-9]{1,24}", fullmatch=True),
                st.from_regex(r"[ \t\r\n]{1,6}", fullmatch=True),
                st.text(alphabet="abcdefghij XYZ.,!?", max_size=12),
            ),
            max_size=max_parts,
        )
    )
    text = "".join(parts)
    form = draw(st.sampled_from([None, "NFC", "NFD"]))
    return unicodedata.normalize(form, text) if form else text
