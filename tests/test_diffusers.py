"""Diffusion models we did not write, from diffusers' own classes (tiny configs, random weights),
trained the way their users train them — a denoising loss per example — against brute force.

UNet2DModel (ResNet blocks with GroupNorm, self-attention, a timestep embedding per example),
UNet2DConditionModel (cross-attention to per-example text states), DiTTransformer2DModel (adaptive
LayerNorm from the timestep and a class label dropped at random for classifier-free guidance)
and AutoencoderKL: exact per example and by sub-batch. The forward draws random numbers (the
label dropout), so every forward — the measured one and each brute-force one — starts from the
same seed."""

from __future__ import annotations

import warnings

import pytest
import torch

from test_subbatch import assert_exact_both_modes

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("float64_default")

N = 4


def _unet():
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
    )  # fmt: skip


def _conditional_unet():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
        cross_attention_dim=12, attention_head_dim=4,
    )  # fmt: skip


def _dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    )  # fmt: skip


def _vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=2,
        norm_num_groups=4, sample_size=8,
    )  # fmt: skip


g = torch.Generator().manual_seed(1)
X = torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64)
T = torch.randint(0, 10, (N,), generator=g)
TARGET = torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64)
TEXT = torch.randn(N, 5, 12, generator=g, dtype=torch.float64)
LABELS = torch.randint(0, 10, (N,), generator=g)

MODELS = {
    "UNet2DModel": (_unet, lambda m: m(X, T).sample),
    "UNet2DConditionModel": (
        _conditional_unet,
        lambda m: m(X, T, encoder_hidden_states=TEXT).sample,
    ),
    "DiTTransformer2DModel": (_dit, lambda m: m(X, timestep=T, class_labels=LABELS).sample),
    "AutoencoderKL": (_vae, lambda m: m(X, sample_posterior=False).sample),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_diffusers_model_is_exact(name):
    build, forward = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (diffusers' deprecation notices)
        model = build().train()

    def losses():
        torch.manual_seed(5)  # the same random draws in every forward (label dropout)
        return (forward(model) - TARGET).pow(2).flatten(1).mean(1)

    assert_exact_both_modes(model, losses, N)
