"""How much memory, and what a run does when it runs out."""
