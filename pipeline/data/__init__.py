"""Data sources, the dataset index and deterministic preprocessing."""
