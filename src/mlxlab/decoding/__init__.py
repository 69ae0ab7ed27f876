"""Decoding a model token by token: sampling through mlx-lm (generation.py), batched greedy
decoding (batched_greedy.py) and speculative decoding with a draft model (speculative.py).
Modules import their siblings, not this package."""
