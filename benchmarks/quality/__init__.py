"""How good: accuracy and loss of a run, beside a baseline trained or scored on the same data."""
