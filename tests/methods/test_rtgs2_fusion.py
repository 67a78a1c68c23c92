"""RT-GS2 VDVI fusion network: MiT stages, output shapes at odd sizes, the feature stream reaching the logits, the
full-size default once, and a tiny net overfitting a set whose classes are visible only in the feature channels."""

from __future__ import annotations

import pytest
import torch

from gsstudio_ext.methods.rtgs2.fusion import FusionNet, FusionNetConfig, channel_shuffle
from gsstudio_ext.methods.rtgs2.losses import segmentation_loss
from gsstudio_ext.methods.rtgs2.mit import MiT, MiTConfig


def test_mit_stages_compose_and_b0_defaults():
    b0 = MiTConfig()
    assert (b0.embed_dims, b0.num_heads, b0.depths, b0.sr_ratios) == (
        (32, 64, 160, 256),
        (1, 2, 5, 8),
        (2, 2, 2, 2),
        (8, 4, 2, 1),
    )
    torch.manual_seed(0)
    mit = MiT(MiTConfig.tiny(in_channels=8)).eval()
    x = torch.randn(2, 8, 64, 96)
    with torch.no_grad():
        outs = mit(x)
        y = x
        for i in range(4):
            y = mit.forward_stage(i, y)
            assert torch.equal(y, outs[i])
    assert [tuple(o.shape) for o in outs] == [(2, 16, 16, 24), (2, 24, 8, 12), (2, 32, 4, 6), (2, 48, 2, 3)]
    # stochastic depth rises linearly to the configured rate
    rates = [blk.drop_path.p for stage in MiT(MiTConfig()).stages for blk in stage.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def test_channel_shuffle_interleaves_halves():
    x = torch.arange(4.0).view(1, 4, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_tiny_fusion_odd_size_shapes_and_feature_resize():
    torch.manual_seed(0)
    net = FusionNet(FusionNetConfig.tiny(num_classes=5, feature_channels=8))
    out = net(torch.rand(2, 3, 50, 70), torch.rand(2, 8, 25, 35))  # features at half size: resized
    assert tuple(out.logits.shape) == (2, 5, 50, 70)
    assert tuple(out.embedding.shape) == (2, 32, 13, 18)
    assert sorted(net.fusions.keys()) == ["2", "3", "4"]
    out.logits.mean().backward()
    assert net.feature_encoder.stages[0].patch_embed.proj.weight.grad.abs().sum() > 0
    assert net.rgb_encoder.stem[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="features must have shape"):
        net(torch.rand(1, 3, 32, 32), torch.rand(1, 7, 32, 32))
    with pytest.raises(ValueError, match="fuse_stages"):
        FusionNet(FusionNetConfig(num_classes=3, fuse_stages=(0, 2)))


def test_features_change_the_logits_and_zero_features_run():
    torch.manual_seed(0)
    net = FusionNet(FusionNetConfig.tiny(num_classes=4, feature_channels=8)).eval()
    rgb = torch.rand(1, 3, 40, 48)
    f1, f2 = torch.randn(1, 8, 40, 48), torch.randn(1, 8, 40, 48)
    with torch.no_grad():
        a, b = net(rgb, f1).logits, net(rgb, f2).logits
        z = net(rgb, torch.zeros(1, 8, 40, 48)).logits
    assert (a - b).abs().max() > 1e-3
    assert torch.isfinite(z).all() and tuple(z.shape) == (1, 4, 40, 48)


def test_default_full_size_network_once_at_64():
    torch.manual_seed(0)
    net = FusionNet(FusionNetConfig()).eval()
    assert net.rgb_encoder.widths == (96, 192, 384, 768)
    assert net.feature_encoder.widths == (32, 64, 160, 256)
    assert net.feature_encoder.stages[0].patch_embed.proj.in_channels == 32
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 64), torch.rand(1, 32, 64, 64))
    assert tuple(out.logits.shape) == (1, 46, 64, 64)
    assert tuple(out.embedding.shape) == (1, 256, 16, 16)
    assert torch.isfinite(out.logits).all()


def test_tiny_fusion_overfits_classes_seen_only_in_features():
    """Classes live in the feature channels (a code vector per class + noise); rgb is fresh noise every step."""
    torch.manual_seed(0)
    classes, channels, size = 4, 8, 32
    codes = torch.randn(classes, channels)
    blocks = torch.randint(0, classes, (4, size // 8, size // 8))
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    feats = codes[labels].permute(0, 3, 1, 2) + 0.1 * torch.randn(4, channels, size, size)
    net = FusionNet(FusionNetConfig.tiny(classes, channels))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    first = None
    for _ in range(150):
        loss = segmentation_loss(net(torch.rand(4, 3, size, size), feats).logits, labels, label_smoothing=0.0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(torch.rand(4, 3, size, size), feats).logits.argmax(1) == labels).float().mean().item()
    assert loss.item() < 0.25 * first
    assert acc > 0.9
