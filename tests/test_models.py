import pytest
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


def test_padding_with_the_end_token_as_stable_diffusions_clip_does(tmp_path):
    cfg = ModelConfig(text={"width": 32, "layers": 1, "heads": 2, "context_length": 12, "pad_with_end": True})
    vocabulary = corpus_vocabulary(["a bold one"])
    model = build_model(cfg, 16, 1, vocabulary)
    ids = model.text_encoder.tokenize(["a bold one", ""])
    end = model.text_encoder.end_token_id
    assert ids[0, 4:].eq(end).all() and ids[1, 1:].eq(end).all()  # start, 3 words, then end tokens only
    assert not ids.eq(0).any()
    save_model(model, tmp_path / "m")
    assert torch.equal(load_model(tmp_path / "m").text_encoder.tokenize(["a bold one"]), ids[:1])  # kept on load
    plain = build_model(ModelConfig(text={"width": 32, "layers": 1, "heads": 2, "context_length": 12}), 16, 1, vocabulary)
    assert plain.text_encoder.tokenize(["a bold one"])[0, 5:].eq(0).all()  # the default: a pad row


def test_stable_diffusions_schedule_leaves_more_signal_at_the_last_steps():
    """SD's scaled-linear betas from 0.00085 to 0.012 leave alpha-bar ~5.8e-3 at t = 981; DDPM's linear 1e-4 to
    0.02 leaves ~1e-4 at t = 960: the first sampling step's text-dependent signal is that much smaller."""
    from lethe.config import DiffusionConfig

    model = type("Pixel", (), {"vae": None})()
    sd = build_scheduler(model, DiffusionConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    ddpm = build_scheduler(model, DiffusionConfig())
    assert abs(float(sd.alphas_cumprod[981]) - 5.8e-3) < 0.3e-3
    assert float(ddpm.alphas_cumprod[960]) < 2e-4
    with pytest.raises(ValueError, match="beta_start"):
        DiffusionConfig(beta_start=0.02, beta_end=0.01)


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


def test_cross_attention_layers_come_in_the_order_a_forward_pass_visits_them(tiny_model):
    """A layer index (MemAttn's E layer, its training filter's layer) counts in forward order; named_modules
    lists the mid block after the up blocks."""
    from lethe.memorization.attention import cross_attention_layers

    layers, visited = cross_attention_layers(tiny_model.unet), []
    hooks = [m.register_forward_hook(lambda mod, *_, name=name: visited.append(name)) for name, m in layers.items()]
    x = torch.randn(1, *tiny_model.sample_shape)
    tiny_model.unet(x, 10, encoder_hidden_states=tiny_model.encode_text(tiny_model.text_encoder.tokenize(["a 3"])))
    for h in hooks:
        h.remove()
    assert visited == list(layers) and any("mid_block" in n for n in layers) and any("up_blocks" in n for n in layers)


def test_forward_order_keeps_a_wrapped_or_routed_unets_modules_together():
    from lethe.models.diffusion_model import in_forward_order

    assert in_forward_order(["down_blocks.1", "up_blocks.0", "mid_block", "conv_in"]) == ["down_blocks.1", "mid_block", "up_blocks.0", "conv_in"]
    routed = ["high.down_blocks.1", "high.up_blocks.0", "high.mid_block", "low.down_blocks.1", "low.up_blocks.0", "low.mid_block"]
    assert in_forward_order(routed) == ["high.down_blocks.1", "high.mid_block", "high.up_blocks.0",
                                        "low.down_blocks.1", "low.mid_block", "low.up_blocks.0"]
