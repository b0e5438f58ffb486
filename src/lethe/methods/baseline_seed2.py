"""The baseline trained again at finetune.seed + 2: an A/A replicate (lethe.evaluation.runs)."""

from lethe.methods.baseline import replicate

METHOD = replicate(2)
