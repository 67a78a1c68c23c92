"""Perceptual distance (LPIPS): the tiny backend's properties, and the LPIPS-VGG loading path checked against
torchmetrics' LPIPS on the same (random) VGG16 weights, with the real v0.1 linear heads shipped by torchmetrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.perceptual import (
    VGG16_URL,
    LpipsVggConfig,
    TinyPerceptualConfig,
    lpips_linear_weights,
    packaged_lpips_weights,
)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return torch.stack([x, y, 0.5 + 0.4 * torch.sin(12 * x * y)])[None]


def test_tiny_distance_is_zero_for_identical_images_and_grows_with_noise(image: torch.Tensor):
    lpips = TinyPerceptualConfig().setup()
    assert lpips.distance(image, image).tolist() == [0.0]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(image.shape, generator=gen)
    d = [float(lpips.distance(image, (image + s * noise).clamp(0, 1))) for s in (0.01, 0.03, 0.1, 0.3)]
    assert 0 < d[0] < d[1] < d[2] < d[3]  # measured: 0.0033, 0.025, 0.20, 0.93
    noisy = (image + 0.1 * noise).clamp(0, 1)
    assert float(lpips.distance(noisy, image)) == pytest.approx(d[2], rel=1e-6)  # symmetric
    batch = lpips.distance(torch.cat([image, noisy]), image)  # a batch of 1 broadcasts
    assert batch.shape == (2,) and batch[0] == 0 and float(batch[1]) == pytest.approx(d[2], rel=1e-5)
    other = TinyPerceptualConfig(seed=1).setup().distance(noisy, image)
    assert float(other) != pytest.approx(d[2], rel=1e-3)  # the seed picks the network


def test_tiny_distance_is_differentiable_and_checks_inputs(image: torch.Tensor):
    lpips = TinyPerceptualConfig(resize=32).setup()
    x = (image * 0.9).requires_grad_(True)
    lpips.distance(x, image).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in lpips.model.parameters())  # frozen network
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lpips.distance(image * 2, image)
    with pytest.raises(ValueError, match="matching shapes"):
        lpips.distance(image, image[..., :32])


def test_lpips_vgg_matches_torchmetrics_on_the_same_weights(image: torch.Tensor, tmp_path: Path):
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    torch.manual_seed(0)
    reference = _NoTrainLpips(net="vgg", pnet_rand=True)  # random VGG16 (no download), the real v0.1 heads
    state = {f"features.{k.split('.', 1)[1]}": v for k, v in reference.net.state_dict().items()}
    torch.save(state, tmp_path / "vgg16.pth")  # torchvision layout, as vgg16-397923af.pth
    ours = LpipsVggConfig(backbone_weights=tmp_path / "vgg16.pth").setup()
    gen = torch.Generator().manual_seed(1)
    other = (image + 0.1 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    d = ours.distance(torch.cat([image, other]), image)
    expected = reference(torch.cat([image, other]), image.expand(2, -1, -1, -1), normalize=True).flatten()
    assert d[0] == 0 and torch.allclose(d, expected, rtol=1e-4, atol=1e-7)
    heads = lpips_linear_weights(packaged_lpips_weights("vgg"))
    assert [h.numel() for h in heads] == [64, 128, 256, 512, 512] and min(float(h.min()) for h in heads) >= 0


def test_lpips_vgg_without_backbone_weights_says_where_to_get_them(tmp_path: Path):
    lpips = LpipsVggConfig(cache_dir=tmp_path).setup()
    with pytest.raises(MissingWeightsError) as info:
        lpips.distance(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    assert VGG16_URL in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(MissingWeightsError, match="no such file"):
        LpipsVggConfig(backbone_weights=tmp_path / "missing.pth").setup().load()
