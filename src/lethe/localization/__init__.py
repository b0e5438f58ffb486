"""NeMo: find the cross-attention value neurons that carry a memorized prompt, and deactivate them."""
