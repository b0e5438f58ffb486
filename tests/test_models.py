import torch

from lethe.config import ModelConfig, SampleConfig, TrainConfig
from lethe.models.diffusion_model import build_model, build_scheduler, load_model, save_model
from lethe.models.text import corpus_vocabulary
from lethe.sampling import generate
from lethe.training.module import DiffusionTraining
from tests.tiny_sd import build_tiny_sd


def test_pixel_model_shapes(tiny_model):
    ids = tiny_model.text_encoder.tokenize(["a bold thin handwritten one from a ledger", ""])
    states = tiny_model.encode_text(ids)
    assert states.shape == (2, 24, 32)
    out = tiny_model.unet(torch.randn(2, 1, 16, 16), torch.tensor([5, 900]), encoder_hidden_states=states).sample
    assert out.shape == (2, 1, 16, 16)


def test_text_encoder_vocabulary_is_compact(tiny_model):
    text = tiny_model.text_encoder
    assert text.token_embedding.num_embeddings < 200  # not CLIP's 49,408 rows
    known, unknown = text.tokenize(["a bold one"]), text.tokenize(["a zebra one"])
    rows_known, rows_unknown = text.row_of[known[0]], text.row_of[unknown[0]]
    assert (rows_known[:5] > 1).all() and (rows_unknown == 1).any()


def test_save_load_round_trip_is_exact(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path)
    again = load_model(tmp_path)
    ids = tiny_model.text_encoder.tokenize(["a neat wide handwritten two from a receipt"])
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([300])
    with torch.no_grad():
        a = tiny_model.unet(x, t, encoder_hidden_states=tiny_model.encode_text(ids)).sample
        b = again.unet(x, t, encoder_hidden_states=again.encode_text(ids)).sample
    assert torch.equal(a, b)


def test_latent_path_trains_and_samples(tmp_path):
    path = build_tiny_sd(tmp_path / "sd")
    model = build_model(ModelConfig(kind="latent", pretrained_path=str(path)), 16, 3)
    assert model.sample_shape == (4, 8, 8)
    scheduler = build_scheduler(model, None)
    assert scheduler.config.beta_schedule == "scaled_linear"  # the checkpoint's own schedule
    module = DiffusionTraining(model, scheduler, TrainConfig(train_text_encoder=False))
    batch = {"images": torch.rand(2, 3, 16, 16) * 2 - 1, "ids": model.text_encoder.tokenize(["a red cube", "a dog"])}
    losses, t = module.per_sample_loss(batch)
    losses.mean().backward()
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    assert model.unet.conv_in.weight.grad is not None
    assert all(p.grad is None for p in model.text_encoder.parameters())  # frozen CLIP
    assert all(p.grad is None for p in model.vae.parameters())
    images = generate(model, scheduler, ["a red cube"], [0], SampleConfig(steps=3))
    assert images.shape == (1, 3, 16, 16) and images.abs().max() <= 1
    save_model(model, tmp_path / "saved")
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in model.trainable_state_dict())
    reloaded = load_model(tmp_path / "saved")
    assert torch.equal(reloaded.unet.conv_in.weight, model.unet.conv_in.weight)


def test_corpus_vocabulary_has_start_and_end():
    vocab = corpus_vocabulary(["a one"])
    assert 49406 in vocab and 49407 in vocab and len(vocab) == 4
