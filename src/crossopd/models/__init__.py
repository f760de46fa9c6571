"""Models at the edge: loading tokenizers and models from wherever they are, log-probs of
realised tokens, and sampling."""
