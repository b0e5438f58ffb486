"""MemControl: PEFT masks, Wen's magnitude objective, the policy, and the study's resume and workers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from lethe.errors import LetheError
from lethe.memorization.noise_magnitude import magnitude_at_random_timesteps
from lethe.models.diffusion_model import build_scheduler, load_model, save_model
from lethe.training.fit import CaptionedImages, fit
from lethe.training.peft_masks import Mask, MaskedTraining, base_count, trainable_count, transformer_blocks
from tests.conftest import SMOKE

BLOCKS = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]


def test_blocks_are_the_unets_transformer_blocks_in_order(tiny_model):
    assert transformer_blocks(tiny_model.unet) == BLOCKS


def _expected(model, family, blocks):
    """The parameter names a family must train in the given blocks, written out independently."""
    names = [n for n, _ in model.named_parameters() if any(n.startswith(f"unet.{b}.") for b in blocks)]
    if family == "lora":
        return {n for n in names if ".lora_A." in n or ".lora_B." in n}
    if family == "attention":
        return {n for n in names if (".attn1.to_" in n or ".attn2.to_" in n)}
    if family == "svdiff":  # one shift vector per weight matrix: linear layers and convolutions alike
        weights = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                   and any(n.startswith(f"unet.{b}.") for b in blocks)}
        return {f"{w}.parametrizations.weight.0.delta" for w in weights}
    norms = (".norm", "proj_in.bias", "proj_out.bias", ".bias")
    return {n for n in names if n.endswith(".gamma") or any(k in n for k in norms)}


@pytest.mark.parametrize("family", ["lora", "attention", "difffit", "svdiff"])
def test_mask_bits_train_exactly_the_named_blocks(smoke_params, tiny_data, tiny_model, tmp_path, family):
    model, bits = tiny_model, [1, 0, 0, 1]
    chosen = [b for b, bit in zip(BLOCKS, bits) if bit]
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    cfg = smoke_params.finetune.model_copy(update={"steps": 6, "lr": 5e-2, "ema_decay": 0.0, "caption_dropout": 0.0})
    module = MaskedTraining(model, build_scheduler(model, smoke_params.diffusion), cfg,
                            Mask.from_bits(BLOCKS, bits, family, lora_rank=2, lora_alpha=2.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected(model, family, chosen) and trainable
    for block in BLOCKS:  # every 1-block trains something, no 0-block anything
        assert any(n.startswith(f"unet.{block}.") for n in trainable) == (block in chosen)
    assert module.trainable_parameter_count() == trainable_count(model) < 0.2 * base_count(model)
    if family == "difffit":
        assert sum(n.endswith(".gamma") for n in trainable) == 3 * len(chosen)  # attn1, attn2, ff outputs

    dataset = CaptionedImages(tiny_data, tiny_data.training_records("target"), model.text_encoder.tokenize)
    fit(module, dataset, cfg, tmp_path / "ckpt")
    trained = module.trained_model()  # adapters and scales merged: plain weights, plain keys
    after = trained.trainable_state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(k.startswith(f"unet.{b}.") for b in chosen) for k in changed)
    assert {b for b in chosen if any(k.startswith(f"unet.{b}.") for k in changed)} == set(chosen)

    save_model(trained, tmp_path / "model", method="memcontrol")
    loaded = load_model(tmp_path / "model")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    states = trained.encode_text(trained.text_encoder.tokenize(["a one", "a two"]))
    with torch.no_grad():
        assert torch.allclose(trained.unet(x, t, encoder_hidden_states=states).sample,
                              loaded.unet(x, t, encoder_hidden_states=states).sample, atol=1e-5)


def test_magnitude_at_random_timesteps(smoke_params, tiny_data, tiny_model):
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    records = tiny_data.split("target")[:3]
    images = tiny_data.tensor([r.id for r in records])
    captions = [r.caption for r in records]
    first = magnitude_at_random_timesteps(tiny_model, scheduler, images, captions, 4, torch.Generator().manual_seed(0))
    again = magnitude_at_random_timesteps(tiny_model, scheduler, images, captions, 4, torch.Generator().manual_seed(0))
    other = magnitude_at_random_timesteps(tiny_model, scheduler, images, captions, 4, torch.Generator().manual_seed(1))
    empty = magnitude_at_random_timesteps(tiny_model, scheduler, images, [""] * 3, 4, torch.Generator().manual_seed(0))
    assert first.shape == (3, 4) and (first > 0).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.allclose(empty, torch.zeros_like(empty), atol=1e-5)  # no text, no text-conditional part


def _trial(number, memorization, fd, share, accuracy=None):
    attrs = {"cost/trainable_share": share, "cost/trainable_params": 10.0, "blocks": ["mid_block.attentions.0"]}
    trial = optuna.trial.create_trial(
        values=[memorization, fd], params={"lr": 1e-4}, distributions={"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)},
        user_attrs=attrs if accuracy is None else attrs | {"prompt_accuracy": accuracy})
    trial.number = number
    return trial


def test_policy_lowest_memorization_within_fd_tolerance(smoke_params):
    from lethe.search.memcontrol import choose

    trials = [_trial(0, 5.0, 10.0, 0.01), _trial(1, 2.0, 10.9, 0.01), _trial(2, 1.0, 11.5, 0.01), _trial(3, 0.5, 10.5, 0.5)]
    cfg = smoke_params.memcontrol.model_copy(update={"fd_tolerance": 0.1, "max_trainable_share": 0.05})
    assert choose(trials, {"fd": 10.0}, cfg)[0].number == 1  # 2 is too far in FD, 3 trains too much
    assert choose(trials, {"fd": 10.0}, cfg.model_copy(update={"max_trainable_share": 1.0}))[0].number == 3
    full = cfg.model_copy(update={"fd_reference": "full"})
    assert choose(trials, {"fd": 8.0}, full)[0].number == 0  # nothing within 10% of full fine-tuning: lowest FD
    chosen, reason = choose(trials, {"fd": 8.0}, cfg)  # auto: full fine-tuning is out of the masks' reach ...
    assert chosen.number == 1 and "best reference (10.000)" in reason  # ... so the best trial is the reference
    assert "auto: no trial within 10% of full fine-tuning's 8.000" in reason
    assert "full reference (10.000)" in choose(trials, {"fd": 10.0}, cfg)[1]  # auto, within reach: full fine-tuning
    assert choose(trials, None, cfg.model_copy(update={"fd_reference": "best", "fd_tolerance": 0.2}))[0].number == 2
    with pytest.raises(LetheError):
        choose([], None, cfg)


def test_policy_passes_over_a_mask_that_leaves_the_model_ignoring_prompts(smoke_params):
    """A mask that barely trains keeps a prompt-blind base model blind: its memorization is trivially low."""
    from lethe.search.memcontrol import choose

    trials = [_trial(0, 0.1, 10.0, 0.01, accuracy=0.10), _trial(1, 0.4, 10.2, 0.01, accuracy=0.93)]
    cfg = smoke_params.memcontrol.model_copy(update={"fd_tolerance": 0.1, "accuracy_tolerance": 0.05})
    full = {"fd": 10.0, "prompt_accuracy": 0.95}
    assert choose(trials, full, cfg)[0].number == 1
    assert choose(trials, full, cfg.model_copy(update={"accuracy_tolerance": 1.0}))[0].number == 0
    best = cfg.model_copy(update={"fd_reference": "best"})
    assert choose(trials, None, best)[0].number == 1  # the floor is then the most accurate trial's
    blind = [_trial(0, 0.1, 10.0, 0.01, accuracy=0.10), _trial(1, 0.4, 10.2, 0.01, accuracy=0.12)]
    chosen, reason = choose(blind, full, cfg)
    assert chosen.number == 0 and "no trial's prompt accuracy" in reason  # said, not silently dropped
    unmeasured = [_trial(0, 0.1, 10.0, 0.01), _trial(1, 0.4, 10.2, 0.01)]
    assert choose(unmeasured, {"fd": 10.0}, cfg)[0].number == 0  # an image folder: no labels, no accuracy


def test_bad_search_params_fail_with_the_key(tmp_path):

    raw = yaml.safe_load(SMOKE.read_text())
    for change, key in (({"lr_min": 0.01, "lr_max": 0.001}, "lr_min"), ({"family": "adapters"}, "memcontrol.family"),
                        ({"n_trials": 0}, "memcontrol.n_trials"), ({"prune": True}, "memcontrol.prune")):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({**raw, "memcontrol": {**raw["memcontrol"], **change}}))
        result = subprocess.run([sys.executable, "-m", "lethe.cli", "--params", str(path), "memcontrol"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and key in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_stale_journal_lock_from_a_killed_worker_is_taken_over(smoke_params, project, monkeypatch):
    """A worker killed inside the lock leaves its symlink behind; the next process must age it out.
    With a relative journal path the symlink dangled, its age could not be read, and resuming hung."""
    from lethe.search import memcontrol

    monkeypatch.setattr(memcontrol, "LOCK_GRACE_SECONDS", 1)
    journal = (project / memcontrol.STUDIES / "stale.journal").resolve()
    journal.parent.mkdir(parents=True)
    journal.touch()
    os.symlink(journal, f"{journal}.lock")  # what optuna's lock is, held by a process that is gone
    started = time.monotonic()
    study = optuna.create_study(study_name="stale", storage=memcontrol.storage(smoke_params, "stale"))
    assert study.study_name == "stale" and time.monotonic() - started < 30
    assert not os.path.lexists(f"{journal}.lock")


# ---- the study itself: real journal storage, real MLflow store, real training, real processes ----

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Prepared data, a pretrained model and a featurizer (smoke scale), built once for the study tests."""
    from lethe.cli import main

    root = tmp_path_factory.mktemp("base")
    shutil.copy(SMOKE, root / "params.yaml")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in ("prepare", "pretrain", "featurizer"):
            assert main([stage]) == 0
    finally:
        os.chdir(cwd)
    return root


