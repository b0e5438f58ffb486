import torch

from lethe.config import SampleConfig
from lethe.models.diffusion_model import build_scheduler
from lethe.sampling import generate, save_grid


def test_seed_per_prompt_repeats_across_batches(smoke_params, tiny_model):
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    cfg = SampleConfig(steps=3, batch_size=2)
    prompts = ["a bold thin handwritten one from a ledger", "a neat wide handwritten two from a receipt", "a tall one"]
    together = generate(tiny_model, scheduler, prompts, [0, 1, 2], cfg)
    alone = generate(tiny_model, scheduler, prompts[1:2], [1], SampleConfig(steps=3, batch_size=8))
    assert together.shape == (3, 1, 16, 16)
    assert torch.allclose(together[1], alone[0], atol=1e-3)  # batch size changes float rounding only
    other_seed = generate(tiny_model, scheduler, prompts[1:2], [7], cfg)
    assert not torch.allclose(other_seed[0], alone[0])


def test_guidance_changes_the_image(smoke_params, tiny_model):
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    prompt = ["a bold thin handwritten one from a ledger"]
    a = generate(tiny_model, scheduler, prompt, [0], SampleConfig(steps=3, guidance_scale=1.0))
    b = generate(tiny_model, scheduler, prompt, [0], SampleConfig(steps=3, guidance_scale=5.0))
    assert not torch.allclose(a, b)


def test_bf16_sampling_moves_images_by_rounding_only(smoke_params, tiny_model):
    """bf16-mixed runs the U-Net in bf16 (8 bits of mantissa): the images move, by far less than a seed does,
    and come back in float32."""
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    prompts, seeds = ["a bold thin handwritten one from a ledger", "a tall one"], [0, 1]
    full = generate(tiny_model, scheduler, prompts, seeds, SampleConfig(steps=5))
    half = generate(tiny_model, scheduler, prompts, seeds, SampleConfig(steps=5, precision="bf16-mixed"))
    other = generate(tiny_model, scheduler, prompts, [2, 3], SampleConfig(steps=5))
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    assert (half - full).abs().mean() < 0.1 * (other - full).abs().mean()


def test_grid_png(tmp_path):
    from PIL import Image

    save_grid(torch.rand(6, 1, 16, 16) * 2 - 1, tmp_path / "g.png", nrow=3)
    with Image.open(tmp_path / "g.png") as image:
        assert image.size[0] > image.size[1] > 0
