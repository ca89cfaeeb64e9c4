"""Evaluation: held-out losses per domain and the continual-learning matrix."""
