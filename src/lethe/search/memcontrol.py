"""MemControl (Dutt et al., WACV 2025): search which parts of the U-Net to fine-tune so it memorizes less.

1. Outer loop: an Optuna study, NSGA-II on two minimised objectives, samples one bit per transformer
   block (down, mid, up attentions) and a log-uniform learning rate.
2. Inner loop: the pretrained model is fine-tuned with that mask (`training/peft_masks.py`) for
   `trial_steps` steps on the target split, whose memorization subset (the planted duplicates) is
   repeated, through the same LightningModule and `fit()` as every other training.
3. Objectives: memorization = Wen's noise magnitude at random timesteps on the memorization subset
   (per image the mean over draws, then the max or mean over images); quality = the Fréchet distance
   of generations from the tune split's captions to its images, in the featurizer's feature space. Both
   read only the tune part of the data (its planted pictures and its never-trained split, seeds from
   TUNE_SEEDS), which evaluate never judges.
4. Policy: among completed trials, the lowest memorization whose FD is within `fd_tolerance` of a
   reference (full fine-tuning with the same budget, or the best trial) and whose prompt accuracy
   (the featurizer's digit agrees with the prompt's) is at most `accuracy_tolerance` below full
   fine-tuning's: a mask that leaves the model ignoring prompts has trivially low memorization.

The study lives in a storage that several workers share and that a killed run resumes from; its name
hashes every input of a trial, so a changed search never mixes with stale trials.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import torch
from optuna.storages import JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from lethe.config import Params
from lethe.data.prepared import PreparedData
from lethe.errors import LetheError, TrainingDiverged
from lethe.evaluation.metrics import TUNE_SEEDS, FeatureSpace, frechet_distance, generation_plan, quality_features
from lethe.evaluation.featurizer import Featurizer, prompt_accuracy
from lethe.files import content_hash
from lethe.memorization.noise_magnitude import magnitude_at_random_timesteps
from lethe.models.diffusion_model import build_scheduler, load_model
from lethe.paths import CHECKPOINTS, DATA, FEATURIZER, PRETRAINED, STUDIES
from lethe.progress import progress
from lethe.sampling import generate
from lethe.training.fit import CHECKPOINT_FORMAT, CaptionedImages, checkpoint_key, fit
from lethe.training.module import DiffusionTraining
from lethe.training.peft_masks import Mask, MaskedTraining, base_count, trainable_count, transformer_blocks

LOCK_GRACE_SECONDS = 30  # a journal lock left by a killed worker is taken over after this long
STUDY_VERSION = 3  # part of the study key: raise it when a change to the objectives makes old trials stale
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Inputs:
    """What every trial reads, loaded once per worker."""

    params: Params
    data: PreparedData
    blocks: list[str]
    featurizer: Featurizer | FeatureSpace  # FD's feature space, as the evaluate stage's
    memorized: list  # the memorization subset: the tune part's planted pictures (else every target picture)
    tune: list  # the tune split's pictures (never trained on, never judged): FD's prompts and reference
    holdout_pixels: torch.Tensor  # their images
    study_name: str


def study_key(params: Params) -> str:
    """A hash of everything a trial's result depends on (not n_trials or the policy: they may change)."""
    search = params.memcontrol.model_dump(
        mode="json", exclude={"n_trials", "fd_reference", "fd_tolerance", "accuracy_tolerance", "max_trainable_share",
                 "storage", "workers"})
    finetune = params.finetune.model_dump(mode="json", exclude={"steps", "lr", "checkpoint_every"})
    features = params.evaluate.model_dump(mode="json", include={"features", "features_path", "open_clip_model"})
    return checkpoint_key("memcontrol", STUDY_VERSION, search, finetune, params.sample.model_dump(mode="json"),
                          params.diffusion.model_dump(mode="json"), features,
                          *(content_hash(p) for p in (DATA, PRETRAINED, FEATURIZER)))


