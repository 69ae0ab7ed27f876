"""Objectives that learn from given targets: the data's labels (supervised.py), teachers'
distributions on the data (distill.py) or on the student's own samples (gkd.py), and the
teachers' weights (teacher_weights.py)."""
