"""The pure core: the exact byte view of every tokenizer kind, DPCA and the credit rules
(numpy and C; no models, no files but the tokenizers read)."""
