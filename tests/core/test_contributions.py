"""core.contributions: per-Gaussian blend-weight sums inside masks vs a brute-force per-pixel reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gsstudio_ext.core import contributions as contrib_mod
from gsstudio_ext.core.contributions import contributions_and_footprint, footprint, mask_contributions

try:  # tests/ is not a package: works both with rootdir on sys.path and with pytest's default rootdir insertion
    from tests.core.reference_rasterizer import ref_rasterization
except ImportError:  # pragma: no cover
    from reference_rasterizer import ref_rasterization

W, H = 40, 30  # not multiples of 16: partial tiles


def _scene(dtype: torch.dtype, n: int = 24, seed: int = 0):
    """Overlapping Gaussians in front of an identity camera, incl. a dense opaque cluster (T stop, alpha clamp)
    and one Gaussian behind the camera."""
    g = torch.Generator().manual_seed(seed)
    z = 2.5 + 2.5 * torch.rand(n, generator=g)
    xy = (torch.rand(n, 2, generator=g) - 0.5) * z[:, None] * torch.tensor([0.9, 0.7])
    means = torch.cat([xy, z[:, None]], dim=1)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.05), math.log(0.4), generator=g))
    opac = 0.1 + 0.85 * torch.rand(n, generator=g)
    extra_m = [[0.05 * k, -0.03 * k, 3.0 + 0.1 * k] for k in range(5)] + [[0.0, 0.0, -2.0]]
    means = torch.cat([means, torch.tensor(extra_m)])
    scales = torch.cat([scales, torch.full((6, 3), 0.3)])
    opac = torch.cat([opac, torch.tensor([1.0, 0.99, 0.98, 0.97, 1.0, 0.9])])
    quats = torch.randn(means.shape[0], 4, generator=g)
    viewmat = torch.eye(4)[None]
    K = torch.tensor([[[35.0, 0.0, W / 2 + 0.7], [0.0, 33.0, H / 2 - 0.4], [0.0, 0.0, 1.0]]])
    return [t.to(dtype) for t in (means, quats, scales, opac, viewmat, K)]


def _masks(m: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(m, H, W, generator=g) > 0.5
    masks[0] = False
    masks[0, 5:20, 8:30] = True  # one compact box
    return masks


def _brute_force(means, quats, scales, opac, viewmat, K, masks) -> tuple[np.ndarray, np.ndarray]:
    """Render one-hot colours with the float64 reference: channel i of pixel p is w_i(p); sum it per mask."""
    n = means.shape[0]
    args = [t.detach().double().numpy() for t in (means, quats, scales, opac)]
    img, _, _ = ref_rasterization(*args, np.eye(n), viewmat.double().numpy(), K.double().numpy(), W, H)
    w = img[0]  # [H, W, N]
    m = masks.double().numpy()  # [M, H, W]
    return np.einsum("hwn,mhw->nm", w, m), w.sum(axis=(0, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_brute_force(dtype: torch.dtype) -> None:
    means, quats, scales, opac, viewmat, K = _scene(dtype)
    masks = _masks(5)
    ref_c, ref_fp = _brute_force(means, quats, scales, opac, viewmat, K, masks)
    assert ref_fp.max() > 10.0 and (ref_fp == 0).any()  # non-trivial scene, with a culled Gaussian
    got_c, got_fp = contributions_and_footprint(means, quats, scales, opac, viewmat, K, W, H, masks, backend="torch")
    assert got_c.shape == (means.shape[0], 5) and got_fp.shape == (means.shape[0],)
    assert got_c.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    # float32: compare relative to the sums' size (hundreds of pixels of weight ~1 each)
    scale = 1.0 if dtype == torch.float64 else max(1.0, float(np.abs(ref_fp).max()))
    assert np.abs(got_c.double().numpy() - ref_c).max() < tol * scale
    assert np.abs(got_fp.double().numpy() - ref_fp).max() < tol * scale
    fp_only = footprint(means, quats, scales, opac, viewmat, K, W, H, backend="torch")
    torch.testing.assert_close(fp_only, got_fp)


def test_float32_absolute_error_small() -> None:
    """Spec bar: max abs error < 1e-5 against the brute force on a tiny scene (float32 inputs, small masks)."""
    means, quats, scales, opac, viewmat, K = _scene(torch.float32, n=12, seed=3)
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[0, 10:14, 15:19] = True
    masks[1, 0:3, :] = True
    masks[2, 20:24, 30:34] = True
    ref_c, _ = _brute_force(means, quats, scales, opac, viewmat, K, masks)
    got = mask_contributions(means, quats, scales, opac, viewmat, K, W, H, masks, backend="torch")
    assert np.abs(got.double().numpy() - ref_c).max() < 1e-5


def test_chunking_and_one_call_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    means, quats, scales, opac, viewmat, K = _scene(torch.float64)
    masks = _masks(7)
    calls: list[int] = []
    real = contrib_mod.rasterize

    def counting(*args, **kwargs):
        calls.append(args[4].shape[-1])  # channels of `colors`
        return real(*args, **kwargs)

    monkeypatch.setattr(contrib_mod, "rasterize", counting)
    full, fp = contributions_and_footprint(means, quats, scales, opac, viewmat, K, W, H, masks, backend="torch")
    assert calls == [8]  # 7 masks + footprint in one rasterization
    calls.clear()
    chunked, fp2 = contributions_and_footprint(
        means, quats, scales, opac, viewmat, K, W, H, masks, mask_channel_chunk=3, backend="torch"
    )
    assert calls == [4, 3, 1]
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(fp2, fp)


def test_no_gradients_to_geometry_and_caller_state_untouched() -> None:
    means, quats, scales, opac, viewmat, K = _scene(torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac)]
    with torch.no_grad():  # works inside the caller's no_grad block
        out = mask_contributions(*leaves, viewmat, K, W, H, _masks(2), backend="torch")
        assert not torch.is_grad_enabled()
    assert not out.requires_grad and out.abs().sum() > 0
    assert all(t.grad is None for t in leaves)
    # outside no_grad too: the geometry leaves never get a .grad
    out2 = mask_contributions(*leaves, viewmat, K, W, H, _masks(2), backend="torch")
    assert not out2.requires_grad and all(t.grad is None for t in leaves)
    torch.testing.assert_close(out, out2)
    with torch.inference_mode():  # a viewer/query path may call it under inference_mode
        out3 = mask_contributions(means, quats, scales, opac, viewmat, K, W, H, _masks(2), backend="torch")
    torch.testing.assert_close(out3, out)


def test_bad_inputs_raise_clear_errors() -> None:
    means, quats, scales, opac, viewmat, K = _scene(torch.float32)
    with pytest.raises(ValueError, match="masks must be"):
        mask_contributions(means, quats, scales, opac, viewmat, K, W, H, torch.zeros(2, H + 1, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="viewmat must be"):
        mask_contributions(means, quats, scales, opac, viewmat[0], K, W, H, _masks(2))
    with pytest.raises(ValueError, match="set internally"):
        mask_contributions(means, quats, scales, opac, viewmat, K, W, H, _masks(2), sh_degree=0)
