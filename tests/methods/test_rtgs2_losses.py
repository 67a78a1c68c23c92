"""RT-GS2 Stage B losses: label-smoothed CE by hand, ignored pixels, the simplex ETF geometry and CeCo."""

from __future__ import annotations

import math

import pytest
import torch

from gsstudio_ext.methods.rtgs2.losses import (
    FINETUNE_CECO_WEIGHT,
    ceco_loss,
    etf_classifier,
    rtgs2_loss,
    segmentation_loss,
)

ROWS = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]


def _two_pixels():
    """Logits Float[1, 3, 1, 2] of two pixels with classes 0 and 1."""
    logits = torch.tensor(ROWS).T.reshape(1, 3, 1, 2).contiguous()
    return logits, torch.tensor([[[0, 1]]])


def _smoothed_ce(row, target, eps):
    log_z = math.log(sum(math.exp(v) for v in row))
    nll = [log_z - v for v in row]
    return (1 - eps) * nll[target] + eps * sum(nll) / len(row)


def test_label_smoothing_ce_matches_hand_computation():
    logits, labels = _two_pixels()
    expected = 0.5 * (_smoothed_ce(ROWS[0], 0, 0.15) + _smoothed_ce(ROWS[1], 1, 0.15))
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    plain = 0.5 * (_smoothed_ce(ROWS[0], 0, 0.0) + _smoothed_ce(ROWS[1], 1, 0.0))
    assert segmentation_loss(logits, labels, label_smoothing=0.0).item() == pytest.approx(plain, abs=1e-6)


def test_ignored_pixels_do_not_count_and_all_ignored_is_zero_with_graph():
    logits, labels = _two_pixels()
    labels[0, 0, 0] = -1
    assert segmentation_loss(logits, labels).item() == pytest.approx(_smoothed_ce(ROWS[1], 1, 0.15), abs=1e-6)
    logits.requires_grad_(True)
    loss = segmentation_loss(logits, torch.full((1, 1, 2), -1))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError):
        segmentation_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long))


def test_etf_is_a_unit_simplex_with_cosine_minus_one_over_c_minus_one():
    c = 6
    etf = etf_classifier(16, c, generator=torch.Generator().manual_seed(0))
    assert tuple(etf.shape) == (16, c) and not etf.requires_grad
    assert torch.allclose(etf.norm(dim=0), torch.ones(c), atol=1e-6)
    gram = etf.T @ etf
    off = gram[~torch.eye(c, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (c - 1)), atol=1e-6)
    assert torch.allclose(etf.sum(dim=1), torch.zeros(16), atol=1e-6)  # centred
    scaled = etf_classifier(16, c, alpha=4.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(scaled, 2.0 * etf, atol=1e-6)
    other = etf_classifier(16, c, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other, etf)
    with pytest.raises(ValueError):
        etf_classifier(4, 6)


def test_ceco_lower_on_own_etf_direction_than_shuffled():
    torch.manual_seed(0)
    c, d = 5, 32
    etf = etf_classifier(d, c, generator=torch.Generator().manual_seed(0))
    small = torch.randint(0, c, (2, 8, 8))
    small[0, 0, :c] = torch.arange(c)  # every class present
    labels = small.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 32 x 32, nearest-resized back to 8 x 8
    labels[1, :4, :4] = -1
    aligned = 5.0 * etf[:, small].permute(1, 0, 2, 3) + 0.1 * torch.randn(2, d, 8, 8)
    perm = torch.tensor([1, 2, 3, 4, 0])
    shuffled = 5.0 * etf[:, perm[small]].permute(1, 0, 2, 3) + 0.1 * torch.randn(2, d, 8, 8)
    good, bad = ceco_loss(aligned, labels, etf), ceco_loss(shuffled, labels, etf)
    assert good.item() < 0.05 < 5.0 < bad.item()
    emb = torch.zeros(1, d, 8, 8, requires_grad=True)
    zero = ceco_loss(emb, torch.full((1, 32, 32), -1), etf)
    assert zero.item() == 0.0 and zero.requires_grad


def test_finetune_loss_is_ce_plus_point4_ceco():
    torch.manual_seed(0)
    logits, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 4, 4)
    labels = torch.randint(0, 4, (2, 16, 16))
    etf = etf_classifier(8, 4, generator=torch.Generator().manual_seed(0))
    out = rtgs2_loss(logits, labels, emb, etf, label_smoothing=0.0, ceco_weight=FINETUNE_CECO_WEIGHT)
    ce, ceco = segmentation_loss(logits, labels, 0.0), ceco_loss(emb, labels, etf)
    assert out["total"].item() == pytest.approx(ce.item() + 0.4 * ceco.item(), rel=1e-6)
    assert set(rtgs2_loss(logits, labels)) == {"ce", "total"}
