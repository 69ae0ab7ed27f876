"""Rerankers: a cross-encoder's losses under sentence-transformers' names, and the objective."""
