"""Denoiser and text-encoder factories for the pixel and latent (Stable Diffusion) paths."""
