"""Plain fine-tuning of the pretrained model on the target split: the reference every mitigation is compared
with, and its A/A replicates, the same fine-tuning at other training seeds, whose spread is the training-run
noise in every comparison (lethe.evaluation.runs)."""

from lethe.declarations import TrainingMethod

METHOD = TrainingMethod("baseline", "plain fine-tuning")


def replicate(offset: int) -> TrainingMethod:
    return TrainingMethod(f"baseline_seed{offset}", f"plain fine-tuning at finetune.seed + {offset} (A/A)",
                          seed_offset=offset)
