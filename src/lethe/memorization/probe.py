"""A quick memorization check run after fine-tuning (the evaluation stage measures the full suite).

Generations for a prompt are compared in pixel space with the images of the target and holdout
splits. `own_nn_rate`: the share of generations whose nearest image is the prompt's own image; for a
holdout prompt that image was never trained on, so its rate is what resemblance alone gives.
`nn_ratio_rate` (Gu et al.): the share whose nearest / second-nearest training image distance < 1/3.
"""

from __future__ import annotations

import numpy as np
import torch

from lethe.config import ProbeConfig, SampleConfig
from lethe.data.prepared import PreparedData
from lethe.memorization.neighbors import nearest_neighbors
from lethe.sampling import generate

NN_RATIO = 1 / 3


def probe(model, scheduler, data: PreparedData, sample_cfg: SampleConfig, cfg: ProbeConfig) -> dict[str, float]:
    groups = {g: rs for g, rs in data.prompt_groups(cfg.prompts_per_group).items() if rs}
    reference_ids = np.array([r.id for r in data.records if r.split in ("target", "holdout")])
    train_ids = np.array([r.id for r in data.split("target")])
    references, train_images = data.tensor(reference_ids), data.tensor(train_ids)
    metrics = {}
    for group, records in groups.items():
        prompts = [r.caption for r in records for _ in range(cfg.seeds_per_prompt)]
        owners = torch.tensor([r.id for r in records for _ in range(cfg.seeds_per_prompt)])
        seeds = list(range(cfg.seeds_per_prompt)) * len(records)
        images = generate(model, scheduler, prompts, seeds, sample_cfg)
        _, nearest = nearest_neighbors(images, references, k=1)
        own = torch.from_numpy(reference_ids)[nearest[:, 0]] == owners
        d, _ = nearest_neighbors(images, train_images, k=2)
        metrics[f"probe/own_nn_rate/{group}"] = own.float().mean().item()
        metrics[f"probe/nn_ratio_rate/{group}"] = (d[:, 0] < NN_RATIO * d[:, 1]).float().mean().item()
    return metrics
