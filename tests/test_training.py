import lightning as L
import pytest
import torch

from lethe.errors import TrainingDiverged
from lethe.models.diffusion_model import build_scheduler
from lethe.training.fit import CaptionedImages, fit
from lethe.training.module import DiffusionTraining


class Crash(Exception):
    pass


class StopAt(L.Callback):
    """Raise at a given step, as a crash would end the process."""

    def __init__(self, step, error):
        self.step, self.error = step, error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise self.error


class PoisonAt(L.Callback):
    """Put a NaN into the weights at a given step, so the next loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.unet.conv_in.weight.fill_(float("nan"))


def setup(smoke_params, tiny_data, tiny_model, **changes):
    cfg = smoke_params.finetune.model_copy(update=changes)
    module = DiffusionTraining(tiny_model, build_scheduler(tiny_model, smoke_params.diffusion), cfg)
    dataset = CaptionedImages(tiny_data, tiny_data.training_records("target"), tiny_model.text_encoder.tokenize)
    return module, dataset, cfg


def test_loss_falls(smoke_params, tiny_data, tiny_model, tmp_path):
    module, dataset, cfg = setup(smoke_params, tiny_data, tiny_model, steps=60, lr=2e-3)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=32)))
    torch.manual_seed(1)
    before = module.per_sample_loss(batch)[0].mean().item()
    fit(module, dataset, cfg, tmp_path / "ckpt")
    torch.manual_seed(1)
    after = module.per_sample_loss(batch)[0].mean().item()
    assert after < 0.7 * before


def test_resume_continues_from_last_checkpoint(smoke_params, tiny_data, tiny_model, tmp_path):
    module, dataset, cfg = setup(smoke_params, tiny_data, tiny_model, steps=12, checkpoint_every=5)
    with pytest.raises(Crash):
        fit(module, dataset, cfg, tmp_path / "ckpt", callbacks=[StopAt(7, Crash())])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5

    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.global_step)

    result = fit(module, dataset, cfg, tmp_path / "ckpt", callbacks=[Record()])
    assert result.resumed_from is not None and result.steps == 12
    assert seen[0] == 5 and len(seen) == 7  # only the 7 missing steps ran


def test_nan_loss_stops_and_keeps_last_good_checkpoint(smoke_params, tiny_data, tiny_model, tmp_path):
    module, dataset, cfg = setup(smoke_params, tiny_data, tiny_model, steps=12, checkpoint_every=5)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 7"):
        fit(module, dataset, cfg, tmp_path / "ckpt", callbacks=[PoisonAt(7)])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_ema_weights_end_up_in_the_model(smoke_params, tiny_data, tiny_model, tmp_path):
    module, dataset, cfg = setup(smoke_params, tiny_data, tiny_model, steps=6, checkpoint_every=6, ema_decay=0.9)
    fit(module, dataset, cfg, tmp_path / "ckpt")
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    key = "model.unet.conv_in.weight"
    ema, raw = saved["state_dict"][key], saved["current_model_state"][key]
    assert not torch.allclose(ema, raw)  # the average lags the raw weights ...
    assert torch.equal(module.model.unet.conv_in.weight.detach(), ema)  # ... and is what the model keeps


def test_ema_leaves_a_frozen_weight_bit_equal(smoke_params, tiny_data, tiny_model, tmp_path):
    """A frozen weight's average must stay the weight itself (torch's EMA formula rounded it by ~1e-8, so a
    LoRA fine-tune's base weights no longer matched the base's and its export refused)."""
    module, dataset, cfg = setup(smoke_params, tiny_data, tiny_model, steps=6, checkpoint_every=6, ema_decay=0.9)
    frozen = module.model.unet.conv_in.weight
    frozen.requires_grad_(False)
    before, trained = frozen.detach().clone(), module.model.unet.conv_out.weight.detach().clone()
    fit(module, dataset, cfg, tmp_path / "ckpt")
    assert torch.equal(module.model.unet.conv_in.weight.detach(), before)
    assert not torch.equal(module.model.unet.conv_out.weight.detach(), trained)  # the others did train


def test_caption_dropout_uses_empty_prompt(smoke_params, tiny_data, tiny_model):
    module, dataset, _ = setup(smoke_params, tiny_data, tiny_model, caption_dropout=0.999)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    captured = {}
    original = module.model.encode_text
    module.model.encode_text = lambda ids: captured.setdefault("ids", ids) is not None and original(ids)
    module.per_sample_loss(batch)
    assert (captured["ids"] == module.empty_ids).all()


def test_frozen_text_encoder_gets_no_gradient(smoke_params, tiny_data, tiny_model):
    module, dataset, _ = setup(smoke_params, tiny_data, tiny_model, train_text_encoder=False)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    module.per_sample_loss(batch)[0].mean().backward()
    assert all(p.grad is None for p in module.model.text_encoder.parameters())
    assert module.model.unet.conv_in.weight.grad is not None


def test_a_resumable_run_is_keyed_by_the_files_its_method_reads(project, smoke_params):
    """A killed train@random_skip must not resume after the followed curve changed (nor train@loyal after
    select_loyal chose other skips): the checkpoint directory hashes those files' contents."""
    from lethe.methods import training_method
    from lethe.stages.fitting import checkpoint_dir

    (project / "models/pretrained").mkdir(parents=True)
    (project / "models/pretrained/config.json").write_text("{}")
    control = training_method("random_skip")
    inputs = control.inputs(smoke_params)
    assert inputs == ("models/wen_filter/skipped_per_step.json",)
    (project / "models/wen_filter").mkdir()
    (project / inputs[0]).write_text("[0.1, 0.2]")
    first = checkpoint_dir(smoke_params, "random_skip", "train", "data", inputs)
    assert checkpoint_dir(smoke_params, "random_skip", "train", "data", inputs) == first
    (project / inputs[0]).write_text("[0.1, 0.3]")
    assert checkpoint_dir(smoke_params, "random_skip", "train", "data", inputs) != first
    assert training_method("loyal").needs == ("search/loyal.json",)  # train() keys loyal by its choice


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit_without_a_warning(smoke_params, tiny_data, tiny_model,
                                                                                   tmp_path):
    import copy
    import warnings

    # caption dropout, noise and timesteps are drawn each step; EMA and AdamW carry state across steps
    changes = dict(steps=12, checkpoint_every=5, ema_decay=0.9, caption_dropout=0.3)
    fresh = [copy.deepcopy(tiny_model) for _ in range(2)]
    module, dataset, cfg = setup(smoke_params, tiny_data, tiny_model, **changes)
    fit(module, dataset, cfg, tmp_path / "whole")
    killed, dataset, cfg = setup(smoke_params, tiny_data, fresh[0], **changes)
    torch.manual_seed(123)  # the process's own RNG state must not matter
    with pytest.raises(Crash):
        fit(killed, dataset, cfg, tmp_path / "killed", callbacks=[StopAt(7, Crash())])
    resumed, dataset, cfg = setup(smoke_params, tiny_data, fresh[1], **changes)  # a new process builds it again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(resumed, dataset, cfg, tmp_path / "killed")
    assert result.resumed_from is not None and result.steps == 12
    assert not [str(w.message) for w in caught if "unreliable" in str(w.message) or "not resumable" in str(w.message)]
    whole, again = module.state_dict(), resumed.state_dict()
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[k], again[k]) for k in whole), [k for k in whole if not torch.equal(whole[k], again[k])]
