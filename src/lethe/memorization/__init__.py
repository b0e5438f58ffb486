"""Scores that say whether a prompt or an image is memorized, and nearest-neighbour search."""
