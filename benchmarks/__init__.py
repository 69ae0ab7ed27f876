"""Benchmark scripts, a folder per question (speed/, quality/, memory/, parity/, faults/), and
what they share (common.py, callbacks.py). Run a script by its path from the repository root;
each puts the repository on sys.path so `benchmarks.*` imports resolve."""
