"""Benchmark scripts, a folder per question, and what they share (harness.py, callbacks.py); run
one by its path from the repository root (benchmarks/README.md)."""
