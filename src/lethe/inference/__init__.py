"""Inference-time mitigations: packaged inside a model's config, applied by `lethe.sampling.generate`."""
