"""Plain fine-tuning of the pretrained model on the target split: the reference every mitigation is compared with."""

from lethe.declarations import TrainingMethod

METHOD = TrainingMethod("baseline", "plain fine-tuning")