def _project(base, root, **memcontrol):
    """A project directory holding the base's inputs, with these memcontrol params."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["memcontrol"] |= {"trial_steps": 2, "fd_prompts": 6, "magnitude_draws": 2, **memcontrol}
    for path in ("data/prepared", "models/pretrained", "models/featurizer"):
        shutil.copytree(base / path, root / path)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def _env():
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    return env


def _study(root):
    (journal,) = (root / "search/studies").glob("*.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=journal.stem, storage=storage)


def _runs(root):
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("lethe-smoke")
    return client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def killed_and_resumed(base, tmp_path_factory):
    """A helper worker killed with SIGKILL after its first finished trial, then the stage run to the end."""
    root = _project(base, tmp_path_factory.mktemp("resume"), n_trials=4)
    worker = subprocess.Popen([sys.executable, "-m", "lethe.cli", "memcontrol", "--join"], cwd=root, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, finished = time.time() + 240, []
    while time.time() < deadline and not finished and worker.poll() is None:
        time.sleep(0.2)
        if list((root / "search/studies").glob("*.journal")):
            finished = [(t.number, t.values) for t in _study(root).get_trials(states=(TrialState.COMPLETE,))]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert finished, "the worker finished no trial before the deadline"
    before = _study(root).get_trials()
    result = subprocess.run([sys.executable, "-m", "lethe.cli", "memcontrol"], cwd=root, env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, finished, before


def test_killed_study_resumes_with_its_finished_trials(killed_and_resumed):
    root, finished, before = killed_and_resumed
    assert len(finished) < 4  # killed mid-way: the resume had work left
    study = _study(root)
    complete = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(complete) == 4
    assert all(complete[number] == values for number, values in finished)  # kept, not redone
    killed = [t for t in before if t.state == TrialState.RUNNING]
    for trial in killed:  # the trial the kill interrupted is failed, and its params tried again
        assert study.trials[trial.number].state == TrialState.FAIL
        if trial.params:  # a kill between the trial's creation and its first suggest leaves nothing to retry
            assert any(t.params == trial.params for t in study.trials[trial.number + 1:])
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_stage_outputs_and_nested_runs(killed_and_resumed):
    root, _, _ = killed_and_resumed
    chosen = json.loads((root / "search/memcontrol.json").read_text())
    study = _study(root)
    assert chosen["study"] == study.study_name and chosen["blocks"] and chosen["family"] == "lora"
    assert chosen["trial"] in {t["trial"] for t in chosen["pareto_front"]} or chosen["policy"].startswith("no trial")
    assert {t.number for t in study.best_trials} == {t["trial"] for t in chosen["pareto_front"]}
    assert 0 < chosen["trainable_share"] < 0.2 and chosen["reference"]["cost/trainable_share"] == 1.0
    points = json.loads((root / "plots/memcontrol.json").read_text())
    assert len(points) == 4 and sum(p["chosen"] for p in points) == 1
    assert (root / "reports/memcontrol/pareto.png").stat().st_size > 1000
    assert not list((root / ".lethe/checkpoints").glob("*"))  # the finished stage leaves nothing to resume
    runs = _runs(root)
    (parent,) = [r for r in runs if r.info.run_name == "memcontrol"]
    assert parent.data.tags["memcontrol_study"] == study.study_name
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_runs = {r.data.tags["trial"]: r for r in children if r.data.tags["trial"] != "full"}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        run = trial_runs[str(trial.number)].data
        assert run.metrics["memcontrol/memorization"] == pytest.approx(trial.values[0])
        assert run.metrics["memcontrol/fd"] == pytest.approx(trial.values[1])
        assert run.metrics["cost/trainable_params"] > 0 and 0 < run.metrics["cost/trainable_share"] < 1
        assert run.params["lr"] == str(trial.params["lr"])
    assert any(r.data.tags["trial"] == "full" for r in children)
    assert "memcontrol/pareto.png" in [a.path for a in mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
                                        .list_artifacts(parent.info.run_id, "memcontrol")]


def _memcontrol(root, *args):
    return subprocess.Popen([sys.executable, "-m", "lethe.cli", "memcontrol", *args], cwd=root, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_shared(root, n_trials):
    study = _study(root)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert n_trials <= len(complete) <= n_trials + 1  # two workers may both start the last trial, never fewer
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.FAIL))
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    trial_runs = [r for r in _runs(root) if r.data.tags.get("trial", "").isdigit()]
    assert sorted(int(r.data.tags["trial"]) for r in trial_runs) == sorted(t.number for t in complete)
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    return complete


def test_two_workers_share_one_study(base, tmp_path_factory):
    root = _project(base, tmp_path_factory.mktemp("workers"), n_trials=4, trial_steps=4, fd_reference="best")
    workers = [_memcontrol(root, "--join", "--workers", "2") for _ in range(2)]  # two processes, started together
    outputs = [w.communicate() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    ran = [json.loads(out.strip().splitlines()[-1])["trials_run"] for out, _ in outputs]
    first = _check_shared(root, 4)
    assert all(ran) and sum(ran) == len(_study(root).trials)  # both worked; every trial either ran is stored
    assert len({t.user_attrs["worker"] for t in first}) == 2

    # the stage with --workers 2 (itself and one helper) takes the same study on to more trials
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("n_trials: 4", "n_trials: 6"))
    stage = _memcontrol(root, "--workers", "2")
    out, err = stage.communicate()
    assert stage.returncode == 0, err[-3000:]
    complete = {t.number: t.values for t in _check_shared(root, 6)}
    assert all(complete[t.number] == t.values for t in first)
    assert json.loads((root / "search/memcontrol.json").read_text())["trial"] in complete


def test_svdiff_shifts_singular_values_and_starts_at_the_weight():
    from lethe.training.peft_masks import SpectralShift

    weight = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    shift = SpectralShift(weight)
    assert torch.allclose(shift(weight), weight, atol=1e-6)  # delta = 0: the weight itself
    with torch.no_grad():
        shift.delta.copy_(torch.tensor([1.0, -2.0]))  # sigma (3, 1) -> ReLU(4, -1) = (4, 0)
    assert torch.allclose(shift(weight), torch.tensor([[4.0, 0.0], [0.0, 0.0]]), atol=1e-6)
    conv = torch.randn(4, 3, 3, 3)  # a convolution's kernel: its (4, 27) matrix, shape kept
    assert torch.allclose(SpectralShift(conv)(conv), conv, atol=1e-5)
