"""RoMaP's per-Gaussian label field (editing-methods.md §2.3) and its mask rules M3D / M2D (§2.4).

Parts are encoded as RGB prototype colours: part j (1-based, in seg-list order) has prototype ``l_j``, background is
black (row 0). Each Gaussian carries label SH coefficients ``r_i`` shaped like colour SH, ``[N, (L+1)^2, 3]`` (DC
first); from camera centre ``o`` its label colour is ``r_i^phi = max(SH_L(r_i, d_i) + 0.5, 0)`` with
``d_i = (mu_i - o) / |mu_i - o|``, splatted with the scene's opacities and covariances on black.

Mask assignment is exclusive in list order: a Gaussian or pixel already given to an earlier part is never reassigned
(the README's "list smaller parts first").
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from gsstudio_ext.core.rasterize import rasterize
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import RGB2SH, num_sh_bases, sh_to_view_colors

PROTOTYPE_COLORS = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.0, 1.0),
)
"""The six fixed part prototypes of the official code, in order; parts after the sixth get seeded random colours."""

SEG_3D_THRESHOLD = 1.0
"""M3D: summed L1 distance to the prototype below which a Gaussian belongs to a part (code ``seg_3d_threshold``)."""
SEG_2D_THRESHOLD = 0.34
"""M2D: channel-mean distance to the prototype below which a pixel belongs to a part (code ``seg_2d_threshold``)."""


def part_prototypes(
    num_parts: int, seed: int = 0, device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Prototype colours Float[P+1, 3]: row 0 = background black, rows 1..6 = :data:`PROTOTYPE_COLORS` in order,
    further rows uniform random colours in [0, 1]^3 drawn from ``seed`` (the same for every call)."""
    if num_parts < 0:
        raise ValueError(f"num_parts must be >= 0, got {num_parts}")
    fixed = torch.tensor(PROTOTYPE_COLORS[: min(num_parts, len(PROTOTYPE_COLORS))], dtype=torch.float64).view(-1, 3)
    extra = max(num_parts - len(PROTOTYPE_COLORS), 0)
    gen = torch.Generator().manual_seed(int(seed))
    random = torch.rand(extra, 3, generator=gen, dtype=torch.float64)
    table = torch.cat([torch.zeros(1, 3, dtype=torch.float64), fixed, random], dim=0)
    return table.to(device=device, dtype=dtype)


def label_colors(means: Tensor, label_sh: Tensor, viewmats: Tensor, degree: int) -> Tensor:
    """Label colours Float[C, N, 3] = max(SH_L(r_i, d_i) + 0.5, 0) of label SH Float[N, (L+1)^2, 3] (DC first) for
    Gaussians at means Float[N, 3] seen from world-to-camera viewmats Float[C, 4, 4]."""
    return sh_to_view_colors(means, label_sh, viewmats, degree)


def init_label_sh(
    num: int,
    degree: int,
    init_color: float = 0.5,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial label SH Float[num, (degree+1)^2, 3]: rest zero, DC chosen so every label colour starts at
    ``init_color`` per channel.

    The spec's "label DC = 0.5" is read as the rendered colour 0.5 (mid-grey), i.e. a DC coefficient of
    RGB2SH(0.5) = 0. The code-literal reading (coefficient 0.5, colour 0.5 * C0 + 0.5 = 0.641) is
    ``init_color=SH2RGB(0.5)``.
    """
    sh = torch.zeros(num, num_sh_bases(degree), 3, device=device, dtype=dtype)
    sh[:, 0, :] = RGB2SH(torch.tensor(float(init_color), dtype=torch.float64)).item()
    return sh


def labels_to_sh(labels: Tensor, prototypes: Tensor, degree: int) -> Tensor:
    """Hard labels Long[N] (0 = background) -> label SH Float[N, (degree+1)^2, 3] whose colour is the prototype
    ``prototypes[labels]`` from every view (rest zero), so hard assignments render like a fitted label field."""
    sh = prototypes.new_zeros(labels.shape[0], num_sh_bases(degree), 3)
    sh[:, 0, :] = RGB2SH(prototypes[labels.long()])
    return sh


def assign_parts_3d(
    colors: Tensor, prototypes: Tensor, threshold: float = SEG_3D_THRESHOLD, exclude_background: bool = True
) -> Tensor:
    """M3D as part ids Long[N] (0 = none) of label colours Float[N, 3]: part j when the summed L1 distance
    |colour - l_j|_1 < ``threshold``, exclusive in list order (an earlier part wins). prototypes: Float[P+1, 3].

    ``exclude_background`` [I]: a colour at least as close to the background prototype (row 0) as to l_j is not
    part j. With the code's bare threshold a near-black label (e.g. 0.1, 0, 0) would count as the red part.
    """
    return _match(colors, prototypes, threshold, exclude_background, reduce="sum")


def part_map_2d(
    label_image: Tensor, prototypes: Tensor, threshold: float = SEG_2D_THRESHOLD, exclude_background: bool = True
) -> Tensor:
    """M2D as part ids Long[H, W] (0 = none) of a rendered label map Float[H, W, 3] (any leading shape works): part j
    where the channel-mean distance mean_c |R - l_j| < ``threshold``, exclusive in list order.

    ``exclude_background`` [I]: a pixel at least as close to the background prototype (black) as to l_j is not
    part j. Without it every black background pixel is part j for a primary prototype such as (1, 0, 0), whose
    channel-mean distance to black is 1/3 < 0.34 (the code's bare rule).
    """
    return _match(label_image, prototypes, threshold, exclude_background, reduce="mean")


def _match(colors: Tensor, prototypes: Tensor, threshold: float, exclude_background: bool, reduce: str) -> Tensor:
    protos = prototypes.to(colors)
    diff = (colors[..., None, :] - protos).abs()  # [..., P+1, 3]
    dist = diff.sum(dim=-1) if reduce == "sum" else diff.mean(dim=-1)
    hits = dist[..., 1:] < threshold
    if exclude_background:
        hits = hits & (dist[..., 1:] < dist[..., :1])
    return _first_match(hits)


def _first_match(hits: Tensor) -> Tensor:
    """Bool[..., P] -> Long[...]: 1 + index of the first True along the last dim, 0 where none is True."""
    if hits.shape[-1] == 0:
        return torch.zeros(hits.shape[:-1], dtype=torch.long, device=hits.device)
    first = hits.long().argmax(dim=-1)  # argmax returns the first maximal index
    return torch.where(hits.any(dim=-1), first + 1, torch.zeros_like(first))


def render_label_field(
    scene: GaussianScene,
    label_sh: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    degree: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Label maps R^phi Float[C, H, W, 3] of the label field on a black background, one rasterization of the
    scene's own opacities and covariances (differentiable w.r.t. ``label_sh``). ``degree`` defaults to the one the
    coefficient count gives."""
    if degree is None:
        degree = int(round(label_sh.shape[1] ** 0.5)) - 1
    colors = label_colors(scene.means, label_sh, viewmats, degree)
    render, _, _ = rasterize(
        scene.means,
        scene.quats,
        scene.scales(),
        scene.opacities(),
        colors.to(scene.means.dtype),
        viewmats,
        Ks,
        int(width),
        int(height),
        backend=backend,
    )
    return render
