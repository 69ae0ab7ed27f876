"""The same result as a reference implementation: the same text, ids, scores or tokens."""