def load_inputs(params: Params) -> Inputs:
    data = PreparedData.load(DATA)
    tune = data.require_tune("memcontrol")
    memorized = memorization_subset(data)
    holdout_pixels = data.tensor([r.id for r in tune["holdout"]])
    return Inputs(params, data, transformer_blocks(load_model(PRETRAINED).unet),
                  quality_features(params.evaluate, holdout_pixels), memorized, tune["holdout"], holdout_pixels,
                  f"memcontrol-{study_key(params)}")


def memorization_subset(data: PreparedData) -> list:
    """The tune part's planted pictures; with none (a folder without planting), every target picture: each is
    still one a user must not leak, and the report says the subset is shared with what evaluate judges."""
    return data.tune_groups(len(data.records))["dup"] or data.pictures("target")


def subset_name(memorized: list) -> str:
    return "tune dup" if memorized[0].part == "tune" else "target (no tune dup pictures: shared with judging)"


def storage(params: Params, name: str):
    """A journal file under the stage's outputs, or the RDB URL from params (several machines)."""
    if params.memcontrol.storage:
        return RDBStorage(params.memcontrol.storage, heartbeat_interval=60, grace_period=180,
                          failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
    STUDIES.mkdir(parents=True, exist_ok=True)
    # Absolute path: optuna's lock is a symlink to the journal, and a relative target dangles, so
    # the stale lock of a killed worker could never be aged out and the next process spun forever.
    journal = str((STUDIES / f"{name}.journal").resolve())
    return JournalStorage(JournalFileBackend(journal, JournalFileSymlinkLock(journal, LOCK_GRACE_SECONDS)))


def open_study(inputs: Inputs, worker: int) -> optuna.Study:
    """Create the study or load it (resume); worker < 0: a helper process."""
    cfg = inputs.params.memcontrol
    study = optuna.create_study(storage=storage(inputs.params, inputs.study_name), study_name=inputs.study_name,
                                load_if_exists=True, directions=["minimize", "minimize"])
    # helpers and resumed runs get their own sampler seeds, or they would propose the same masks again
    seed = checkpoint_key(cfg.seed, worker, os.getpid() if worker < 0 else 0, len(study.get_trials(deepcopy=False)))
    study.sampler = optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=int(seed, 16) % 2**31)
    return study


def fine_tune(inputs: Inputs, mask: Mask | None, lr: float, checkpoints: Path):
    """The inner loop: the pretrained model fine-tuned with a mask (None: everything) for the trial budget."""
    params = inputs.params
    model = load_model(PRETRAINED)
    scheduler = build_scheduler(model, params.diffusion)
    # one process per trial: the search runs trials side by side (workers), not one trial over many devices
    cfg = params.finetune.model_copy(update={"steps": params.memcontrol.trial_steps, "lr": lr, "devices": 1,
                                             "num_nodes": 1, "strategy": "auto"})
    torch.manual_seed(cfg.seed)  # the LoRA adapters' initialisation comes before fit() seeds (as in train@memcontrol)
    module = DiffusionTraining(model, scheduler, cfg) if mask is None else MaskedTraining(model, scheduler, cfg, mask)
    records = inputs.data.training_records("target")  # planted duplicates appear dup_count times
    result = fit(module, CaptionedImages(inputs.data, records, model.text_encoder.tokenize), cfg, checkpoints)
    trainable = trainable_count(model)
    costs = {"cost/trainable_params": float(trainable), "cost/trainable_share": trainable / base_count(model),
             "cost/train_seconds": result.seconds}
    return module.trained_model(), scheduler, costs


