"""lethe: train text-to-image diffusion models, measure what they memorize, and mitigate it."""

__version__ = "0.2.0"
