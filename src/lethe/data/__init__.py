"""Datasets: the embedded digits, a user's image folder, splits and planted duplicates."""