def objectives(inputs: Inputs, model, scheduler) -> dict[str, float]:
    """Memorization (Wen's magnitude on the memorization subset) and quality (FD on the tune split), and
    the prompt accuracy of those generations where the featurizer can classify them (the policy reads it)."""
    cfg = inputs.params.memcontrol
    images = inputs.data.tensor([r.id for r in inputs.memorized])
    generator = torch.Generator().manual_seed(cfg.seed)  # every trial scores the same noisy inputs
    per_image = magnitude_at_random_timesteps(model, scheduler, images, [r.caption for r in inputs.memorized],
                                              cfg.magnitude_draws, generator).mean(dim=1)
    memorization = per_image.max() if cfg.memorization == "max" else per_image.mean()
    holdout = inputs.tune[: cfg.fd_prompts]
    prompts, seeds = generation_plan([r.caption for r in holdout], 1, TUNE_SEEDS)
    sample = inputs.params.sample.model_copy(update={"steps": cfg.sample_steps})
    generated = generate(model, scheduler, prompts, seeds, sample)
    with torch.no_grad():
        fd = frechet_distance(inputs.featurizer, inputs.holdout_pixels, generated)
    values = {"memorization": memorization.item(), "fd": fd}
    accuracy = prompt_accuracy(inputs.featurizer, generated, [r.label for r in holdout])
    return values if accuracy is None else values | {"prompt_accuracy": accuracy}


def _checkpoints(inputs: Inputs, *parts) -> Path:
    """Keyed by the trial's params, so a killed trial re-enqueued with the same params resumes its training."""
    return checkpoint_root(inputs) / checkpoint_key(CHECKPOINT_FORMAT, *parts)


def checkpoint_root(inputs: Inputs) -> Path:
    return CHECKPOINTS / f"search-{inputs.study_name}"


def _run_tags(parent_id: str, trial: str) -> dict[str, str]:
    return {"mlflow.parentRunId": parent_id, "stage": "memcontrol", "method": "memcontrol", "trial": trial}


def make_objective(inputs: Inputs, parent_id: str):
    cfg = inputs.params.memcontrol

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        bits = [trial.suggest_categorical(f"mask/{name}", [0, 1]) for name in inputs.blocks]
        lr = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
        mask = Mask.from_bits(inputs.blocks, bits, cfg.family, cfg.lora_rank, cfg.lora_alpha)
        if not mask.blocks:
            raise optuna.TrialPruned("an all-zero mask fine-tunes nothing")
        name = f"memcontrol/trial-{trial.number:03d}"
        with mlflow.start_run(run_name=name, nested=True, tags=_run_tags(parent_id, str(trial.number))) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params({**trial.params, "family": cfg.family, "blocks": ",".join(mask.blocks)})
            checkpoints = _checkpoints(inputs, trial.params)
            model, scheduler, costs = fine_tune(inputs, mask, lr, checkpoints)
            values = objectives(inputs, model, scheduler)
            mlflow.log_metrics({f"memcontrol/{k}": v for k, v in values.items()} | costs)
            shutil.rmtree(checkpoints, ignore_errors=True)
        for key, value in costs.items():
            trial.set_user_attr(key, value)
        if "prompt_accuracy" in values:
            trial.set_user_attr("prompt_accuracy", values["prompt_accuracy"])
        trial.set_user_attr("blocks", list(mask.blocks))
        return values["memorization"], values["fd"]

    return objective


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """A journal has no heartbeat: trials left running by a dead process on this host are failed and
    their params re-enqueued, so the resumed study redoes them (an RDB storage's heartbeat does this)."""
    failed = []
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner_host, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if owner_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(t.params)
        failed.append(t.number)
        if "mlflow_run_id" in t.user_attrs:
            mlflow.MlflowClient().set_terminated(t.user_attrs["mlflow_run_id"], "KILLED")
    return failed


def work(inputs: Inputs, study: optuna.Study, parent_id: str) -> int:
    """Run trials until the study holds n_trials completed (or running) ones; returns trials run here."""
    cfg = inputs.params.memcontrol
    objective, ran = make_objective(inputs, parent_id), 0
    bar = progress(total=cfg.n_trials, desc="memcontrol: trials", unit="trial")
    for _ in range(3 * cfg.n_trials):  # bounded: pruned all-zero masks and diverged trials do not count
        fail_dead_trials(study)
        states = Counter(t.state for t in study.get_trials(deepcopy=False))
        bar.update(states[TrialState.COMPLETE] - bar.n)
        if states[TrialState.COMPLETE] + states[TrialState.RUNNING] >= cfg.n_trials:
            break
        study.optimize(objective, n_trials=1, catch=(TrainingDiverged,))
        ran += 1
    bar.close()
    return ran


