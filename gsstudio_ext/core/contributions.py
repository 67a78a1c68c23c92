"""Per-Gaussian blend-weight sums inside 2-D masks, from one multi-channel rasterization (segmentation spec §2.14.2).

For Gaussian i and pixel p the blend weight is w_i(p) = alpha_i(p) T_i(p) (what front-to-back compositing gives
that Gaussian). Rendering colours c [N, M] gives render[p, m] = sum_i w_i(p) c[i, m], so with
loss = sum_m sum_p mask[m, p] render[p, m] the gradient d loss / d c[i, m] = sum_{p in mask m} w_i(p): the
contribution of Gaussian i to mask m. One backward pass gives all N x M sums at once, on either rasterize backend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gsstudio_ext.core.rasterize import rasterize

MASK_CHANNEL_CHUNK = 32  # masks per rasterization; the footprint channel rides along (33 = a fast gsplat size)


def _check_inputs(means: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int, masks: Tensor) -> None:
    if viewmat.shape != (1, 4, 4):
        raise ValueError(f"mask_contributions: viewmat must be [1, 4, 4] (one camera), got {tuple(viewmat.shape)}")
    if K.shape != (1, 3, 3):
        raise ValueError(f"mask_contributions: K must be [1, 3, 3] (one camera), got {tuple(K.shape)}")
    if masks.dim() != 3 or masks.shape[1:] != (height, width):
        raise ValueError(f"mask_contributions: masks must be [M, H={height}, W={width}], got {tuple(masks.shape)}")
    if masks.device != means.device:
        raise ValueError(f"mask_contributions: masks are on {masks.device} but means on {means.device}")


def _contrib_chunk(
    geom: tuple[Tensor, Tensor, Tensor, Tensor],
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    weights: Tensor,
    rasterize_kwargs: dict[str, Any],
) -> Tensor:
    """One rasterization with weights.shape[0] channels -> [N, channels] sums of w_i(p) * weights[c, p]."""
    n_ch = weights.shape[0]
    kwargs = dict(rasterize_kwargs)
    kwargs.setdefault("channel_chunk", max(32, n_ch))  # gsplat: composite every channel in one pass
    with torch.inference_mode(False), torch.enable_grad():
        # tensors made under the caller's inference_mode cannot enter autograd: normal copies of them
        means, quats, scales, opacities = (t.clone() if t.is_inference() else t for t in geom)
        viewmat, K, weights = (t.clone() if t.is_inference() else t for t in (viewmat, K, weights))
        colors = torch.ones(means.shape[0], n_ch, dtype=means.dtype, device=means.device, requires_grad=True)
        render, _, _ = rasterize(means, quats, scales, opacities, colors, viewmat, K, width, height, **kwargs)
        loss = (render[0] * weights.permute(1, 2, 0)).sum()  # render [H, W, ch], weights [ch, H, W]
        (grad,) = torch.autograd.grad(loss, colors, allow_unused=True)
    return torch.zeros_like(colors, requires_grad=False) if grad is None else grad


def contributions_and_footprint(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    masks: Tensor,
    mask_channel_chunk: int = MASK_CHANNEL_CHUNK,
    **rasterize_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Blend-weight sums of every Gaussian inside each mask and over the whole image.

    Args:
        means [N, 3], quats [N, 4] (wxyz), scales [N, 3], opacities [N] (activated): the Gaussians; detached here,
            so the caller's autograd graph is untouched.
        viewmat [1, 4, 4] world-to-camera, K [1, 3, 3]: one camera.
        masks [M, H, W] bool (or float weights): the 2-D masks.
        mask_channel_chunk: masks per rasterization (M <= chunk: exactly one rasterize call).
        rasterize_kwargs: forwarded to `core.rasterize.rasterize` (near_plane, eps2d, backend, ...).

    Returns:
        contributions [N, M]: sum over mask m's pixels of w_i(p) = alpha_i(p) T_i(p);
        footprint [N]: sum over all pixels of w_i(p).
    """
    _check_inputs(means, viewmat, K, width, height, masks)
    if mask_channel_chunk < 1:
        raise ValueError(f"mask_contributions: mask_channel_chunk must be >= 1, got {mask_channel_chunk}")
    for bad in ("colors", "sh_degree", "render_mode", "backgrounds"):
        if bad in rasterize_kwargs:
            raise ValueError(f"mask_contributions: {bad!r} is set internally and cannot be passed")
    geom = (means.detach(), quats.detach(), scales.detach(), opacities.detach())
    viewmat, K = viewmat.detach().to(means.dtype), K.detach().to(means.dtype)
    weights = masks.detach().to(means.dtype)
    ones = torch.ones(1, height, width, dtype=means.dtype, device=means.device)
    n_masks = weights.shape[0]
    starts = list(range(0, n_masks, mask_channel_chunk)) or [0]
    parts: list[Tensor] = []
    footprint: Tensor | None = None
    for s in starts:
        chunk = weights[s : s + mask_channel_chunk]
        if footprint is None:  # the all-ones footprint channel rides with the first chunk
            out = _contrib_chunk(geom, viewmat, K, width, height, torch.cat([chunk, ones]), rasterize_kwargs)
            footprint = out[:, -1]
            parts.append(out[:, :-1])
        else:
            parts.append(_contrib_chunk(geom, viewmat, K, width, height, chunk, rasterize_kwargs))
    assert footprint is not None
    return torch.cat(parts, dim=1), footprint


def mask_contributions(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    masks: Tensor,
    mask_channel_chunk: int = MASK_CHANNEL_CHUNK,
    **rasterize_kwargs: Any,
) -> Tensor:
    """contributions [N, M]: per Gaussian, sum of its blend weights over each mask's pixels (see
    `contributions_and_footprint`; the footprint channel is computed in the same call and dropped)."""
    contrib, _ = contributions_and_footprint(
        means, quats, scales, opacities, viewmat, K, width, height, masks, mask_channel_chunk, **rasterize_kwargs
    )
    return contrib


def footprint(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    **rasterize_kwargs: Any,
) -> Tensor:
    """footprint [N]: per Gaussian, the sum of its blend weights over the whole image (one rasterization)."""
    empty = torch.zeros(0, height, width, dtype=torch.bool, device=means.device)
    _, fp = contributions_and_footprint(
        means, quats, scales, opacities, viewmat, K, width, height, empty, **rasterize_kwargs
    )
    return fp
