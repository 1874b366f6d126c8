"""cascade: a speculative cascade runtime (placeholder docstring; the vocabulary lands with the engine)."""