def reference(inputs: Inputs, study: optuna.Study, parent_id: str) -> dict[str, float]:
    """Full fine-tuning with the trials' budget and the baseline's learning rate: computed once per study."""
    if "reference" in study.user_attrs:
        return study.user_attrs["reference"]
    params = inputs.params
    with mlflow.start_run(run_name="memcontrol/full-finetune", nested=True, tags=_run_tags(parent_id, "full")):
        checkpoints = _checkpoints(inputs, "full")
        model, scheduler, costs = fine_tune(inputs, None, params.finetune.lr, checkpoints)
        values = objectives(inputs, model, scheduler) | costs
        mlflow.log_metrics({f"memcontrol/{k}" if "/" not in k else k: v for k, v in values.items()})
        shutil.rmtree(checkpoints, ignore_errors=True)
    study.set_user_attr("reference", values)
    return values


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def choose(trials: list[FrozenTrial], full: dict | None, cfg) -> tuple[FrozenTrial, str]:
    """The policy: lowest memorization whose FD is within the tolerance of the reference FD, among the
    masks small enough and (where accuracy is measured) following prompts nearly as well as the
    reference. The reference: full fine-tuning (`full`), the best trial (`best`), or (`auto`) full
    fine-tuning when some trial comes within the tolerance of it, else the best trial, so that the
    trade-off, not the lowest-FD fallback, picks the mask whenever full fine-tuning at the trial budget
    improves the base model more than any mask can."""
    if not trials:
        raise LetheError("memcontrol: the study has no completed trial to choose from; raise memcontrol.n_trials")
    allowed = [t for t in trials if t.user_attrs["cost/trainable_share"] <= cfg.max_trainable_share] or trials
    measured = [t.user_attrs["prompt_accuracy"] for t in trials if "prompt_accuracy" in t.user_attrs]
    ref_accuracy = full["prompt_accuracy"] if full and "prompt_accuracy" in full else max(measured, default=None)
    caveat = ""
    if ref_accuracy is not None:
        floor = ref_accuracy - cfg.accuracy_tolerance
        following = [t for t in allowed if t.user_attrs.get("prompt_accuracy", floor) >= floor]
        if following:
            allowed = following
        else:
            caveat = f"; no trial's prompt accuracy within {cfg.accuracy_tolerance} of {ref_accuracy:.2f}"
    best_fd = min(t.values[1] for t in allowed)
    reference = cfg.fd_reference if full else "best"
    if reference == "auto":
        reference = "full" if best_fd <= full["fd"] * (1 + cfg.fd_tolerance) else "best"
    ref = full["fd"] if reference == "full" else best_fd
    within = [t for t in allowed if t.values[1] <= ref * (1 + cfg.fd_tolerance)]
    why = f" (auto: no trial within {cfg.fd_tolerance:.0%} of full fine-tuning's {full['fd']:.3f})" \
        if cfg.fd_reference == "auto" and reference == "best" and full else ""
    if within:
        return min(within, key=lambda t: (t.values[0], t.values[1])), (
            f"lowest memorization with FD within {cfg.fd_tolerance:.0%} of the {reference} reference "
            f"({ref:.3f}){why}{caveat}")
    return min(allowed, key=lambda t: t.values[1]), (
        f"no trial within {cfg.fd_tolerance:.0%} of {ref:.3f}: lowest FD{caveat}")


def describe(trial: FrozenTrial) -> dict:
    return {"trial": trial.number, "blocks": trial.user_attrs["blocks"], "lr": trial.params["lr"],
            "memorization": trial.values[0], "fd": trial.values[1],
            "trainable_params": trial.user_attrs["cost/trainable_params"],
            "trainable_share": trial.user_attrs["cost/trainable_share"],
            "prompt_accuracy": trial.user_attrs.get("prompt_accuracy")}
