"""Objectives that train text embedders (sentence-transformers' losses under their names, a file
per loss, on embedding.py's shared batch layout and evaluation)."""
