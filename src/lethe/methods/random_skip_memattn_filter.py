"""The control of MemAttn's training-time filter: plain fine-tuning that drops at each step the share
`memattn_filter` skipped, at random instead of by attention entropy."""

from __future__ import annotations

from lethe.training.random_skip import control

METHOD = control("memattn_filter")
