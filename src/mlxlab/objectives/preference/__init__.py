"""Objectives that learn from human preference: pairs (preference.py: DPO, IPO, SimPO, ORPO),
unpaired thumbs up or down (kto.py), and a reward model scoring them (reward.py)."""
